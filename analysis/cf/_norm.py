"""The activation-norm detector: the simplest baseline Compression Forensics is measured against.

Example::

    rep = NormDetector(baseline=NormDetector.build_baseline(benign)).analyze(inc)
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ._detector import Detector
from ._units import SiteUnits

__all__ = ["NormDetector"]


class NormDetector(Detector):
    """Activation-norm baseline detector: log2 RMS of each token position's activations,
    robust z per (site, step kind, position bucket). Same interface as CF.

    Example::

        rep = NormDetector(baseline=NormDetector.build_baseline(benign)).analyze(inc)
    """

    name: ClassVar[str] = "norm"

    @classmethod
    def _unit_stats(cls, units: SiteUnits, params: dict[str, np.ndarray],
                    options: dict[str, Any], state: dict[str, Any]) -> tuple[np.ndarray, int]:
        x = units.vectors.astype(np.float64)
        rms = np.sqrt(np.mean(x * x, axis=1)) if x.shape[1] else np.zeros(x.shape[0])
        return np.log2(rms + 1e-12), 0

    @classmethod
    def _unit_floor(cls, n_features: int, options: dict[str, Any]) -> float:
        return 0.01  # ~0.7 % in RMS
