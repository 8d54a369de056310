"""Incident analysis: reading, deterministic replay, interventions, CF, CCA, scenarios.

Example::

    from analysis import Incident
    inc = Incident.open("forensics-data/demo/incidents/<id>.arrow")

Heavy modules are imported on first use of their names.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module that defines it (imported lazily)
_LAZY = {
    "Baseline": "analysis.interventions",
    "CausalCCA": "analysis.cca",
    "CFBaseline": "analysis.cf",
    "Failure": "analysis.cca",
    "Fidelity": "analysis.replay",
    "FixSet": "analysis.cca",
    "Intervention": "analysis.interventions",
    "MeanBaseline": "analysis.interventions",
    "ReplayResult": "analysis.replay",
    "ReplaySession": "analysis.replay",
    "Replayer": "analysis.replay",
    "CFReport": "analysis.cf",
    "CompressionForensics": "analysis.cf",
    "Incident": "integrations.incident",
    "MahalanobisDetector": "analysis.cf",
    "NormDetector": "analysis.cf",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(mod), name)
