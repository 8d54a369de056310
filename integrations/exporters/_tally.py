"""The sidecar exporter's accounting: what was sent, spooled, retried, and dropped by reason.

Every drop is logged with its reason and counted twice: in the exporter's own :meth:`stats` and,
once bound, in the recorder's :class:`~integrations._metrics.RecorderMetrics` (so the recorder
does not count an exporter FAILURE again). The spool's size is mirrored into the
``forensics_recorder_spool_bytes`` gauge.

Example::

    tally = ExportTally(spool=spool, metrics=None)
    tally.count("acked")
    tally.drop("spool_full", "inc-1", "the spool holds 1 GiB")
    tally.stats()   # {'acked': 1, 'dropped': {'spool_full': 1}, 'spool_bytes': ..., ...}
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .._metrics import RecorderMetrics
    from ._spool import DiskSpool

__all__ = ["ExportTally"]

_log = logging.getLogger("integrations.exporters._sidecar")  # the SidecarExporter's log


class ExportTally:
    """Counters of one exporter (thread-safe); see the module doc."""

    def __init__(self, *, spool: DiskSpool | None, metrics: RecorderMetrics | None) -> None:
        self._spool = spool
        self._metrics = metrics
        self._lock = threading.Lock()
        self._stats: Counter[str] = Counter()
        self._drops: Counter[str] = Counter()

    def after_fork(self) -> None:
        """In a forked child: a fresh lock (the parent's may be held forever); counts stay."""
        self._lock = threading.Lock()

    def bind(self, metrics: RecorderMetrics) -> None:
        """Report drops and the spool size to ``metrics`` from now on."""
        self._metrics = metrics
        self.update_spool_gauge()

    @property
    def counts_own_drops(self) -> bool:
        """True once drops are counted in bound metrics."""
        return self._metrics is not None

    def count(self, key: str, n: float = 1) -> None:
        with self._lock:
            self._stats[key] += n  # type: ignore[assignment]

    def drop(self, reason: str, incident_id: str, why: str) -> None:
        """Log and count one dropped incident (``reason``: a recorder drop reason)."""
        _log.warning("SidecarExporter: incident %s dropped (%s): %s", incident_id, reason, why)
        with self._lock:
            self._drops[reason] += 1
        if self._metrics is not None:
            self._metrics.dropped(reason)

    def update_spool_gauge(self) -> None:
        if self._metrics is not None and self._spool is not None:
            self._metrics.spool_bytes.set(self._spool.nbytes)

    def stats(self) -> dict[str, Any]:
        """acked (direct), spooled, drained (acked from the spool), retries, backoff_s (total
        slept), dropped by reason, spool bytes and entries."""
        with self._lock:
            out: dict[str, Any] = dict(self._stats)
            out["dropped"] = dict(self._drops)
        for k in ("acked", "spooled", "drained", "retries"):
            out.setdefault(k, 0)
        out.setdefault("backoff_s", 0.0)
        out["spool_bytes"] = 0 if self._spool is None else self._spool.nbytes
        out["spool_entries"] = 0 if self._spool is None else len(self._spool)
        return out
