"""Compression Forensics (DESIGN §7): how many bits per value a site's activations need.

The seed's member of the code-length family of detectors: activations quantised with a fixed
per-site step, zigzag byte planes, zstd (:mod:`._codec`). Scoring (cells, robust z, p/q,
incident score) is the framework's, :mod:`analysis.cf._detector`.

Example::

    base = CompressionForensics.build_baseline(benign, max_samples=1000)
    report = CompressionForensics(baseline=base).analyze(inc)
    report.score, report.flagged, report.ranked_sites[:3]
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from integrations.errors import AnalysisError

from ._codec import CODEC_MODES, QMAX_BENIGN, Codec
from ._detector import Detector, pop_int_option
from ._units import SiteUnits, group_units

__all__ = ["PREPROCESS_MODES", "UNIT_MODES", "CompressionForensics"]

#: Preprocessing before quantisation: ``"none"`` — the raw activations with ONE step per site;
#: ``"standardize"`` — subtract each feature's benign median and divide by its benign spread
#: (the ``scale_quantile`` of |x - median|, floored at 5 % of the site's), i.e. predictive coding
#: against the baseline; the site's step then maps that spread to ±``qmax`` codes.
PREPROCESS_MODES: tuple[str, ...] = ("none", "standardize")
_SPREAD_FLOOR = 0.05
_FIT_ROWS_PER_INCIDENT = 256

#: What one CF unit is: ``"position"`` (default) — every token position alone; ``"bucket"`` —
#: the positions of one step in one position bucket share one zstd frame (a decode step is one
#: position). Both are z-scored against (site, step kind, position bucket) references. Bucket
#: units are >= 2x faster (zstd's per-frame cost dominates small frames) but dilute a few
#: anomalous tokens among their bucket and mix frame sizes: measured worse on prompt injection
#: (benchmarks/RESULTS_cf.md), so they are an option for high-volume sidecars.
UNIT_MODES: tuple[str, ...] = ("bucket", "position")


class CompressionForensics(Detector):
    """Compression Forensics (DESIGN §7): how many bits per value a site's activations need.

    Per site, a FIXED quantisation step is learned from the benign baseline: the median over
    benign incidents of the ``scale_quantile`` (default 0.999) of |activation| maps to
    ±``qmax`` (default 127) int16 codes (``preprocess="none"``, default). With
    ``preprocess="standardize"`` each feature is first centred on its benign median and divided
    by its benign spread (predictive coding against the baseline; ``qmax`` default 16): it
    localises planted neuron faults better but flags more benign incidents on some models and
    its injection AUROC swings with the baseline sample (benchmarks/RESULTS_cf.md), hence not
    the default. The codes are zigzag byte-planed and compressed with zstd at ``zstd_level``;
    the unit statistic is compressed bits / value. Units (``unit``): every token position alone
    (default) or the positions of one (step, position bucket) in one frame (``"bucket"``,
    faster, less sensitive: see :data:`UNIT_MODES`). ``codec="frame"`` (default) gives each
    unit its own zstd frame; ``codec="share"`` compresses a site in one frame and gives each
    unit its entropy-coded share (see :mod:`analysis.cf._codec`). Activations far from the
    benign ones need more bits; collapsed ones fewer (both tails are scored).
    Scoring (cells, robust z, p/q, incident score): see :mod:`analysis.cf._detector`.

    Args:
        baseline: a :class:`CFBaseline` from :meth:`build_baseline` (or ``CFBaseline.load``).
        anomaly_threshold: robust-z flag threshold for sites and the incident (default
            ``modules.cf.anomaly_threshold``).
        fdr: BH false-discovery rate for ``SiteScore.significant``.
        sites: patterns restricting the scored sites (``*`` wildcard).
        position_buckets: must equal the baseline's if given.

    Example::

        base = CompressionForensics.build_baseline(benign)  # options: preprocess, qmax, unit, codec
        rep = CompressionForensics(baseline=base).analyze(inc)
    """

    name: ClassVar[str] = "cf"
    needs_fit: ClassVar[bool] = True
    robust_fit: ClassVar[bool] = True  # the scale is a median over incidents

    @classmethod
    def _options(cls, **options: Any) -> dict[str, Any]:
        level = pop_int_option(options, "zstd_level", 1, -7, 19)
        q = float(options.pop("scale_quantile", 0.999))
        if not 0.5 <= q <= 1.0:
            raise AnalysisError(f"scale_quantile={q} must be in [0.5, 1]")
        codec = options.pop("codec", "frame")
        if codec not in CODEC_MODES:
            raise AnalysisError(f"codec={codec!r} must be one of {list(CODEC_MODES)}")
        unit = options.pop("unit", "position")
        if unit not in UNIT_MODES:
            raise AnalysisError(f"unit={unit!r} must be one of {list(UNIT_MODES)}")
        prep = options.pop("preprocess", "none")
        if prep not in PREPROCESS_MODES:
            raise AnalysisError(f"preprocess={prep!r} must be one of {list(PREPROCESS_MODES)}")
        qmax = pop_int_option(options, "qmax", 16 if prep == "standardize" else 127, 1, 4096)
        return {**super()._options(**options), "zstd_level": level, "scale_quantile": q,
                "codec": codec, "unit": unit, "preprocess": prep, "qmax": qmax}

    @classmethod
    def _robust_fit(cls, options: dict[str, Any]) -> bool:
        # per-feature centres/spreads are in-sample statistics: refit them per fold
        return options.get("preprocess", "none") == "none"

    @classmethod
    def _scoring_units(cls, units: SiteUnits, options: dict[str, Any]) -> SiteUnits:
        units = super()._scoring_units(units, options)
        # baselines saved before the "unit" option existed scored single positions
        return group_units(units) if options.get("unit", "position") == "bucket" else units

    @classmethod
    def _fit_start(cls, site: str, options: dict[str, Any]) -> Any:
        return []

    @classmethod
    def _fit_add(cls, acc: Any, units: SiteUnits, options: dict[str, Any]) -> None:
        if options.get("preprocess", "none") == "standardize":
            n = units.vectors.shape[0]
            stride = max(1, -(-n // _FIT_ROWS_PER_INCIDENT))
            acc.append(units.vectors[::stride])  # [<= 256, features]
            return
        a = np.abs(units.vectors[np.isfinite(units.vectors)])
        acc.append(float(np.quantile(a, options["scale_quantile"])) if a.size else 0.0)

    @classmethod
    def _fit_end(cls, acc: Any, options: dict[str, Any]) -> dict[str, np.ndarray]:
        qmax = float(options.get("qmax", 127))
        if options.get("preprocess", "none") == "standardize":
            x = np.concatenate(acc).astype(np.float32)  # [rows, features]
            x[~np.isfinite(x)] = 0.0
            center = np.median(x, axis=0)  # [features]
            dev = np.abs(x - center)
            q = float(options["scale_quantile"])
            spread = np.quantile(dev, q, axis=0)  # [features]
            site = max(float(np.quantile(dev, q)), 1e-12)
            spread = np.maximum(spread, _SPREAD_FLOOR * site)  # dead features: not a 0 step
            # quantisation step per feature: the benign spread maps to ±qmax codes
            return {"scale": (spread * (QMAX_BENIGN / qmax)).astype(np.float32),
                    "center": center.astype(np.float32)}
        scale = float(np.median(acc)) if acc else 0.0
        return {"scale": np.array([max(scale, 1e-12) * (QMAX_BENIGN / qmax)], dtype=np.float64)}

    @classmethod
    def _unit_stats(cls, units: SiteUnits, params: dict[str, np.ndarray],
                    options: dict[str, Any], state: dict[str, Any]) -> tuple[np.ndarray, int]:
        codec = state.get("codec")
        if codec is None:
            # baselines saved before the "share" codec existed used one frame per position
            codec = state["codec"] = Codec(level=int(options["zstd_level"]),
                                           mode=options.get("codec", "frame"))
        scale = params["scale"]
        return codec.bits_per_value(units.vectors,
                                    scale=float(scale[0]) if scale.size == 1 else scale,
                                    offsets=units.offsets, center=params.get("center"))

    @classmethod
    def _unit_floor(cls, n_features: int, options: dict[str, Any]) -> float:
        if options.get("unit", "position") == "bucket":
            return 2.0 / max(n_features, 1)  # a quarter byte per position of a group
        if options.get("codec", "frame") == "frame":
            return 8.0 / max(n_features, 1)  # one compressed byte per unit
        return 1.0 / max(n_features, 1)  # one bit per unit (the share codec is sub-byte)
