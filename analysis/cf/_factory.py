"""Choosing a detector by name, the measured default, and baselines from a folder of incidents.

``DEFAULT_DETECTOR`` is the detector that measured best in ``benchmarks/cf_eval.py`` (see
``benchmarks/RESULTS_cf.md``): Compression Forensics and the norm detector are beaten by the
diagonal Mahalanobis detector on the real SmolLM2 prompt-injection scenario and in localising
planted faults, so Mahalanobis is the default; CF stays available by name.

Example::

    from analysis.cf import build_baseline_from_dir, make_detector
    base = build_baseline_from_dir("spool/benign", detector="cf")
    report = make_detector("cf", baseline=base).analyze(incident)
    det = default_detector(baseline=build_baseline_from_dir("spool/benign",
                                                            detector=DEFAULT_DETECTOR))
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from integrations.errors import AnalysisError

from ._baseline import CFBaseline
from ._compression import CompressionForensics
from ._detector import Detector
from ._mahalanobis import MahalanobisDetector
from ._norm import NormDetector

__all__ = ["DEFAULT_DETECTOR", "DETECTOR_NAMES", "build_baseline_from_dir", "default_detector",
           "detector_class", "make_detector"]

_CLASSES: dict[str, type[Detector]] = {
    "cf": CompressionForensics, "norm": NormDetector, "mahalanobis": MahalanobisDetector,
}
#: Every detector name :func:`make_detector` accepts.
DETECTOR_NAMES: tuple[str, ...] = tuple(sorted(_CLASSES))
#: The detector chosen by measurement (benchmarks/RESULTS_cf.md).
DEFAULT_DETECTOR = "mahalanobis"


def detector_class(name: str) -> type[Detector]:
    """The detector class for ``name`` (``"cf"``, ``"norm"`` or ``"mahalanobis"``)."""
    try:
        return _CLASSES[name]
    except KeyError:
        raise AnalysisError(f"unknown detector {name!r}; use one of {list(DETECTOR_NAMES)} "
                            f"(default {DEFAULT_DETECTOR!r})") from None


def make_detector(name: str, **kwargs: Any) -> Detector:
    """A detector instance by name; ``kwargs`` go to its constructor (``baseline=``,
    ``anomaly_threshold=``, ``fdr=``, ``sites=``, ...). If ``baseline`` is given it must have
    been built by the same detector.

    Example: ``make_detector("norm", baseline=base).analyze(inc)``
    """
    return detector_class(name)(**kwargs)


def default_detector(**kwargs: Any) -> Detector:
    """The measured default detector (:data:`DEFAULT_DETECTOR`); or, given ``baseline=``, the
    detector that baseline was built by (a saved baseline always gets its own detector).

    Example: ``default_detector(baseline=CFBaseline.load(path)).analyze(inc)``
    """
    base = kwargs.get("baseline")
    name = base.detector if isinstance(base, CFBaseline) else DEFAULT_DETECTOR
    return make_detector(name, **kwargs)


def build_baseline_from_dir(directory: str | os.PathLike[str], *, detector: str = "cf",
                            pattern: str = "*.arrow", **options: Any) -> CFBaseline:
    """Build a detector baseline from every incident file in ``directory`` (``pattern``,
    default ``*.arrow``, as the file exporter writes them), sorted by name.

    ``options`` go to ``build_baseline`` (``max_samples``, ``sites``, ``seed``, ``config``,
    detector options such as ``folds``). Example::

        base = build_baseline_from_dir("/var/forensics/benign", detector="mahalanobis")
        base.save("baselines/smollm2.mahalanobis.npz")
    """
    root = Path(directory)
    if not root.is_dir():
        raise AnalysisError(f"{str(root)!r} is not a directory; pass the folder holding the "
                            "benign incident files")
    paths = sorted(p for p in root.glob(pattern) if p.is_file())
    if len(paths) < 2:
        raise AnalysisError(f"{str(root)!r} holds {len(paths)} file(s) matching {pattern!r}; a "
                            "baseline needs at least 2 benign incidents (hundreds for "
                            "calibrated p-values)")
    return detector_class(detector).build_baseline(paths, **options)
