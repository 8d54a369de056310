"""Exporters: where finished incidents go (memory, Arrow files, the sidecar over gRPC).

Example::

    from integrations import exporters
    ex = exporters.InMemoryExporter()
    ex = exporters.ArrowFileExporter("./incidents")
    ex = exporters.SidecarExporter("127.0.0.1:7431")
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports
from ._base import Exporter, ExportResult
from ._file import ArrowFileExporter
from ._memory import InMemoryExporter

if TYPE_CHECKING:
    from ._sidecar import SidecarExporter
    from ._upload import TLSConfig

__all__ = [
    "ArrowFileExporter",
    "ExportResult",
    "Exporter",
    "InMemoryExporter",
    "SidecarExporter",
    "TLSConfig",
]

# the gRPC client is only imported when used
__getattr__, __dir__ = lazy_exports(__name__, {"SidecarExporter": "._sidecar",
                                               "TLSConfig": "._upload"})
