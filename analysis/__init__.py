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
    "CFBaseline": "analysis.cf",
    "CFReport": "analysis.cf",
    "CausalCCA": "analysis.cca",
    "CompressionForensics": "analysis.cf",
    "DonorBaseline": "analysis.interventions",
    "Failure": "analysis.cca",
    "Fidelity": "analysis.replay",
    "FixSet": "analysis.cca",
    "Incident": "integrations.incident",
    "Intervention": "analysis.interventions",
    "MahalanobisDetector": "analysis.cf",
    "NormDetector": "analysis.cf",
    "ReplayResult": "analysis.replay",
    "ReplaySession": "analysis.replay",
    "Replayer": "analysis.replay",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(mod), name)
