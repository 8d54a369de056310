"""Incident analysis: reading, deterministic replay, interventions, CF, CCA, scenarios.

Example::

    from analysis import Incident
    inc = Incident.open("forensics-data/demo/incidents/<id>.arrow")

Heavy modules are imported on first use of their names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from integrations._lazy import lazy_exports

if TYPE_CHECKING:  # what type checkers see; at runtime each name loads on first use
    from integrations.incident import Incident

    from .cca import CausalCCA, Failure, FixSet
    from .cf import CFBaseline, CFReport, CompressionForensics, MahalanobisDetector, NormDetector
    from .interventions import DonorBaseline, Intervention
    from .replay import Fidelity, Replayer, ReplayResult, ReplaySession

__all__ = [
    "CFBaseline",
    "CFReport",
    "CausalCCA",
    "CompressionForensics",
    "DonorBaseline",
    "Failure",
    "Fidelity",
    "FixSet",
    "Incident",
    "Intervention",
    "MahalanobisDetector",
    "NormDetector",
    "ReplayResult",
    "ReplaySession",
    "Replayer",
]

__getattr__, __dir__ = lazy_exports(__name__, {
    "CFBaseline": ".cf",
    "CFReport": ".cf",
    "CausalCCA": ".cca",
    "CompressionForensics": ".cf",
    "DonorBaseline": ".interventions",
    "Failure": ".cca",
    "Fidelity": ".replay",
    "FixSet": ".cca",
    "Incident": "integrations.incident",
    "Intervention": ".interventions",
    "MahalanobisDetector": ".cf",
    "NormDetector": ".cf",
    "ReplayResult": ".replay",
    "ReplaySession": ".replay",
    "Replayer": ".replay",
})
