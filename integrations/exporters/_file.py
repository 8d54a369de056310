"""An exporter that writes each incident to ``<dir>/<id>.arrow`` atomically.

The file is the incident format of DESIGN §3 (readable with ``Incident.open``). Writing is
tmp + fsync + rename, so a crash never leaves a half file under the final name.

Example::

    ex = ArrowFileExporter("./incidents")
    rec = Recorder(model, exporter=ex)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ._base import ExportResult

if TYPE_CHECKING:
    from ..incident import Incident

__all__ = ["ArrowFileExporter"]

_log = logging.getLogger(__name__)


class ArrowFileExporter:
    """Writes incidents as Arrow IPC stream files into ``directory`` (created if missing)."""

    def __init__(self, directory: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        self.directory = Path(directory)
        self.overwrite = overwrite
        self.paths: list[Path] = []
        self._by_request: dict[str, Path] = {}

    def path_for(self, incident_id: str) -> Path:
        return self.directory / f"{incident_id}.arrow"

    def path_for_request(self, request_id: str) -> Path | None:
        """Path of the last incident written for ``request_id`` (None if none was)."""
        return self._by_request.get(request_id)

    def export(self, incident: Incident) -> ExportResult:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.path_for(incident.id)
            if path.exists() and not self.overwrite:
                # Idempotent on the incident id: the same id is the same incident.
                self.paths.append(path)
                return ExportResult.SUCCESS
            incident.write(path)
        except OSError as e:
            _log.warning("ArrowFileExporter: could not write incident %s: %s", incident.id, e)
            return ExportResult.FAILURE
        self.paths.append(path)
        rid = (incident.manifest.get("request") or {}).get("id")
        if rid:
            self._by_request[str(rid)] = path
        return ExportResult.SUCCESS

    def force_flush(self, timeout_s: float = 30.0) -> bool:
        return True  # export() is synchronous and fsyncs before returning

    def shutdown(self, timeout_s: float = 30.0) -> None:
        return None
