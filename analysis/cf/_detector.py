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
   leave-one-out) — so ``flagged = score >= anomaly_threshold`` means "as far above benign
   incidents as the threshold says", whatever the number of recorded sites.

The baseline incidents' site statistics are **cross-fitted** (``folds``, default 5): each is
scored against references (and, for Mahalanobis, means/variances) built without its fold, so
they behave like new benign incidents; in-sample references made held-out benign incidents look
anomalous (measured on a tiny GPT-2, d=32, 30 baseline and 40 held-out benign incidents: 15–50 %
false positives with in-sample references; 0–7.5 % with cross-fitting and tail-calibrated
scales, 0 % at d=128).

Example::

    base = NormDetector.build_baseline(benign)
    report = NormDetector(baseline=base).analyze(inc)
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import numpy as np

from integrations.errors import AnalysisError, FingerprintMismatchError

from ._baseline import CFBaseline
from ._cells import cell_values, min_cell_units, n_features, strip, unit_z
from ._report import CFReport, SiteScore, WorstUnit
from ._score import (
    RobustRef,
    benjamini_hochberg,
    empirical_p,
    loo_tail_z,
    robust_z,
    tail_ref,
)
from ._units import (
    DEFAULT_POSITION_BUCKETS,
    KINDS,
    SiteUnits,
    as_incident,
    check_buckets,
    fingerprint_of,
    select_sites,
    site_units,
)

__all__ = ["Detector"]

#: Scale floors (robust-z units) of the site- and incident-level references.
_SITE_FLOOR = 0.5
_INCIDENT_FLOOR = 0.5


def _cf_config(config: Any) -> Any:
    from integrations.config import ForensicsConfig, load_config

    cfg = config if isinstance(config, ForensicsConfig) else load_config(config)
    return cfg.modules.cf


def _load_benign(items: Iterable[Any]) -> list[Any]:
    from integrations.incident import Incident

    out = []
    for x in items:
        out.append(Incident.open(x) if isinstance(x, (str, os.PathLike)) else as_incident(x))
    return out


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
            if not kinds or any(k not in KINDS for k in kinds):
                raise AnalysisError(f"step_kinds={kinds!r}: choose from {list(KINDS)}, e.g. "
                                    "['decode'] to score only what the model computed while "
                                    "generating")
            kinds = sorted(set(kinds), key=KINDS.index)
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
        keep = np.isin(units.kind, [KINDS.index(k) for k in kinds])
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
        if max_samples < 2:
            raise AnalysisError(f"max_samples={max_samples}: a baseline needs at least 2")
        incs = _load_benign(benign_incidents)
        if len(incs) < 2:
            raise AnalysisError(f"build_baseline got {len(incs)} benign incident(s); give at "
                                "least 2 (hundreds for calibrated p-values)")
        if len(incs) > max_samples:
            keep = sorted(random.Random(seed).sample(range(len(incs)), max_samples))
            incs = [incs[i] for i in keep]
        fps = {fingerprint_of(i) for i in incs}
        if len(fps) != 1:
            raise FingerprintMismatchError(
                f"benign incidents come from {len(fps)} different models (fingerprints "
                f"{sorted(str(f) for f in fps)}); build one baseline per model")
        common = set(incs[0].sites("activation"))
        for inc in incs[1:]:
            common &= set(inc.sites("activation"))
        if not common:
            raise AnalysisError("the benign incidents share no activation site; record the "
                                "same sites for every request (Recorder(sites=...))")
        chosen = select_sites(sorted(common), sites)

        n = len(incs)
        k_folds = min(int(opts["folds"]), n)
        fold = np.arange(n) % k_folds
        full = k_folds  # key of the parameter set fitted on every incident
        refit = cls.needs_fit and not cls._robust_fit(opts)
        keys = [full, *range(k_folds)] if refit else [full]
        params: dict[int, dict[str, dict[str, np.ndarray]]] = {k: {} for k in keys}
        if cls.needs_fit:
            for site in chosen:
                accs = {k: cls._fit_start(site, opts) for k in keys}
                for i, inc in enumerate(incs):
                    u = site_units(inc, site, buckets=buckets)
                    for k in keys:
                        if k == full or k != fold[i]:
                            cls._fit_add(accs[k], u, opts)
                for k in keys:
                    params[k][site] = cls._fit_end(accs[k], opts)

        # unit statistics of every baseline incident under every parameter set, by site
        meta: list[dict[str, SiteUnits]] = []
        stats: dict[int, list[dict[str, np.ndarray]]] = {k: [] for k in keys}
        state: dict[str, Any] = {}
        for inc in incs:
            row_meta: dict[str, SiteUnits] = {}
            rows: dict[int, dict[str, np.ndarray]] = {k: {} for k in keys}
            for site in chosen:
                u = cls._scoring_units(site_units(inc, site, buckets=buckets), opts)
                for k in keys:
                    rows[k][site] = cls._unit_stats(u, params[k].get(site, {}), opts, state)[0]
                row_meta[site] = strip(u)
            meta.append(row_meta)
            for k in keys:
                stats[k].append(rows[k])

        floors = {si: cls._unit_floor(n_features(meta[0][s]), opts)
                  for si, s in enumerate(chosen)}
        cells, values = cell_values(chosen, meta, stats[full], range(n))
        refs = [RobustRef.fit(v, floor=floors[c[0]]) for c, v in zip(cells, values)]
        lengths = np.array([v.size for v in values], dtype=np.int64)
        site_stats = np.full((n, len(chosen)), np.nan)
        min_n = min_cell_units(opts)
        for f in range(k_folds):  # cross-fitted site statistics: references without fold f
            k = f if refit else full
            others = [j for j in range(n) if fold[j] != f]
            fc, fv = cell_values(chosen, meta, stats[k], others)
            fold_refs = {c: RobustRef.fit(v, floor=floors[c[0]]) for c, v in zip(fc, fv)}
            for i in map(int, np.flatnonzero(fold == f)):
                for si, site in enumerate(chosen):
                    z, _, _ = unit_z(fold_refs, si, meta[i][site], stats[k][i][site], min_n)
                    if np.isfinite(z).any():
                        site_stats[i, si] = float(np.nanmax(np.abs(z)))
        return CFBaseline(
            detector=cls.name, model_fingerprint=next(iter(fps)), sites=chosen,
            position_buckets=buckets, cells=np.asarray(cells, dtype=np.int64).reshape(-1, 3),
            cell_ref=np.asarray([[r.median, r.lo, r.hi] for r in refs],
                                dtype=np.float64).reshape(-1, 3),
            cell_values=(np.concatenate(values) if values else np.empty(0, np.float32)),
            cell_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            site_stats=site_stats, params=params[full], incident_ids=[i.id for i in incs],
            options={**opts, "folds": k_folds},
            model_name=(incs[0].manifest.get("model") or {}).get("name"),
        )

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
        notes: list[str] = []
        available = set(inc.sites("activation"))
        wanted = select_sites(base.sites, self.sites)
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
        opts = base.options
        min_n = min_cell_units(opts)
        state: dict[str, Any] = {}
        rows: list[tuple[str, int, float, float, int, WorstUnit, int]] = []
        for site in todo:
            si = base.site_index(site)
            assert si is not None
            u = self._scoring_units(site_units(inc, site, buckets=base.position_buckets), opts)
            stats, clipped = self._unit_stats(u, base.params.get(site, {}), opts, state)
            z, used_bucket, unscored = unit_z(base.refs, si, u, stats, min_n)
            if unscored:
                kinds = sorted({KINDS[int(k)] for k in u.kind[~np.isfinite(z)]})
                notes.append(f"{site}: {unscored} unit(s) of step kind(s) {kinds} absent from "
                             "the baseline were not scored")
            if not np.isfinite(z).any():
                continue
            j = int(np.nanargmax(np.abs(z)))
            worst = WorstUnit(kind=KINDS[int(u.kind[j])], bucket=int(used_bucket[j]),
                              step=int(u.step[j]), position=int(u.position[j]),
                              value=float(stats[j]), z=float(z[j]))
            rows.append((site, si, float(abs(z[j])), 0.0, int(np.isfinite(z).sum()), worst,
                         clipped))
        if not rows:
            only = opts.get("step_kinds")
            hint = (f"; the baseline scores only step kinds {only} and this incident has none"
                    if only else "")
            raise AnalysisError(f"incident {inc.id!r}: no unit could be scored ({notes}){hint}")

        cols = [r[1] for r in rows]
        n_ref = int(base.site_stats.shape[0])
        if len(rows) > self.fdr * (n_ref + 1):  # BH: smallest q is len(rows) / (n_ref + 1)
            notes.append(
                f"no site can be significant: with {n_ref} baseline incidents the smallest "
                f"empirical p is 1/{n_ref + 1}, and Benjamini-Hochberg over {len(rows)} sites "
                f"needs p <= {self.fdr / len(rows):.2g}; build the baseline from at least "
                f"{int(np.ceil(len(rows) / self.fdr))} benign incidents (scores and flags at "
                "the threshold are unaffected)")
        site_refs, inc_ref, inc_ref_values = self._calibration(base, tuple(cols))
        scores = np.array([float(robust_z(np.array([r[2]]), ref)[0])
                           for r, ref in zip(rows, site_refs)])
        pvals = np.array([empirical_p(r[2], base.site_stats[:, r[1]]) for r in rows])
        qvals = benjamini_hochberg(pvals)
        sites: dict[str, SiteScore] = {}
        for (site, _, stat, _, n_units, worst, clipped), sc, p, q in zip(rows, scores, pvals,
                                                                       qvals):
            sites[site] = SiteScore(site=site, score=float(sc), stat=stat, p=float(p),
                                    q=float(q), flagged=bool(sc >= self.anomaly_threshold),
                                    significant=bool(q <= self.fdr), n_units=n_units,
                                    worst=worst, clipped=clipped)
        ranked = sorted(((s, v.score) for s, v in sites.items()), key=lambda t: (-t[1], t[0]))

        score = float(robust_z(np.array([ranked[0][1]]), inc_ref)[0])
        return CFReport(detector=self.name, incident_id=inc.id, score=score,
                        p=empirical_p(ranked[0][1], inc_ref_values),
                        flagged=bool(score >= self.anomaly_threshold),
                        threshold=self.anomaly_threshold, fdr=self.fdr, sites=sites,
                        ranked_sites=ranked, baseline_samples=base.sample_count,
                        model_fingerprint=fp, notes=notes,
                        execution_order=_execution_order(inc, sites))

    def _calibration(self, base: CFBaseline, cols: tuple[int, ...]
                     ) -> tuple[list[RobustRef], RobustRef, np.ndarray]:
        """Site references (tail-calibrated, from the cross-fitted baseline site statistics),
        the incident reference and its values: the max over ``cols`` of each baseline
        incident's leave-one-out site scores. Cached per baseline and site set."""
        key = (id(base), cols)
        cache: dict[Any, tuple[list[RobustRef], RobustRef, np.ndarray]] = (
            self.__dict__.setdefault("_cal_cache", {}))
        if key not in cache:
            site_refs = [tail_ref(base.site_stats[:, c], floor=_SITE_FLOOR) for c in cols]
            loo = np.column_stack([loo_tail_z(base.site_stats[:, c], floor=_SITE_FLOOR)
                                   for c in cols])  # [n_inc, n_scored]
            with np.errstate(invalid="ignore"):
                base_max = np.max(np.where(np.isfinite(loo), loo, -np.inf), axis=1)
            finite = base_max[np.isfinite(base_max)]
            if finite.size == 0:
                raise AnalysisError("the baseline has no usable site statistics for these sites;"
                                    " rebuild it from more benign incidents")
            cache.clear()
            cache[key] = (site_refs, tail_ref(finite, floor=_INCIDENT_FLOOR), finite)
        return cache[key]

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


def _execution_order(inc: Any, scored: dict[str, SiteScore]) -> list[str]:
    """The scored sites in recorded order (empty for incident-like objects without rows)."""
    order = getattr(inc, "site_order", None)
    return [s for s in order("activation") if s in scored] if callable(order) else []
