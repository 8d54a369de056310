"""Model Forensics — the thin facade: the seed's documented names and the ``forensics`` CLI.

The seed README's Basic Usage runs against these names::

    from model_forensics import RecorderHooks, SandboxReplayer, CompressionForensics, CausalCCA

New code should import from the packages that implement them: ``integrations`` (recording),
``analysis`` (replay, CF, CCA), ``sidecar`` (the daemon). Names resolve lazily, so importing
this module is cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module that defines it
_LAZY = {
    "CausalCCA": "model_forensics._seed_analysis",
    "CompressionForensics": "model_forensics._seed_analysis",
    "Failure": "analysis.cca",
    "Replayer": "analysis.replay",
    "SandboxReplayer": "model_forensics._seed_analysis",
    "prepare": "model_forensics._seed_analysis",
    "RecorderHooks": "model_forensics._seed",
    "Recorder": "integrations",
    "flag": "integrations",
    "triggers": "integrations",
    "exporters": "integrations",
    "Incident": "integrations.incident",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(mod), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
