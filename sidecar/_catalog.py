"""The catalog seam (DESIGN §12): where the store's index rows, the job queue and the analysis
result tables live. :class:`Catalog` is what the store, recovery, the job queue and the job
kinds use of it; :func:`open_catalog` picks the implementation from the ``catalog:`` config
section — the embedded DuckDB file ``<data_dir>/index.duckdb`` (default, one per sidecar:
:class:`~sidecar._store_index.Index`) or one PostgreSQL database shared by a fleet
(:class:`~sidecar._catalog_postgres.PostgresCatalog`). Both run the same SQL text
(``?`` parameters) on the same schema (:mod:`sidecar._schema`); what an engine may differ in is
named on :class:`~sidecar._store_index.CatalogBase`: DDL types (``ddl``), the join of each
incident's current CF result (``cf_join``: DuckDB's QUALIFY or a LATERAL join, same rows),
secondary ``indexes``, cross-sidecar ``lock`` (advisory locks), and whether it is ``shared``.

Example::

    catalog = open_catalog(config)                # kind duckdb → <data_dir>/index.duckdb
    with catalog.write() as con:
        con.execute("UPDATE incidents SET failure_p = ? WHERE id = ? AND tenant = ?",
                    [0.9, "inc-1", "acme"])
    catalog.read("SELECT id FROM incidents WHERE tenant = ?", ["acme"])
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from integrations.errors import ConfigError

if TYPE_CHECKING:
    from ._config import SidecarConfig
    from ._store_index import IncidentRow

__all__ = ["Catalog", "open_catalog"]


class Catalog(Protocol):
    """What the sidecar needs of a catalog (every method is thread-safe)."""

    #: Whether several sidecars share it (jobs then carry leases, see ``JobQueue``).
    shared: bool

    def read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    def read_dicts(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]: ...

    def write(self) -> contextlib.AbstractContextManager[Any]: ...

    def lock(self, con: Any, name: str) -> None: ...

    def insert_incident(self, con: Any, row: IncidentRow) -> None: ...

    def get_incident(self, incident_id: str, *, tenant: str) -> IncidentRow | None: ...

    def find_incident(self, incident_id: str) -> list[IncidentRow]: ...

    def query_incidents(self, where_sql: str, params: Sequence[Any], order_sql: str, *,
                        limit: int, offset: int) -> list[IncidentRow]: ...

    def count_incidents(self, where_sql: str, params: Sequence[Any]) -> int: ...

    def has_incident(self, incident_id: str, *, tenant: str) -> bool: ...

    def incident_ids(self) -> set[str]: ...

    def pending_keys(self) -> list[tuple[str, str]]: ...

    def mark_verified(self, incident_id: str, sha256: str, *, tenant: str) -> None: ...

    def incident_paths(self) -> dict[tuple[str, str], str]: ...

    def delete_incident(self, incident_id: str, *, tenant: str) -> bool: ...

    def close(self) -> None: ...


def open_catalog(config: SidecarConfig, *, root: str | os.PathLike[str] | None = None,
                 environ: os._Environ[str] | dict[str, str] | None = None) -> Catalog:
    """The catalog ``config.catalog`` names: DuckDB at ``<root>/index.duckdb`` (``root``
    defaults to ``config.data_dir``), or PostgreSQL at the DSN in the environment variable
    ``catalog.dsn_env`` (:class:`ConfigError` naming the key when it is unset or empty;
    :class:`~integrations.errors.CatalogUnavailableError` when the server does not answer)."""
    cfg = config.catalog
    if cfg.kind == "duckdb":
        from ._store_index import Index

        directory = Path(config.data_dir if root is None else root)
        directory.mkdir(parents=True, exist_ok=True)
        return Index(directory / "index.duckdb")
    env = os.environ if environ is None else environ
    dsn = env.get(cfg.dsn_env, "")
    if not dsn.strip():
        raise ConfigError(f"catalog.kind is postgres but the environment variable "
                          f"{cfg.dsn_env} (catalog.dsn_env) is unset or empty; export the "
                          "libpq DSN there, e.g. 'host=db dbname=forensics user=forensics "
                          "password=…' (never in the YAML)")
    from ._catalog_postgres import PostgresCatalog

    return PostgresCatalog(dsn, connect_timeout_s=cfg.connect_timeout_s,
                           where=f"catalog.kind=postgres via ${cfg.dsn_env}")
