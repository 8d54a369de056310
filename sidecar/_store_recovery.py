"""Index rows rebuilt from the files: receipts, start-up reconciliation, reindexing, quarantine.

The Arrow files are the source of truth. Beside each ``incidents/<tenant dir>/<id>.arrow`` (the
layout: :mod:`sidecar._store_layout`) the store keeps a small receipt ``<id>.json`` (tenant,
received_at, digests) — the facts the index row needs that the file does not hold — so
:func:`reconcile` rebuilds the index exactly: stray temp files are removed, receipts without a
file dropped, rows whose file is gone deleted, unindexed files (or, for a full reindex, every
file) re-validated and indexed; files that fail validation, or whose owner cannot be told,
move to ``<root>/quarantine/``. An incident's tenant is its receipt's when the receipt matches
the file and names this directory's tenant, else the directory's own name (``t-<name>``,
``no-tenant``), else the manifest's ``request.tenant`` when that names this directory.

Example::

    report = reconcile(incidents_dir, quarantine_dir, index, full=True)
    report.indexed, report.quarantined          # (12, ['t-acme/inc-7'])
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from integrations.errors import IncidentFormatError

from ._store_index import IncidentRow, row_from_manifest, utcnow
from ._store_layout import is_tenant_dir, stored_path, tenant_dir, tenant_from_dir

if TYPE_CHECKING:
    from ._catalog import Catalog

__all__ = ["FileListing", "ReindexReport", "manifest_tenant", "quarantine", "read_receipt",
           "receipt_bytes", "reconcile", "reconcile_listing", "row_from_file"]

log = logging.getLogger("sidecar.store")


@dataclasses.dataclass
class ReindexReport:
    """What :meth:`LocalStore.reindex` / start-up recovery did (``quarantined``: ``<tenant
    dir>/<id>``, or ``<id>`` for a file of the old flat layout)."""

    indexed: int = 0
    kept: int = 0
    removed_rows: int = 0
    quarantined: list[str] = dataclasses.field(default_factory=list)
    tmp_removed: int = 0
    #: Incidents moved from the old flat layout into their tenant's directory.
    migrated: int = 0


def receipt_bytes(row: IncidentRow) -> bytes:
    """The receipt of a stored row: what reindexing cannot read from the file."""
    return json.dumps({"tenant": row.tenant, "received_at": row.received_at.isoformat(),
                       "sha256": row.sha256, "content_sha256": row.content_sha256,
                       "crc32c": row.crc32c}).encode("utf-8")


def manifest_tenant(manifest: Mapping[str, Any]) -> str:
    """The tenant a manifest names (``request.tenant``), else ``""``."""
    return str((manifest.get("request") or {}).get("tenant") or "")


def read_receipt(path: Path) -> dict[str, Any]:
    """A receipt's fields ({} when it is missing or not a JSON object)."""
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return fields if isinstance(fields, dict) else {}


def _owner(fields: Mapping[str, Any], manifest: Mapping[str, Any],
           dir_name: str | None) -> str | None:
    """The tenant owning a file (module doc); ``dir_name`` None: a file of the flat layout
    (the receipt's tenant, else the manifest's)."""
    found = fields.get("tenant")
    candidates = [str(found) if isinstance(found, str) else None, manifest_tenant(manifest)]
    if dir_name is None:
        return next(t for t in candidates if t is not None)
    candidates.insert(1, tenant_from_dir(dir_name))
    return next((t for t in candidates if t is not None and tenant_dir(t) == dir_name), None)


def _matches(fields: Mapping[str, Any], digest: str, crc: int,
             manifest: Mapping[str, Any]) -> bool:
    """Whether a receipt belongs to this file: the same file sha256, or — written while the row
    was pending — the same content digest and CRC32C."""
    content = fields.get("content_sha256")
    return fields.get("sha256") == digest or bool(
        content and content == manifest["integrity"]["sha256"] and fields.get("crc32c") == crc)


def row_from_file(path: Path, *, dir_name: str | None) -> IncidentRow:
    """The index row of a stored file: re-validated (rows' digest included), re-hashed, its
    receipt when it matches; ``dir_name``: its tenant directory (None: the old flat layout)."""
    from integrations._crc32c import crc32c
    from integrations.incident import Incident

    data = path.read_bytes()
    inc = Incident.from_bytes(data)
    if inc.id != path.stem:
        raise IncidentFormatError(f"{path.name} holds incident {inc.id!r}")
    digest, crc = hashlib.sha256(data).hexdigest(), crc32c(data)
    manifest = inc.manifest
    fields = read_receipt(path.with_suffix(".json"))
    if not _matches(fields, digest, crc, manifest):
        fields = {}
    tenant = _owner(fields, manifest, dir_name)
    if tenant is None:
        raise IncidentFormatError(f"cannot tell which tenant owns {dir_name}/{path.name}: its "
                                  "receipt is missing or does not match the file")
    received_at = fields.get("received_at")
    sites = manifest.get("sites")
    return row_from_manifest(
        manifest, tenant=tenant, size_bytes=len(data), sha256=digest,
        path=stored_path(tenant, inc.id), crc32c=crc,
        received_at=dt.datetime.fromisoformat(received_at) if received_at else utcnow(),
        n_sites=len(sites) if isinstance(sites, list) else 0)


def quarantine(path: Path, quarantine_dir: Path, error: Exception, *,
               dir_name: str | None) -> str:
    """Move an invalid file (and drop its receipt) to ``quarantine/[<tenant dir>/]``; its name
    in the report."""
    target = quarantine_dir if dir_name is None else quarantine_dir / dir_name
    target.mkdir(parents=True, exist_ok=True)
    log.error("incident file %s is invalid (%s); moved to %s", path, error, target)
    os.replace(path, target / path.name)
    path.with_suffix(".json").unlink(missing_ok=True)
    return path.stem if dir_name is None else f"{dir_name}/{path.stem}"


def _remove_tmp(directory: Path, report: ReindexReport, *,
                before: float | None = None) -> None:
    """Remove the temp files in ``directory`` — only those last written before ``before`` (a
    time stamp) when given: a reconciliation while the store runs (the catalog's back-fill) must
    not remove the temp file of an upload still streaming in."""
    for tmp in directory.glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            if before is None or tmp.stat().st_mtime < before:
                tmp.unlink(missing_ok=True)
                report.tmp_removed += 1


def _sweep(incidents_dir: Path, report: ReindexReport, *,
           tmp_before: float | None = None) -> dict[tuple[str, str], Path]:
    """Remove temp files (written before ``tmp_before``, when given) and receipts without a
    file; the incident files by (dir, id)."""
    _remove_tmp(incidents_dir, report, before=tmp_before)
    files: dict[tuple[str, str], Path] = {}
    for d in sorted(incidents_dir.iterdir()):
        if not d.is_dir() or not is_tenant_dir(d.name):
            continue
        _remove_tmp(d, report, before=tmp_before)
        files.update({(d.name, p.stem): p for p in d.glob("*.arrow")})
        for receipt in d.glob("*.json"):
            if (d.name, receipt.stem) not in files:
                receipt.unlink(missing_ok=True)
    return files


class FileListing(Protocol):
    """The file side :func:`reconcile_listing` works on: local directories or an object
    store (:mod:`sidecar._incident_files_fs`); a ``handle`` names one incident file."""

    def sweep(self, report: ReindexReport) -> dict[tuple[str, str], Any]:
        """Remove temp files and receipts without a file; the incident files by (dir, id)."""
        ...

    def row_of(self, handle: Any, dir_name: str) -> IncidentRow:
        """The file's index row (re-validated; :func:`row_from_file`)."""
        ...

    def quarantine_file(self, handle: Any, error: Exception, dir_name: str) -> str:
        """Move an invalid file to quarantine; its name in the report."""
        ...

    def still_stored(self, dir_name: str, incident_id: str) -> bool:
        """Whether the incident's file exists now (a sidecar sharing the catalog and the files
        may have stored it after :meth:`sweep` listed them)."""
        ...


class _LocalListing:
    def __init__(self, incidents_dir: Path, quarantine_dir: Path,
                 tmp_before: float | None) -> None:
        self.incidents_dir, self.quarantine_dir = incidents_dir, quarantine_dir
        self.tmp_before = tmp_before

    def sweep(self, report: ReindexReport) -> dict[tuple[str, str], Any]:
        return _sweep(self.incidents_dir, report, tmp_before=self.tmp_before)

    def row_of(self, handle: Any, dir_name: str) -> IncidentRow:
        return row_from_file(handle, dir_name=dir_name)

    def quarantine_file(self, handle: Any, error: Exception, dir_name: str) -> str:
        return quarantine(handle, self.quarantine_dir, error, dir_name=dir_name)

    def still_stored(self, dir_name: str, incident_id: str) -> bool:
        return (self.incidents_dir / dir_name / f"{incident_id}.arrow").exists()


def reconcile(incidents_dir: Path, quarantine_dir: Path, index: Catalog, *, full: bool,
              report: ReindexReport | None = None,
              tmp_before: float | None = None) -> ReindexReport:
    """Make the index agree with the files under ``incidents_dir`` (module doc); the caller
    holds the store's write lock. ``full``: re-validate and re-index every file, not only
    unindexed ones; ``tmp_before``: remove only temp files written before it (module doc of
    :func:`_remove_tmp`)."""
    return reconcile_listing(_LocalListing(incidents_dir, quarantine_dir, tmp_before), index,
                             full=full, report=report)


def reconcile_listing(listing: FileListing, index: Catalog, *, full: bool,
                      report: ReindexReport | None = None) -> ReindexReport:
    """:func:`reconcile` over any :class:`FileListing` (a local directory, an object store)."""
    report = report or ReindexReport()
    files = listing.sweep(report)
    indexed = index.incident_paths()
    by_file = {(tenant_dir(t), i): (t, i) for t, i in indexed}
    for gone in sorted(set(by_file) - set(files)):
        tenant, incident_id = by_file[gone]
        if listing.still_stored(gone[0], incident_id):
            continue   # stored meanwhile by another sidecar sharing the catalog and files
        index.delete_incident(incident_id, tenant=tenant)
        report.removed_rows += 1
    for (dir_name, incident_id), path in sorted(files.items()):
        owner = by_file.get((dir_name, incident_id))
        if owner is not None and not full:
            report.kept += 1
            if indexed[owner] != stored_path(*owner):   # a row migrated from the flat layout
                with index.write() as con:
                    con.execute("UPDATE incidents SET path = ? WHERE tenant = ? AND id = ?",
                                [stored_path(*owner), *owner])
            continue
        _index_file(index, listing, path, dir_name, owner, report)
    return report


def _index_file(index: Catalog, listing: FileListing, path: Any, dir_name: str,
                owner: tuple[str, str] | None, report: ReindexReport) -> None:
    """(Re-)index one file, or quarantine it (dropping the row it had)."""
    try:
        row = listing.row_of(path, dir_name)
    except (IncidentFormatError, OSError, ValueError) as e:
        report.quarantined.append(listing.quarantine_file(path, e, dir_name))
        if owner is not None:
            index.delete_incident(owner[1], tenant=owner[0])
        return
    with index.write() as con:
        con.execute("DELETE FROM incidents WHERE tenant = ? AND id = ?", [row.tenant, row.id])
        index.insert_incident(con, row)
    report.indexed += 1
