"""Model Forensics — the thin facade: the seed's documented names and the ``forensics`` CLI.

The seed README's Basic Usage runs against these names::

    from model_forensics import RecorderHooks, SandboxReplayer, CompressionForensics, CausalCCA

New code should import from the packages that implement them: ``integrations`` (recording),
``analysis`` (replay, CF, CCA), ``sidecar`` (the daemon). Names resolve lazily, so importing
this module is cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from integrations._lazy import lazy_exports

if TYPE_CHECKING:  # what type checkers see; at runtime each name loads on first use
    from analysis.cca import Failure
    from analysis.replay import Replayer
    from integrations import Recorder, exporters, flag, triggers
    from integrations.incident import Incident
    from model_forensics._seed import RecorderHooks
    from model_forensics._seed_analysis import (
        CausalCCA,
        CompressionForensics,
        SandboxReplayer,
        prepare,
    )

__all__ = [
    "CausalCCA",
    "CompressionForensics",
    "Failure",
    "Incident",
    "Recorder",
    "RecorderHooks",
    "Replayer",
    "SandboxReplayer",
    "exporters",
    "flag",
    "prepare",
    "triggers",
]

__getattr__, __dir__ = lazy_exports(__name__, {
    "CausalCCA": "model_forensics._seed_analysis",
    "CompressionForensics": "model_forensics._seed_analysis",
    "Failure": "analysis.cca",
    "Incident": "integrations.incident",
    "Recorder": "integrations",
    "RecorderHooks": "model_forensics._seed",
    "Replayer": "analysis.replay",
    "SandboxReplayer": "model_forensics._seed_analysis",
    "exporters": "integrations",
    "flag": "integrations",
    "prepare": "model_forensics._seed_analysis",
    "triggers": "integrations",
})
