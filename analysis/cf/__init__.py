"""Compression Forensics (DESIGN §7) and the simple detectors it is measured against.

Every detector has the same interface: ``build_baseline(benign_incidents) -> CFBaseline`` (a
classmethod; persisted with ``save``/``load``, versioned per model fingerprint) and
``analyze(incident_or_session) -> CFReport`` with ``score``, ``flagged``, ``ranked_sites`` and
per-site ``score``/``p``/``q``/``flagged``. Scoring is explained in
:mod:`analysis.cf._detector`.

Example::

    from analysis.cf import CompressionForensics, CFBaseline
    base = CompressionForensics.build_baseline(benign_incidents)   # at most baseline_samples
    base.save("cf-baseline.npz")
    cf = CompressionForensics(baseline=CFBaseline.load("cf-baseline.npz"))
    report = cf.analyze(incident)          # or a replay session (uses session.incident)
    report.score, report.flagged, report.ranked_sites[:3]

Which detector to use is a measured choice (``benchmarks/RESULTS_cf.md``):
``make_detector(name)`` with ``name`` in :data:`DETECTOR_NAMES`, ``default_detector()`` for
:data:`DEFAULT_DETECTOR`, and ``build_baseline_from_dir(folder, detector=...)`` for a folder of
benign incident files.
"""

from __future__ import annotations

from ._baseline import BASELINE_FORMAT_VERSION, CFBaseline
from ._compression import CompressionForensics
from ._detector import Detector
from ._factory import (
    DEFAULT_DETECTOR,
    DETECTOR_NAMES,
    build_baseline_from_dir,
    default_detector,
    detector_class,
    make_detector,
)
from ._mahalanobis import MahalanobisDetector
from ._norm import NormDetector
from ._report import ONSET_RATIO, CFReport, SiteScore, WorstUnit
from ._units import DEFAULT_POSITION_BUCKETS, STEP_KINDS

__all__ = [
    "BASELINE_FORMAT_VERSION",
    "DEFAULT_DETECTOR",
    "DEFAULT_POSITION_BUCKETS",
    "DETECTOR_NAMES",
    "ONSET_RATIO",
    "STEP_KINDS",
    "CFBaseline",
    "CFReport",
    "CompressionForensics",
    "Detector",
    "MahalanobisDetector",
    "NormDetector",
    "SiteScore",
    "WorstUnit",
    "build_baseline_from_dir",
    "default_detector",
    "detector_class",
    "make_detector",
]
