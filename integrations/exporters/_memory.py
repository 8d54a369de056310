"""An exporter that keeps incidents in a list: for tests, notebooks and the demo.

Example::

    ex = InMemoryExporter()
    rec = Recorder(model, exporter=ex)
    ...
    rec.force_flush(timeout_s=10)
    inc = ex.incidents[-1]
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from ._base import ExportResult

if TYPE_CHECKING:
    from ..incident import Incident

__all__ = ["InMemoryExporter"]


class InMemoryExporter:
    """Stores every exported incident in :attr:`incidents` (bounded by ``max_incidents``)."""

    def __init__(self, *, max_incidents: int | None = None) -> None:
        self._lock = threading.Lock()
        self._incidents: list[Incident] = []
        self._max = max_incidents
        self._closed = False

    @property
    def incidents(self) -> list[Incident]:
        """A snapshot list of the incidents exported so far, oldest first."""
        with self._lock:
            return list(self._incidents)

    def clear(self) -> None:
        with self._lock:
            self._incidents.clear()

    def export(self, incident: Incident) -> ExportResult:
        with self._lock:
            if self._closed:
                return ExportResult.FAILURE
            if self._max is not None and len(self._incidents) >= self._max:
                return ExportResult.FAILURE
            self._incidents.append(incident)
        return ExportResult.SUCCESS

    def force_flush(self, timeout_s: float = 30.0) -> bool:
        return True

    def shutdown(self, timeout_s: float = 30.0) -> None:
        with self._lock:
            self._closed = True
