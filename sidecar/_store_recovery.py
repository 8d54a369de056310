"""Index rows rebuilt from the files: receipts, start-up reconciliation, reindexing, quarantine.

The Arrow files are the source of truth. Beside each ``incidents/<id>.arrow`` the store keeps a
small receipt ``incidents/<id>.json`` (tenant, received_at, digests) — the facts the index row
needs that the file does not hold — so :func:`reconcile` rebuilds the index exactly: stray temp
files are removed, receipts without a file dropped, rows whose file is gone deleted, unindexed
files (or, for a full reindex, every file) re-validated and indexed; files that fail validation
move to ``<root>/quarantine/``.

Example::

    receipt_path(incidents_dir, "inc-1")        # incidents/inc-1.json
    report = reconcile(incidents_dir, quarantine_dir, index, full=True)
    report.indexed, report.quarantined
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from integrations.errors import IncidentFormatError

from ._store_index import IncidentRow, Index, row_from_manifest, utcnow

__all__ = ["ReindexReport", "manifest_tenant", "receipt_bytes", "receipt_path", "reconcile",
           "stored_path"]

log = logging.getLogger("sidecar.store")


@dataclasses.dataclass
class ReindexReport:
    """What :meth:`LocalStore.reindex` / start-up recovery did."""

    indexed: int = 0
    kept: int = 0
    removed_rows: int = 0
    quarantined: list[str] = dataclasses.field(default_factory=list)
    tmp_removed: int = 0


def stored_path(incident_id: str) -> str:
    """An incident's file, relative to the store root (the index's ``path`` column)."""
    return f"incidents/{incident_id}.arrow"


def receipt_path(incidents_dir: Path, incident_id: str) -> Path:
    """The receipt beside an incident's Arrow file."""
    return incidents_dir / f"{incident_id}.json"


def receipt_bytes(row: IncidentRow) -> bytes:
    """The receipt of a stored row: what reindexing cannot read from the file."""
    return json.dumps({"tenant": row.tenant, "received_at": row.received_at.isoformat(),
                       "sha256": row.sha256, "content_sha256": row.content_sha256,
                       "crc32c": row.crc32c}).encode("utf-8")


def manifest_tenant(manifest: Mapping[str, Any]) -> str:
    """The tenant a manifest names (``request.tenant``), else ``""``."""
    return str((manifest.get("request") or {}).get("tenant") or "")


def _row_from_file(incidents_dir: Path, incident_id: str, path: Path) -> IncidentRow:
    """The index row of a stored file: re-validated (rows' digest included), re-hashed, its
    receipt when it matches (same file sha256, or — written while the row was pending — the
    same content digest and CRC32C)."""
    from integrations._crc32c import crc32c
    from integrations.incident import Incident

    data = path.read_bytes()
    inc = Incident.from_bytes(data)
    if inc.id != incident_id:
        raise IncidentFormatError(f"{path.name} holds incident {inc.id!r}")
    digest, crc = hashlib.sha256(data).hexdigest(), crc32c(data)
    manifest = inc.manifest
    tenant, received_at = None, None
    receipt = receipt_path(incidents_dir, incident_id)
    if receipt.exists():
        fields = json.loads(receipt.read_text(encoding="utf-8"))
        content = fields.get("content_sha256")
        if fields.get("sha256") == digest or (
                content and content == manifest["integrity"]["sha256"]
                and fields.get("crc32c") == crc):
            tenant, received_at = fields.get("tenant"), fields.get("received_at")
    sites = manifest.get("sites")
    return row_from_manifest(
        manifest, tenant=manifest_tenant(manifest) if tenant is None else str(tenant),
        size_bytes=len(data), sha256=digest, path=stored_path(incident_id), crc32c=crc,
        received_at=dt.datetime.fromisoformat(received_at) if received_at else utcnow(),
        n_sites=len(sites) if isinstance(sites, list) else 0)


def _quarantine(path: Path, quarantine_dir: Path, error: Exception) -> None:
    quarantine_dir.mkdir(exist_ok=True)
    log.error("incident file %s is invalid (%s); moved to %s", path, error, quarantine_dir)
    os.replace(path, quarantine_dir / path.name)
    receipt_path(path.parent, path.stem).unlink(missing_ok=True)


def _sweep(incidents_dir: Path, report: ReindexReport) -> dict[str, Path]:
    """Remove temp files and receipts without a file; the incident files by id."""
    for tmp in incidents_dir.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        report.tmp_removed += 1
    files = {p.stem: p for p in incidents_dir.glob("*.arrow")}
    for receipt in incidents_dir.glob("*.json"):
        if receipt.stem not in files:
            receipt.unlink(missing_ok=True)
    return files


def reconcile(incidents_dir: Path, quarantine_dir: Path, index: Index, *,
              full: bool) -> ReindexReport:
    """Make the index agree with the files (module doc); the caller holds the store's write
    lock. ``full``: re-validate and re-index every file, not only unindexed ones."""
    report = ReindexReport()
    files = _sweep(incidents_dir, report)
    indexed = index.incident_ids()
    for gone in sorted(indexed - set(files)):
        index.delete_incident(gone)
        report.removed_rows += 1
    for incident_id, path in sorted(files.items()):
        if incident_id in indexed and not full:
            report.kept += 1
            continue
        try:
            row = _row_from_file(incidents_dir, incident_id, path)
        except (IncidentFormatError, OSError, ValueError) as e:
            _quarantine(path, quarantine_dir, e)
            report.quarantined.append(incident_id)
            if incident_id in indexed:
                index.delete_incident(incident_id)
            continue
        with index.write() as con:
            con.execute("DELETE FROM incidents WHERE id = ?", [incident_id])
            index.insert_incident(con, row)
        report.indexed += 1
    return report
