"""Migrating a data directory of the old flat layout to one directory per tenant, on open.

Before ids were unique per tenant, incidents were stored flat: ``incidents/<id>.arrow`` beside
``incidents/<id>.json``. When a :class:`~sidecar.LocalStore` opens, before reconciling, every
flat incident moves into its tenant's directory (:mod:`sidecar._store_layout`): the owner is its
index row's tenant when the row points at the flat file, else (a file that was never indexed)
its receipt's tenant when the receipt matches the file, else the manifest's ``request.tenant``.

Crash-safe by construction: each step is a rename within one filesystem, the Arrow file moves
before its receipt, directories are fsynced after each incident, and every step can be redone.
A crash leaves each file either still flat (moved at the next open) or in its tenant's
directory; a flat receipt whose file already moved is put beside that file at the next open
(its tenant says where), or removed when there is no such file; an index ``path`` still naming
the flat file is corrected by :func:`~sidecar._store_recovery.reconcile`. A flat file of
another tenant's id that already exists in the new layout, and a file that is not a valid
incident, go to ``quarantine/`` (nothing is overwritten).

Example::

    report = ReindexReport()
    migrate_flat(root / "incidents", root / "quarantine", index, report)
    report.migrated                                  # incidents moved
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from integrations.errors import IncidentFormatError
from integrations.incident import fsync_dir

from ._store_files import _write_tmp
from ._store_index import IncidentRow
from ._store_layout import incident_file, receipt_file, tenant_dir
from ._store_recovery import ReindexReport, quarantine, read_receipt, receipt_bytes, row_from_file

if TYPE_CHECKING:
    from ._catalog import Catalog

__all__ = ["migrate_flat"]

log = logging.getLogger("sidecar.store")


def migrate_flat(incidents_dir: Path, quarantine_dir: Path, index: Catalog,
                 report: ReindexReport) -> None:
    """Move every incident of the flat layout into its tenant's directory (module doc); the
    caller holds the store's write lock."""
    for receipt in sorted(incidents_dir.glob("*.json")):
        if not receipt.with_suffix(".arrow").exists():
            _place_receipt(incidents_dir, receipt)
    for path in sorted(incidents_dir.glob("*.arrow")):
        _migrate(incidents_dir, quarantine_dir, index, path, report)
    if report.migrated:
        log.info("moved %d incident(s) of the flat layout into per-tenant directories",
                 report.migrated)


def _place_receipt(incidents_dir: Path, receipt: Path) -> None:
    """A flat receipt whose file already moved (a crash in between): beside that file."""
    tenant = read_receipt(receipt).get("tenant")
    if isinstance(tenant, str) and incident_file(incidents_dir, tenant, receipt.stem).exists() \
            and not receipt_file(incidents_dir, tenant, receipt.stem).exists():
        target = receipt_file(incidents_dir, tenant, receipt.stem)
        os.replace(receipt, target)
        fsync_dir(target.parent)
    else:
        receipt.unlink(missing_ok=True)


def _owner(index: Catalog, path: Path) -> tuple[str, IncidentRow | None]:
    """The flat file's tenant, and its index row when it has one (module doc)."""
    flat = f"incidents/{path.name}"
    rows = [r for r in index.find_incident(path.stem) if r.path == flat]
    if rows:
        return rows[0].tenant, rows[0]
    return row_from_file(path, dir_name=None).tenant, None


def _migrate(incidents_dir: Path, quarantine_dir: Path, index: Catalog, path: Path,
             report: ReindexReport) -> None:
    incident_id = path.stem
    try:
        tenant, row = _owner(index, path)
    except (IncidentFormatError, OSError, ValueError) as e:
        report.quarantined.append(quarantine(path, quarantine_dir, e, dir_name=None))
        return
    target = incident_file(incidents_dir, tenant, incident_id)
    if target.exists():   # never overwrite an incident of the new layout
        report.quarantined.append(quarantine(
            path, quarantine_dir, FileExistsError(f"{target} exists"), dir_name=None))
        return
    if not target.parent.exists():
        target.parent.mkdir()
        fsync_dir(incidents_dir)
    os.replace(path, target)
    flat_receipt = path.with_suffix(".json")
    if flat_receipt.exists():
        os.replace(flat_receipt, receipt_file(incidents_dir, tenant, incident_id))
    elif row is not None:   # indexed without a receipt: write the one reindexing needs
        tmp = _write_tmp(target.parent, incident_id, receipt_bytes(row))
        os.replace(tmp, receipt_file(incidents_dir, tenant, incident_id))
    fsync_dir(target.parent)
    fsync_dir(incidents_dir)
    report.migrated += 1
    log.debug("moved %s to %s/", path.name, tenant_dir(tenant))
