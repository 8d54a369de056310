"""The detector framework shared by CF and the baseline detectors (norm, Mahalanobis).

Scoring, in three levels, each a robust z against benign data:

1. **Unit**: each token position of each step of each site yields one statistic (CF: compressed
   bits/value; norm: log2 RMS; Mahalanobis: D²/d). It is z-scored (median, double MAD, floored
   at the statistic's resolution) against the baseline reference of its cell (site × step kind
   × position bucket; the site's pooled step-kind cell when the bucket has fewer than
   ``min_cell_units`` reference values).
2. **Site**: ``stat`` = max |unit z| over the site's units (a single anomalous token is not
   averaged away); ``score`` = robust z of ``stat`` against the same statistic of the benign
   baseline incidents, with a tail-calibrated upper scale (z = 2 is never below the benign
   97.7th percentile, see :func:`~analysis.cf._score.tail_ref`); ``p`` = empirical p-value of
   ``stat`` (+1 correction); ``q`` = Benjamini–Hochberg across the incident's sites.
3. **Incident**: ``score`` = the same tail-calibrated robust z of (max site score) against the
   max site score of every baseline incident over the same sites (their site scores taken
   leave-one-out), z = 2 at a 90 % upper confidence bound of their 97.7th percentile (the
   largest of them for a baseline under ~100 incidents) — so ``flagged = score >=
   anomaly_threshold`` means "as far above benign incidents as the threshold says", whatever
   the number of recorded sites or baseline incidents.

The baseline incidents' site statistics are **cross-fitted** (``folds``, default 5): each is
scored against references (and, for Mahalanobis, means/variances) built without its fold, so
they behave like new benign incidents; in-sample references made held-out benign incidents look
anomalous (measured on a tiny GPT-2, d=32, 30 baseline and 40 held-out benign incidents: 15–50 %
false positives with in-sample references; 0–7.5 % with cross-fitting and tail-calibrated
scales, 0 % at d=128).

Building a baseline: :func:`~._baseline.benign_sample` (the incidents), the detector's fit per
fold, unit statistics, and :mod:`._crossfit` (references and cross-fitted site statistics).
Scoring an incident: level 1 here, levels 2–3 in :mod:`._calibrate`. The detectors themselves
(:mod:`._compression`, :mod:`._norm`, :mod:`._mahalanobis`) only define the unit statistic.

Example::

    base = NormDetector.build_baseline(benign)
    report = NormDetector(baseline=base).analyze(inc)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import numpy as np

from integrations.errors import AnalysisError, FingerprintMismatchError

from ._baseline import CFBaseline, benign_sample
from ._calibrate import Calibrator, SiteRow
from ._cells import min_cell_units, n_features, strip, unit_z
from ._crossfit import Folds, UnitStats, cross_fitted_site_stats, reference_cells
from ._report import CFReport, SiteScore, WorstUnit
from ._score import empirical_p, robust_z
from ._units import (
    DEFAULT_POSITION_BUCKETS,
    STEP_KINDS,
    SiteUnits,
    as_incident,
    check_buckets,
    fingerprint_of,
    select_sites,
    site_units,
)

__all__ = ["Detector", "pop_int_option"]

def _cf_config(config: Any) -> Any:
    from integrations.config import ForensicsConfig, load_config

    cfg = config if isinstance(config, ForensicsConfig) else load_config(config)
    return cfg.modules.cf


def pop_int_option(options: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    """Remove the detector option ``key`` from ``options``: an int in [``lo``, ``hi``]."""
    v = options.pop(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise AnalysisError(f"{key}={v!r} must be an int in [{lo}, {hi}]")
    return v


class Detector:
    """Base of every incident anomaly detector (see module doc); subclasses define the unit
    statistic through ``_fit_*`` and ``_unit_stats``."""

    name: ClassVar[str] = "detector"
    #: whether ``_fit_*`` must see the benign incidents before unit statistics can be computed
    needs_fit: ClassVar[bool] = False
    #: whether the fit is robust enough (a median) to skip refitting per cross-fitting fold
    robust_fit: ClassVar[bool] = False

    def __init__(self, *, baseline: CFBaseline | None = None,
                 anomaly_threshold: float | None = None, fdr: float = 0.05,
                 sites: Sequence[str] | None = None,
                 position_buckets: Sequence[int] | None = None, config: Any = None) -> None:
        if anomaly_threshold is None:
            anomaly_threshold = float(_cf_config(config).anomaly_threshold)
        if not 0.0 < fdr < 1.0:
            raise AnalysisError(f"fdr={fdr} must be in (0, 1), e.g. 0.05")
        self.baseline = baseline
        self.anomaly_threshold = float(anomaly_threshold)
        self.fdr = float(fdr)
        self.sites = list(sites) if sites is not None else None
        self.position_buckets = (check_buckets(position_buckets)
                                 if position_buckets is not None else None)
        self._calibrator = Calibrator()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(baseline={self.baseline!r}, "
                f"anomaly_threshold={self.anomaly_threshold}, fdr={self.fdr})")

    # ----------------------------------------------------------------- subclass hooks
    @classmethod
    def _options(cls, **options: Any) -> dict[str, Any]:
        folds = options.pop("folds", 5)
        min_n = options.pop("min_cell_units", 8)
        for key, v, lo in (("folds", folds, 2), ("min_cell_units", min_n, 1)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise AnalysisError(f"{key}={v!r} must be an int >= {lo}")
        kinds = options.pop("step_kinds", None)
        if kinds is not None:
            kinds = [kinds] if isinstance(kinds, str) else list(kinds)
            if not kinds or any(k not in STEP_KINDS for k in kinds):
                raise AnalysisError(f"step_kinds={kinds!r}: choose from {list(STEP_KINDS)}, e.g. "
                                    "['decode'] to score only what the model computed while "
                                    "generating")
            kinds = sorted(set(kinds), key=STEP_KINDS.index)
        if options:
            raise AnalysisError(f"{cls.__name__}.build_baseline got unknown options "
                                f"{sorted(options)}")
        return {"folds": folds, "min_cell_units": min_n, "step_kinds": kinds}

    @classmethod
    def _fit_start(cls, site: str, options: dict[str, Any]) -> Any:
        return None

    @classmethod
    def _fit_add(cls, acc: Any, units: SiteUnits, options: dict[str, Any]) -> None:
        return None

    @classmethod
    def _fit_end(cls, acc: Any, options: dict[str, Any]) -> dict[str, np.ndarray]:
        return {}

    @classmethod
    def _unit_stats(cls, units: SiteUnits, params: dict[str, np.ndarray],
                    options: dict[str, Any], state: dict[str, Any]) -> tuple[np.ndarray, int]:
        """``(statistic per unit [n_units], clipped count)``; ``state`` is per-call scratch."""
        raise NotImplementedError

    @classmethod
    def _unit_floor(cls, n_features: int, options: dict[str, Any]) -> float:
        """Floor of the unit-level reference scales (the statistic's resolution)."""
        return 1e-3

    @classmethod
    def _robust_fit(cls, options: dict[str, Any]) -> bool:
        """Whether the fit is robust enough to skip refitting per cross-fitting fold."""
        return cls.robust_fit

    @classmethod
    def _scoring_units(cls, units: SiteUnits, options: dict[str, Any]) -> SiteUnits:
        """The units a detector scores: one per position (default) or e.g. position groups;
        only those of the baseline's ``step_kinds`` when it restricts them."""
        kinds = options.get("step_kinds")
        if not kinds:
            return units
        keep = np.isin(units.kind, [STEP_KINDS.index(k) for k in kinds])
        return SiteUnits(site=units.site, vectors=units.vectors[keep], kind=units.kind[keep],
                         bucket=units.bucket[keep], step=units.step[keep],
                         position=units.position[keep])

    # ----------------------------------------------------------------- baseline
    @classmethod
    def build_baseline(cls, benign_incidents: Iterable[Any], *, max_samples: int | None = None,
                       sites: Sequence[str] | None = None,
                       position_buckets: Sequence[int] = DEFAULT_POSITION_BUCKETS,
                       seed: int = 0, config: Any = None, **options: Any) -> CFBaseline:
        """Learn the benign reference from incidents (``Incident``, replay sessions or paths).

        At most ``max_samples`` (default ``modules.cf.baseline_samples``) incidents are used, a
        deterministic sample (``seed``) when more are given. All must come from one model
        (same fingerprint). ``sites``: patterns (``*`` wildcard); default every activation site
        recorded in all of them. Options every detector takes: ``folds`` (cross-fitting, 5),
        ``min_cell_units`` (8), ``step_kinds`` (score only units of these step kinds, e.g.
        ``["decode"]``: what the model computed while generating; default all). Example::

            base = CompressionForensics.build_baseline(benign, max_samples=500)
        """
        opts = cls._options(**options)
        buckets = check_buckets(position_buckets)
        if max_samples is None:
            max_samples = int(_cf_config(config).baseline_samples)
        incs, fingerprint, common = benign_sample(benign_incidents, max_samples=max_samples,
                                                  seed=seed)
        chosen = select_sites(common, sites)
        folds = Folds(n=len(incs), k=int(opts["folds"]),
                      refit=cls.needs_fit and not cls._robust_fit(opts))
        params = cls._fit_params(incs, chosen, buckets, opts, folds)
        meta, stats = cls._baseline_unit_stats(incs, chosen, buckets, opts, params)
        floors = {si: cls._unit_floor(n_features(meta[0][s]), opts)
                  for si, s in enumerate(chosen)}
        cells, refs, values = reference_cells(chosen, meta, stats[folds.full], floors)
        lengths = np.array([v.size for v in values], dtype=np.int64)
        return CFBaseline(
            detector=cls.name, model_fingerprint=fingerprint, sites=chosen,
            position_buckets=buckets, cells=np.asarray(cells, dtype=np.int64).reshape(-1, 3),
            cell_ref=np.asarray([[r.median, r.lo, r.hi] for r in refs],
                                dtype=np.float64).reshape(-1, 3),
            cell_values=(np.concatenate(values) if values else np.empty(0, np.float32)),
            cell_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            site_stats=cross_fitted_site_stats(chosen, meta, stats, folds, floors,
                                               min_cell_units(opts)),
            params=params[folds.full], incident_ids=[i.id for i in incs],
            options={**opts, "folds": folds.k},
            model_name=(incs[0].manifest.get("model") or {}).get("name"),
        )

    @classmethod
    def _fit_params(cls, incs: list[Any], sites: list[str], buckets: tuple[int, ...],
                    opts: dict[str, Any], folds: Folds
                    ) -> dict[int, dict[str, dict[str, np.ndarray]]]:
        """The detector's parameters per site, for every parameter set of ``folds`` (each
        fitted without its fold; the full set on every incident); empty without a fit."""
        params: dict[int, dict[str, dict[str, np.ndarray]]] = {k: {} for k in folds.keys}
        if not cls.needs_fit:
            return params
        fold = folds.fold
        for site in sites:
            accs = {k: cls._fit_start(site, opts) for k in folds.keys}
            for i, inc in enumerate(incs):
                u = site_units(inc, site, buckets=buckets)
                for k in folds.keys:
                    if k == folds.full or k != fold[i]:
                        cls._fit_add(accs[k], u, opts)
            for k in folds.keys:
                params[k][site] = cls._fit_end(accs[k], opts)
        return params

    @classmethod
    def _baseline_unit_stats(cls, incs: list[Any], sites: list[str], buckets: tuple[int, ...],
                             opts: dict[str, Any],
                             params: dict[int, dict[str, dict[str, np.ndarray]]]
                             ) -> tuple[list[dict[str, SiteUnits]], UnitStats]:
        """Every baseline incident's units (vectors dropped) and their statistics under every
        parameter set, by site."""
        meta: list[dict[str, SiteUnits]] = []
        stats: UnitStats = {k: [] for k in params}
        state: dict[str, Any] = {}
        for inc in incs:
            row_meta: dict[str, SiteUnits] = {}
            rows: dict[int, dict[str, np.ndarray]] = {k: {} for k in params}
            for site in sites:
                u = cls._scoring_units(site_units(inc, site, buckets=buckets), opts)
                for k in params:
                    rows[k][site] = cls._unit_stats(u, params[k].get(site, {}), opts, state)[0]
                row_meta[site] = strip(u)
            meta.append(row_meta)
            for k in params:
                stats[k].append(rows[k])
        return meta, stats

    # ----------------------------------------------------------------- analysis
    def analyze(self, incident_or_session: Any) -> CFReport:
        """Score one incident (or a replay session's incident) against the baseline.

        Raises :class:`AnalysisError` without a baseline or for a baseline of another
        detector, :class:`FingerprintMismatchError` for a baseline of another model.
        """
        base = self._check_baseline()
        inc = as_incident(incident_or_session)
        fp = fingerprint_of(inc)
        if fp != base.model_fingerprint:
            raise FingerprintMismatchError(
                f"incident {inc.id!r} comes from model fingerprint {fp!r} but the "
                f"{self.name} baseline was built for {base.model_fingerprint!r}; build a "
                "baseline from benign incidents of this model (build_baseline)")
        todo, notes = _sites_to_score(inc, base, self.sites)
        state: dict[str, Any] = {}
        rows = [r for r in (self._score_site(inc, base, site, notes, state) for site in todo)
                if r is not None]
        if not rows:
            only = base.options.get("step_kinds")
            hint = (f"; the baseline scores only step kinds {only} and this incident has none"
                    if only else "")
            raise AnalysisError(f"incident {inc.id!r}: no unit could be scored ({notes}){hint}")
        sites, inc_ref, inc_ref_values = self._calibrator.site_scores(
            base, rows, notes, threshold=self.anomaly_threshold, fdr=self.fdr)
        ranked = sorted(((s, v.score) for s, v in sites.items()), key=lambda t: (-t[1], t[0]))
        score = float(robust_z(np.array([ranked[0][1]]), inc_ref)[0])
        return CFReport(detector=self.name, incident_id=inc.id, score=score,
                        p=empirical_p(ranked[0][1], inc_ref_values),
                        flagged=bool(score >= self.anomaly_threshold),
                        threshold=self.anomaly_threshold, fdr=self.fdr, sites=sites,
                        ranked_sites=ranked, baseline_samples=base.sample_count,
                        model_fingerprint=fp, notes=notes,
                        execution_order=_execution_order(inc, sites))

    def _score_site(self, inc: Any, base: CFBaseline, site: str, notes: list[str],
                    state: dict[str, Any]) -> SiteRow | None:
        """Level 1-2 (module doc): the site's unit z against the baseline cells, its statistic
        and worst unit (None when no unit could be scored)."""
        opts = base.options
        si = base.site_index(site)
        assert si is not None
        u = self._scoring_units(site_units(inc, site, buckets=base.position_buckets), opts)
        stats, clipped = self._unit_stats(u, base.params.get(site, {}), opts, state)
        z, used_bucket, unscored = unit_z(base.refs, si, u, stats, min_cell_units(opts))
        if unscored:
            kinds = sorted({STEP_KINDS[int(k)] for k in u.kind[~np.isfinite(z)]})
            notes.append(f"{site}: {unscored} unit(s) of step kind(s) {kinds} absent from "
                         "the baseline were not scored")
        if not np.isfinite(z).any():
            return None
        j = int(np.nanargmax(np.abs(z)))
        worst = WorstUnit(kind=STEP_KINDS[int(u.kind[j])], bucket=int(used_bucket[j]),
                          step=int(u.step[j]), position=int(u.position[j]),
                          value=float(stats[j]), z=float(z[j]))
        return SiteRow(site, si, float(abs(z[j])), int(np.isfinite(z).sum()), worst, clipped)

    def _check_baseline(self) -> CFBaseline:
        base = self.baseline
        if base is None:
            raise AnalysisError(
                f"{type(self).__name__} has no baseline, so nothing can be scored (there is no "
                f"silent z = 0): build one with {type(self).__name__}.build_baseline("
                "benign_incidents) or load a saved one with CFBaseline.load(path), then pass "
                "baseline=...")
        if base.detector != self.name:
            raise AnalysisError(
                f"the baseline was built by the {base.detector!r} detector; {type(self).__name__}"
                f" needs one built by {type(self).__name__}.build_baseline(...)")
        if self.position_buckets is not None and self.position_buckets != base.position_buckets:
            raise AnalysisError(
                f"position_buckets={list(self.position_buckets)} differ from the baseline's "
                f"{list(base.position_buckets)}; rebuild the baseline with the same buckets or "
                "leave position_buckets unset")
        return base


def _sites_to_score(inc: Any, base: CFBaseline, patterns: Sequence[str] | None
                    ) -> tuple[list[str], list[str]]:
    """The baseline's sites (restricted by ``patterns``) the incident recorded, and notes on
    the ones it lacks or has beyond the baseline."""
    notes: list[str] = []
    available = set(inc.sites("activation"))
    wanted = select_sites(base.sites, patterns)
    missing = [s for s in wanted if s not in available]
    if missing:
        notes.append(f"baseline sites not recorded in this incident: {missing}")
    extra = sorted(available - set(base.sites))
    if extra:
        notes.append(f"incident sites without a baseline (not scored): {extra}")
    todo = [s for s in wanted if s in available]
    if not todo:
        raise AnalysisError(
            f"incident {inc.id!r} has none of the baseline's sites {base.sites[:10]}; "
            "record the same sites as the benign traffic the baseline was built from")
    return todo, notes


def _execution_order(inc: Any, scored: dict[str, SiteScore]) -> list[str]:
    """The scored sites in recorded order (empty for incident-like objects without rows)."""
    order = getattr(inc, "site_order", None)
    return [s for s in order("activation") if s in scored] if callable(order) else []
