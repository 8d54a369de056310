"""Exporters: where finished incidents go (memory, Arrow files, the sidecar over gRPC).

Example::

    from integrations import exporters
    ex = exporters.InMemoryExporter()
    ex = exporters.ArrowFileExporter("./incidents")
    ex = exporters.SidecarExporter("127.0.0.1:7431")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._base import Exporter, ExportResult
from ._file import ArrowFileExporter
from ._memory import InMemoryExporter

if TYPE_CHECKING:
    from ._sidecar import SidecarExporter, TLSConfig

__all__ = [
    "ArrowFileExporter",
    "ExportResult",
    "Exporter",
    "InMemoryExporter",
    "SidecarExporter",
    "TLSConfig",
]


def __getattr__(name: str) -> Any:  # lazy: the gRPC client is only imported when used
    if name in ("SidecarExporter", "TLSConfig"):
        from . import _sidecar

        return getattr(_sidecar, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
