"""The exporter protocol: where the recorder's worker thread delivers finished incidents.

Modelled on OpenTelemetry's ``SpanExporter``: a tiny protocol, called from one background
thread, never from the serving path. ``export`` returns an :class:`ExportResult`; a FAILURE is
counted by the recorder as a drop (``export_failed``) — an exporter that can retry or spool does
so *inside* ``export`` or on its own thread and only returns FAILURE once the incident is lost.

Example::

    class PrintExporter:
        def export(self, incident): print(incident.id); return ExportResult.SUCCESS
        def force_flush(self, timeout_s=30.0): return True
        def shutdown(self, timeout_s=30.0): pass
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ..incident import Incident

__all__ = ["ExportResult", "Exporter"]


class ExportResult(enum.Enum):
    """Outcome of one ``export`` call."""

    SUCCESS = "success"  # durable at the destination (or in a durable local spool)
    FAILURE = "failure"  # lost; the recorder counts it as dropped("export_failed")


@runtime_checkable
class Exporter(Protocol):
    """Receives finished incidents on the recorder's worker thread."""

    def export(self, incident: Incident) -> ExportResult:
        """Deliver one incident; never raise for delivery problems (return FAILURE)."""
        ...

    def force_flush(self, timeout_s: float = 30.0) -> bool:
        """Block until everything accepted so far is delivered; False on timeout."""
        ...

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Flush and release resources; later ``export`` calls return FAILURE."""
        ...
