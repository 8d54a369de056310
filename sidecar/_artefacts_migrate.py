"""Moving a sidecar's baselines and probes from ``<data_dir>`` to a shared store (``store.uri``).

``forensics baseline to-store --config cfg.yaml`` (run on each sidecar that has its own
``<data_dir>/baselines`` / ``probes``, with the new ``store.uri`` in its config; a DuckDB index
must not be in use): every ``baselines`` / ``probes`` row of the catalog whose file is on this
sidecar's disk is copied to the same path under ``store.uri``, and a row from before digests
were recorded gets the sha256 of that file (the operator vouches for the local disk at this
moment; a row that has one must match it, else the file is reported altered and not copied).
Rows whose object already is in the store (checked) are left alone; rows with neither are
reported (rebuild those, or run this on the sidecar that has them). Idempotent.

Example::

    report = copy_to_store(cfg, open_catalog(cfg))
    report.copied, report.absent          # 3, ['baselines/tenant-acme/f00d/norm-v0001.npz']
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from integrations.errors import ArtefactError, ConfigError

from ._artefacts import artefact_ref, put_artefact, read_artefact

if TYPE_CHECKING:
    from ._catalog import Catalog
    from ._config import SidecarConfig

__all__ = ["CopyReport", "copy_to_store"]

#: (table, what, its primary-key columns besides ``version``).
_TABLES = (("baselines", "baseline", ("scope", "fingerprint", "detector")),
           ("probes", "probe", ("tenant", "fingerprint")))


@dataclasses.dataclass
class CopyReport:
    """What :func:`copy_to_store` did, by object path."""

    copied: list[str] = dataclasses.field(default_factory=list)
    already: list[str] = dataclasses.field(default_factory=list)
    absent: list[str] = dataclasses.field(default_factory=list)
    altered: list[str] = dataclasses.field(default_factory=list)


def copy_to_store(config: SidecarConfig, catalog: Catalog) -> CopyReport:
    """Copy the catalog's baselines and probes from ``<data_dir>`` to ``store.uri`` (module
    doc). :class:`ConfigError` when ``store.uri`` is not set."""
    if config.store.is_local:
        raise ConfigError("store.uri is not set: baselines and probes already live in "
                          f"{config.data_dir}; set store.uri to the shared store first")
    report = CopyReport()
    for table, what, key in _TABLES:
        for row in catalog.read_dicts(f"SELECT * FROM {table} ORDER BY version"):
            rel, want = str(row["path"]), str(row.get("sha256") or "")
            local = Path(config.data_dir) / rel
            if not local.is_file():
                found = bool(want) and _in_store(config, row, what)
                (report.already if found else report.absent).append(rel)
                continue
            data = local.read_bytes()
            sha = hashlib.sha256(data).hexdigest()
            if want and sha != want:
                report.altered.append(rel)
                continue
            put_artefact(config, rel, data)
            if not want:
                where = " AND ".join(f"{k} = ?" for k in (*key, "version"))
                with catalog.write() as con:
                    con.execute(f"UPDATE {table} SET sha256 = ? WHERE {where}",
                                [sha, *(row[k] for k in (*key, "version"))])
            report.copied.append(rel)
    return report


def _in_store(config: SidecarConfig, row: dict[str, object], what: str) -> bool:
    try:
        read_artefact(config, artefact_ref(row, what=what))
    except ArtefactError:
        return False
    return True
