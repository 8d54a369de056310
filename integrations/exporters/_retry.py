"""The sidecar exporter's retry policy: which gRPC codes are retried, and how long to wait.

Uploads are idempotent on the incident id, so a retry is always safe. With a spool, every
retryable code sends the incident to the spool at once; the drain retries ``UNAVAILABLE``, and
any of them while the sidecar does not answer a health check (hung), without limit, and the
others ``max_retries`` times per entry. Without a spool, all are retried ``max_retries`` times
inline. ``UNKNOWN`` / ``INTERNAL`` / ``ABORTED`` are what a
connection torn down mid-stream (a sidecar killed during an upload) can surface as.

Example::

    backoff = Backoff(initial_s=0.2, max_s=10.0, on_sleep=lambda s: None)
    stopped = backoff.sleep(attempt, stop_event)   # True when stop_event was set meanwhile
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

import grpc

__all__ = ["RETRYABLE", "Backoff"]

#: Codes worth retrying (see the module doc).
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNKNOWN,
                       grpc.StatusCode.INTERNAL, grpc.StatusCode.ABORTED})


class Backoff:
    """Exponential backoff with full jitter:
    ``delay(attempt) = uniform(0, min(max_s, initial_s * 2**attempt))``.

    ``on_sleep(seconds)`` is told every sleep (the exporter counts ``backoff_s``).
    """

    def __init__(self, *, initial_s: float, max_s: float,
                 on_sleep: Callable[[float], None]) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self._on_sleep = on_sleep
        self._rng = random.Random()

    def delay(self, attempt: int) -> float:
        """The wait before retry number ``attempt`` (0-based)."""
        cap = min(self.max_s, self.initial_s * (2 ** min(attempt, 30)))
        return self._rng.uniform(0.0, cap)

    def sleep(self, attempt: int, stop: threading.Event) -> bool:
        """Wait :meth:`delay` seconds unless ``stop`` is set first; True if stopped."""
        seconds = self.delay(attempt)
        self._on_sleep(seconds)
        return stop.wait(seconds)
