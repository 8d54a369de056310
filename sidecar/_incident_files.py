"""Where an incident's bytes and receipt live: the file side of the store (DESIGN §12).

:class:`IncidentFiles` is what :class:`~sidecar._store.LocalStore` needs of the place that holds
the Arrow files and their receipts — write (stage, then publish), read (a local path, chunks),
delete, quarantine, and the file side of recovery. The index side (rows, queries) is not here.
Two implementations: :class:`LocalFiles` (``<data_dir>/incidents/``: today's layout, the
default) and :class:`sidecar._incident_files_fs.FsFiles` (any ``pyarrow.fs`` URI such as
``s3://bucket/prefix``, chosen by ``store.uri``). Both use the layout of
:mod:`sidecar._store_layout` (one directory per tenant; never a tenant name as a path).

Example::

    files = LocalFiles(Path("forensics-data"))
    receipt = files.stage_receipt("acme", "inc-1", b"{...}")     # outside the store's lock
    files.publish("acme", "inc-1", data=incoming.path, receipt=receipt)   # durable on return
    files.local_path("acme", "inc-1", row_of=lambda: None)       # .../t-acme/inc-1.arrow
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from integrations.incident import fsync_dir

from ._store_files import _write_tmp
from ._store_layout import incident_file, receipt_file, tenant_dir
from ._store_migration import migrate_flat
from ._store_recovery import ReindexReport, reconcile

if TYPE_CHECKING:
    from ._catalog import Catalog
    from ._store_index import IncidentRow

__all__ = ["IncidentFiles", "LocalFiles", "RowLookup"]

log = logging.getLogger("sidecar.verify")

#: How a file side finds an incident's index row when it needs one (to check a cached copy).
RowLookup = Callable[[], "IncidentRow | None"]


class IncidentFiles(Protocol):
    """The file side of an incident store: incidents and receipts by (tenant, id).

    ``spool_dir`` is the local directory uploads are received into (``IncomingFile``).
    ``publish`` returns only when the incident and then its receipt are durable where they
    live (a receipt therefore means a complete incident); it raises ``OSError`` or
    :class:`~sidecar._store_files.StoreUnavailableError`.
    """

    uri: str
    spool_dir: Path

    def stage_receipt(self, tenant: str, incident_id: str, receipt: bytes) -> Path: ...

    def publish(self, tenant: str, incident_id: str, *, data: Path, receipt: Path) -> None: ...

    def local_path(self, tenant: str, incident_id: str, *, row_of: RowLookup) -> Path: ...

    def read_chunks(self, tenant: str, incident_id: str, chunk_size: int) -> Iterator[bytes]: ...

    def delete(self, tenant: str, incident_id: str) -> None: ...

    def quarantine(self, tenant: str, incident_id: str, *, reason: str, detail: str) -> None: ...

    def reconcile(self, index: Catalog, *, full: bool, report: ReindexReport) -> ReindexReport: ...


class LocalFiles:
    """Incidents in ``<root>/incidents/<tenant dir>/<id>.arrow`` beside ``<id>.json``; invalid
    ones in ``<root>/quarantine/<tenant dir>/`` (the default store, unchanged since issue 14)."""

    def __init__(self, root: Path) -> None:
        self.incidents_dir = root / "incidents"
        self.quarantine_dir = root / "quarantine"
        self.incidents_dir.mkdir(parents=True, exist_ok=True)
        self.uri = str(root)
        #: Uploads are received beside the files they become (a rename publishes them).
        self.spool_dir = self.incidents_dir
        #: Temp files older than this are left by a previous run (removed by reconciling);
        #: newer ones belong to uploads in flight.
        self.opened_at = time.time()

    def _tenant_dir(self, tenant: str) -> Path:
        """The tenant's directory, created (and made durable) on first use."""
        directory = self.incidents_dir / tenant_dir(tenant)
        if not directory.is_dir():
            directory.mkdir(exist_ok=True)
            fsync_dir(self.incidents_dir)
        return directory

    def stage_receipt(self, tenant: str, incident_id: str, receipt: bytes) -> Path:
        """The receipt, fsynced in a temp file of the tenant's directory."""
        return _write_tmp(self._tenant_dir(tenant), incident_id, receipt)

    def publish(self, tenant: str, incident_id: str, *, data: Path, receipt: Path) -> None:
        """Rename the receipt, then the file, into place; fsync the directory."""
        os.replace(receipt, receipt_file(self.incidents_dir, tenant, incident_id))
        target = incident_file(self.incidents_dir, tenant, incident_id)
        os.replace(data, target)
        fsync_dir(target.parent)

    def local_path(self, tenant: str, incident_id: str, *, row_of: RowLookup) -> Path:
        """The stored file itself (which may not exist); ``row_of`` is not needed."""
        return incident_file(self.incidents_dir, tenant, incident_id)

    def read_chunks(self, tenant: str, incident_id: str, chunk_size: int) -> Iterator[bytes]:
        with open(incident_file(self.incidents_dir, tenant, incident_id), "rb") as f:
            while chunk := f.read(chunk_size):
                yield chunk

    def delete(self, tenant: str, incident_id: str) -> None:
        """The file first (a crash in between leaves a receipt that recovery drops)."""
        path = incident_file(self.incidents_dir, tenant, incident_id)
        path.unlink(missing_ok=True)
        receipt_file(self.incidents_dir, tenant, incident_id).unlink(missing_ok=True)
        fsync_dir(path.parent)

    def quarantine(self, tenant: str, incident_id: str, *, reason: str, detail: str) -> None:
        """Move the file to ``quarantine/<tenant dir>/`` with a reason file; drop its receipt."""
        target = self.quarantine_dir / tenant_dir(tenant)
        log.error("acknowledged incident %s failed its post-ack check (%s: %s); moved to %s",
                  incident_id, reason, detail, target)
        target.mkdir(parents=True, exist_ok=True)
        src = incident_file(self.incidents_dir, tenant, incident_id)
        if src.exists():
            os.replace(src, target / src.name)
        (target / f"{incident_id}.reason.json").write_text(
            json.dumps({"reason": reason, "detail": detail}), encoding="utf-8")
        receipt_file(self.incidents_dir, tenant, incident_id).unlink(missing_ok=True)
        fsync_dir(src.parent)

    def reconcile(self, index: Catalog, *, full: bool, report: ReindexReport) -> ReindexReport:
        """Migrate a flat layout, then make the index agree with the files."""
        migrate_flat(self.incidents_dir, self.quarantine_dir, index, report)
        return reconcile(self.incidents_dir, self.quarantine_dir, index, tmp_before=self.opened_at,
                         full=full,
                         report=report)
