"""Polling helpers for tests of asynchronous work (sidecar jobs): wait for an observable state
with a deadline, never a fixed sleep as an assertion.

Example::

    row = wait_for(lambda: store.get(inc_id), 30, "the incident to be indexed")
    wait_for(lambda: jobs_idle(sidecar), 120, "the analysis jobs")
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["jobs_idle", "wait_for"]


def wait_for(cond: Callable[[], Any], timeout_s: float, what: str, *,
             every_s: float = 0.05) -> Any:
    """``cond()``'s first truthy value, polled every ``every_s``; AssertionError naming
    ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out waiting for {what}")


def jobs_idle(sidecar: Any) -> bool:
    """Whether a :class:`sidecar.Sidecar` has no pending or running analysis job."""
    counts = sidecar.jobs.counts()
    return bool(counts["pending"] == 0 and counts["running"] == 0)
