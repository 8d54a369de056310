"""``forensics demo``: the whole product in one command — the sidecar, SmolLM2 served through
the ASGI middleware under uvicorn, benign and injected HTTP traffic, the sidecar's asynchronous
analyses (detector baseline, anomaly score, verified fix set), the HTML report, and a summary
of what on-call needs. See :mod:`model_forensics.demo._run` for the steps.

Example::

    from model_forensics.demo import run_demo
    raise SystemExit(run_demo(data_dir="forensics-data/demo"))
"""

from __future__ import annotations

from ._procs import Child, ChildFailed, DemoError, Processes
from ._run import run_demo
from ._traffic import BENIGN_REVIEWS, INJECTED, INJECTION, injected_variants

__all__ = ["BENIGN_REVIEWS", "INJECTED", "INJECTION", "Child", "ChildFailed", "DemoError",
           "Processes", "injected_variants", "run_demo"]
