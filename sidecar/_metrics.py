"""Every metric the sidecar declares, gathered from the modules that observe them.

A metric is declared next to the code that measures it (a module's ``METRICS`` tuple, or a job
kind's ``metrics``); this module only collects them, so the Prometheus side can create every
series up front and the deploy assets can be checked against the code. Adding a metric to an
existing module never touches this file.

Example::

    [m.name for m in sidecar_metrics()]      # ['ingest_rejected', 'incidents_received', ...]
    metric("anomaly_score").buckets          # (-2.0, -1.0, 0.0, ...)
"""

from __future__ import annotations

from ._observer import Metric

__all__ = ["metric", "sidecar_metrics"]


def sidecar_metrics() -> tuple[Metric, ...]:
    """The metrics of ingest, refusals, the job runner and every built-in job kind (unique by
    name, in that order)."""
    from . import _ingest, _reject, _store_verify
    from .jobs import builtin_kinds
    from .jobs._runner import METRICS as JOB_METRICS

    found: dict[str, Metric] = {}
    for m in (*_reject.METRICS, *_ingest.METRICS, *_store_verify.METRICS, *JOB_METRICS,
              *(m for kind in builtin_kinds() for m in kind.metrics)):
        found.setdefault(m.name, m)
    return tuple(found.values())


def metric(name: str) -> Metric:
    """The declared metric ``name`` (without the ``forensics_`` prefix); KeyError if none."""
    for m in sidecar_metrics():
        if m.name == name:
            return m
    raise KeyError(f"no sidecar metric named {name!r}")
