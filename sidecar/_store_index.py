"""The catalog's incident SQL (:class:`CatalogBase`, shared by every engine) and the embedded
DuckDB catalog of the local store (:class:`Index`): ``incidents``, ``jobs`` and ``analyses``
tables and the analysis result tables (their schema is :mod:`sidecar._schema`). The shared
PostgreSQL catalog is :mod:`sidecar._catalog_postgres`; the seam is :mod:`sidecar._catalog`.

One DuckDB connection owns every write, behind one lock (DuckDB is a single-writer engine);
reads use short-lived cursors (own connections to the same database, MVCC snapshots). All SQL is
parameterised; identifiers only ever come from constants or the filter whitelist.

Example::

    idx = Index(Path("forensics-data/index.duckdb"))
    with idx.write() as con:
        con.execute("DELETE FROM incidents WHERE id = ?", ["inc-1"])
    rows = idx.read("SELECT id FROM incidents WHERE tenant = ?", ["acme"])
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import datetime as dt
import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ._schema import (
    CATALOG_DDL,
    MIGRATIONS,
    RESULT_DDL,
    RESULT_TABLES,
    SCHEMA_VERSION,
    migrate,
    needed,
)

__all__ = [
    "CF_JOIN_LATERAL",
    "CF_LISTING_COLUMNS",
    "CF_ROW_COLUMNS",
    "INCIDENT_COLUMNS",
    "SCORE_COLUMNS",
    "CatalogBase",
    "IncidentRow",
    "Index",
    "listing_from",
    "row_from_manifest",
    "utcnow",
]

INCIDENT_COLUMNS = (
    "id", "tenant", "created_at", "received_at", "model_name", "model_fingerprint",
    "trigger_rule", "trigger_reason", "request_id", "traceparent", "size_bytes", "sha256",
    "activations", "n_sites", "path", "manifest_json", "content_sha256", "crc32c", "integrity",
)


#: Columns the incident listing gains from the incident's current CF result (see
#: :func:`listing_from`): filterable / sortable in ``ListIncidents`` (``sidecar._filters``).
CF_LISTING_COLUMNS = ("anomaly_score", "anomaly_p", "cf_flagged", "cf_status")

# The current CF result of each incident: its newest scored result, else its newest result
# (``no_baseline`` / ``no_activations``: status set, score and flag NULL). Constant SQL; every
# value of a query on the listing stays a ``?`` parameter of the WHERE clause. DuckDB's form
# (QUALIFY: one window over the results, measured faster on DuckDB than the lateral join);
# engines without QUALIFY use :data:`CF_JOIN_LATERAL` (``CatalogBase.cf_join``).
_CF_JOIN = (
    "incidents LEFT JOIN (SELECT incident_id AS cf_incident_id, tenant AS cf_tenant, "
    "score AS anomaly_score, p AS anomaly_p, flagged AS cf_flagged, status AS cf_status "
    "FROM cf_results QUALIFY row_number() OVER (PARTITION BY tenant, incident_id "
    "ORDER BY (score IS NOT NULL) DESC, created_at DESC, job_id DESC) = 1) AS cf "
    "ON cf.cf_incident_id = incidents.id AND cf.cf_tenant = incidents.tenant")
#: The same current CF result as a LATERAL join (standard SQL; PostgreSQL): each listed
#: incident looks up its own result through ``cf_results_incident``.
CF_JOIN_LATERAL = (
    "incidents LEFT JOIN LATERAL (SELECT score AS anomaly_score, p AS anomaly_p, "
    "flagged AS cf_flagged, status AS cf_status FROM cf_results "
    "WHERE cf_results.incident_id = incidents.id AND cf_results.tenant = incidents.tenant "
    "ORDER BY (score IS NOT NULL) DESC, created_at DESC, job_id DESC LIMIT 1) AS cf ON TRUE")
_CF_REFS = tuple(f'"{c}"' for c in CF_LISTING_COLUMNS)
#: The CF columns every listed or fetched :class:`IncidentRow` carries.
CF_ROW_COLUMNS = ("anomaly_score", "anomaly_p", "cf_flagged")
#: Index columns every listed or fetched row carries besides :data:`INCIDENT_COLUMNS` (written by
#: analyses, never at insert): the failure-signature score (``sidecar.jobs._probe``).
SCORE_COLUMNS = ("failure_p",)
_ROW_SELECT = ", ".join([*(f"incidents.{c}" for c in (*INCIDENT_COLUMNS, *SCORE_COLUMNS)),
                         *CF_ROW_COLUMNS])


def listing_from(*sql: str, join: str = _CF_JOIN) -> str:
    """The FROM clause for a listing query whose WHERE / ORDER BY are ``sql``: ``incidents``, or
    ``incidents`` LEFT JOIN each incident's current CF result when ``sql`` references one of
    :data:`CF_LISTING_COLUMNS` (compiled filters quote every identifier, and values are always
    ``?`` parameters, so a quoted column name in the text is a column reference).

    Example::

        listing_from('"anomaly_score" > ?')   # 'incidents LEFT JOIN (SELECT ...) AS cf ON ...'
        listing_from('"tenant" = ?')          # 'incidents'
    """
    return join if any(ref in part for part in sql for ref in _CF_REFS) else "incidents"


def utcnow() -> dt.datetime:
    """Now as a naive UTC datetime (the index stores UTC without a zone)."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


@dataclasses.dataclass(frozen=True)
class IncidentRow:
    """One ``incidents`` index row (``path`` relative to the store root)."""

    id: str
    tenant: str
    created_at: dt.datetime | None
    received_at: dt.datetime
    model_name: str | None
    model_fingerprint: str | None
    trigger_rule: str | None
    trigger_reason: str | None
    request_id: str | None
    traceparent: str | None
    size_bytes: int
    sha256: str
    activations: str | None
    n_sites: int
    path: str
    manifest_json: str
    #: The current CF result (:data:`CF_ROW_COLUMNS`; read from the index, never inserted):
    #: None until CF scored the incident.
    anomaly_score: float | None = None
    anomaly_p: float | None = None
    cf_flagged: bool | None = None
    #: The newest failure-signature probe's score (:data:`SCORE_COLUMNS`): None until scored.
    failure_p: float | None = None
    #: The content digest (the manifest's ``integrity.sha256``), the CRC32C of the file (None
    #: for rows stored before the CRC32C protocol), and ``pending`` | ``verified``: whether the
    #: content digest was checked against the rows yet (``sha256`` is ``""`` while pending).
    content_sha256: str = ""
    crc32c: int | None = None
    integrity: str = "verified"

    def values(self) -> list[Any]:
        return [getattr(self, c) for c in INCIDENT_COLUMNS]


def _s(value: Any) -> str | None:
    return None if value is None else str(value)


def _parse_time(value: Any) -> dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    if when.tzinfo is not None:
        when = when.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return when


def row_from_manifest(manifest: Mapping[str, Any], *, tenant: str, size_bytes: int, sha256: str,
                      path: str, received_at: dt.datetime, n_sites: int,
                      crc32c: int | None = None, integrity: str = "verified") -> IncidentRow:
    """The index row for a validated incident's manifest."""
    model = manifest.get("model") or {}
    integ = manifest.get("integrity") or {}
    trigger = manifest.get("trigger") or {}
    request = manifest.get("request") or {}
    return IncidentRow(
        id=str(manifest["id"]), tenant=tenant, created_at=_parse_time(manifest.get("created_at")),
        received_at=received_at, model_name=_s(model.get("name")),
        model_fingerprint=_s(model.get("fingerprint")), trigger_rule=_s(trigger.get("rule")),
        trigger_reason=_s(trigger.get("reason")), request_id=_s(request.get("id")),
        traceparent=_s(request.get("traceparent")), size_bytes=size_bytes, sha256=sha256,
        activations=_s(manifest.get("activations")), n_sites=n_sites, path=path,
        manifest_json=json.dumps(manifest, sort_keys=True, separators=(",", ":")),
        content_sha256=str(integ.get("sha256") or "") if isinstance(integ, Mapping) else "",
        crc32c=crc32c, integrity=integrity,
    )


class CatalogBase(abc.ABC):
    """The catalog's SQL on incidents, over an engine's :meth:`read` / :meth:`read_dicts` /
    :meth:`write` (:class:`Index`: embedded DuckDB; ``sidecar._catalog_postgres``: a shared
    PostgreSQL). Engines differ only in connections, DDL types and locks; every statement
    here is the same text on both (``?`` parameters)."""

    #: Whether several sidecars share this catalog (jobs then carry leases: ``JobQueue``).
    shared: bool = False
    #: The FROM clause joining each incident's current CF result (:func:`listing_from`).
    cf_join: str = _CF_JOIN
    #: Engine-specific secondary indexes (``sidecar._schema.SHARED_CATALOG_INDEXES``).
    indexes: tuple[str, ...] = ()

    @abc.abstractmethod
    def read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a read-only query; returns all rows."""

    @abc.abstractmethod
    def read_dicts(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Like :meth:`read`, each row as a column-name → value dict."""

    @abc.abstractmethod
    def write(self) -> contextlib.AbstractContextManager[Any]:
        """A connection inside one transaction (committed on success, rolled back on error):
        ``con.execute(sql, params)`` (``?`` parameters) returns a cursor."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close the connections (idempotent)."""

    def ddl(self, sql: str) -> str:
        """``sql`` (a statement of :mod:`sidecar._schema`) in this engine's dialect."""
        return sql

    def lock(self, con: Any, name: str) -> None:
        """Serialise the rest of the ``write`` transaction ``con`` with every other sidecar's
        transaction that locks ``name`` (a no-op where one process owns the catalog)."""
        return None

    def init_schema(self, where: str) -> None:
        """Create / upgrade the schema (:mod:`sidecar._schema`) and check its version;
        ``where`` names the catalog in the error."""
        with self.write() as con:
            self.lock(con, "schema")
            for ddl in (*CATALOG_DDL, *RESULT_DDL, *MIGRATIONS, *self.indexes):
                if needed(con, ddl):
                    con.execute(self.ddl(ddl))
            migrate(con, ddl=self.ddl)
            con.execute("INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT DO NOTHING",
                        [SCHEMA_VERSION])
        found = self.read("SELECT value FROM meta WHERE key = 'schema_version'")[0][0]
        if found != SCHEMA_VERSION:
            from integrations.errors import SidecarError

            raise SidecarError(f"catalog {where} has schema version {found}, this sidecar reads "
                               f"{SCHEMA_VERSION}; run `forensics sidecar reindex` on a fresh "
                               "catalog")

    # -- incidents ---------------------------------------------------------------------------

    def insert_incident(self, con: Any, row: IncidentRow) -> None:
        """Insert ``row`` inside an open :meth:`write` transaction."""
        placeholders = ", ".join("?" for _ in INCIDENT_COLUMNS)
        con.execute(f"INSERT INTO incidents ({', '.join(INCIDENT_COLUMNS)}) "
                    f"VALUES ({placeholders})", row.values())

    def get_incident(self, incident_id: str, *, tenant: str) -> IncidentRow | None:
        """The row of ``(tenant, incident_id)`` with its current CF result, or None."""
        rows = self.read_dicts(f"SELECT {_ROW_SELECT} FROM {self.cf_join} WHERE incidents.id = ? "
                               "AND incidents.tenant = ?", [incident_id, tenant])
        return IncidentRow(**rows[0]) if rows else None

    def find_incident(self, incident_id: str) -> list[IncidentRow]:
        """Every tenant's row of ``incident_id`` (ids are unique per tenant only), by tenant."""
        rows = self.read_dicts(f"SELECT {_ROW_SELECT} FROM {self.cf_join} WHERE incidents.id = ? "
                               "ORDER BY incidents.tenant", [incident_id])
        return [IncidentRow(**r) for r in rows]

    def query_incidents(self, where_sql: str, params: Sequence[Any], order_sql: str, *,
                        limit: int, offset: int) -> list[IncidentRow]:
        """Rows matching ``where_sql`` (a compiled filter; ``?`` params) in ``order_sql``.

        Both may reference :data:`CF_LISTING_COLUMNS` (joined in by :func:`listing_from`).
        """
        rows = self.read_dicts(
            f"SELECT {_ROW_SELECT} FROM {self.cf_join} WHERE {where_sql} "
            f"ORDER BY {order_sql} LIMIT ? OFFSET ?", [*params, limit, offset])
        return [IncidentRow(**r) for r in rows]

    def count_incidents(self, where_sql: str, params: Sequence[Any]) -> int:
        """How many rows match ``where_sql`` (which may reference CF listing columns)."""
        return int(self.read(f"SELECT count(*) FROM "
                             f"{listing_from(where_sql, join=self.cf_join)} "
                             f"WHERE {where_sql}", params)[0][0])

    def has_incident(self, incident_id: str, *, tenant: str) -> bool:
        """Whether a row for (tenant, incident) exists (cheaper than :meth:`get_incident`)."""
        return bool(self.read("SELECT count(*) FROM incidents WHERE id = ? AND tenant = ?",
                              [incident_id, tenant])[0][0])

    def incident_ids(self) -> set[str]:
        """The ids of every stored incident (of every tenant: the same id may be several)."""
        return {r[0] for r in self.read("SELECT DISTINCT id FROM incidents")}

    def pending_keys(self) -> list[tuple[str, str]]:
        """(tenant, id) of incidents acknowledged whose content digest was not checked yet
        (oldest first)."""
        return [(r[0], r[1]) for r in self.read(
            "SELECT tenant, id FROM incidents WHERE integrity = 'pending' "
            "ORDER BY received_at, id, tenant")]

    def mark_verified(self, incident_id: str, sha256: str, *, tenant: str) -> None:
        """Record that the content digest of (tenant, incident) was checked (and the file's
        sha256, computed in the same pass)."""
        with self.write() as con:
            con.execute("UPDATE incidents SET integrity = 'verified', sha256 = ? WHERE id = ? "
                        "AND tenant = ?", [sha256, incident_id, tenant])

    def incident_paths(self) -> dict[tuple[str, str], str]:
        """``{(tenant, id): path}`` of every row (reconciling the index with the files)."""
        return {(t, i): p for t, i, p in self.read("SELECT tenant, id, path FROM incidents")}

    def delete_incident(self, incident_id: str, *, tenant: str) -> bool:
        """Delete the row of ``(tenant, incident_id)`` and everything derived from it, in one
        transaction: the result rows (:data:`RESULT_TABLES`), analyses and jobs of that
        tenant's incident — never another tenant's incident of the same id. True when a row
        existed.

        Detector baselines built from the incident stay: a baseline is an aggregate of many
        incidents (its ``incident_ids_json`` records provenance); rebuild it with
        ``forensics baseline build`` to drop the incident's contribution.
        """
        key = [incident_id, tenant]
        # The incident's jobs, and the jobs its tenant-carrying result rows name (constant SQL).
        jobs = ("SELECT id FROM jobs WHERE incident_id = ? AND tenant = ? UNION SELECT job_id "
                "FROM cf_results WHERE incident_id = ? AND tenant = ? UNION SELECT job_id FROM "
                "cca_results WHERE incident_id = ? AND tenant = ?")
        with self.write() as con:
            found = con.execute("SELECT count(*) FROM incidents WHERE id = ? AND tenant = ?",
                                key).fetchone()[0]
            for table in RESULT_TABLES:   # constants, never user text; children first
                con.execute(f"DELETE FROM {table} WHERE job_id IN ({jobs})", key * 3)
            con.execute(f"DELETE FROM analyses WHERE job_id IN ({jobs})", key * 3)
            con.execute("DELETE FROM jobs WHERE incident_id = ? AND tenant = ?", key)
            con.execute("DELETE FROM incidents WHERE id = ? AND tenant = ?", key)
        return bool(found)


class Index(CatalogBase):
    """The embedded DuckDB catalog file; thread-safe (one writer lock, cursors for reads)."""

    def __init__(self, path: Path) -> None:
        import duckdb

        self.path = path
        self._lock = threading.RLock()
        self._con = duckdb.connect(str(path))
        self._closed = False
        self.init_schema(str(path))

    @contextlib.contextmanager
    def write(self) -> Iterator[Any]:
        """The write connection inside one transaction (committed on success)."""
        with self._lock:
            self._con.execute("BEGIN TRANSACTION")
            try:
                yield self._con
            except BaseException:
                self._con.execute("ROLLBACK")
                raise
            self._con.execute("COMMIT")

    def read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a read-only query on a fresh cursor; returns all rows."""
        with self._lock:
            cur = self._con.cursor()
        try:
            return cur.execute(sql, list(params)).fetchall()
        finally:
            cur.close()

    def read_dicts(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Like :meth:`read`, each row as a column-name → value dict."""
        with self._lock:
            cur = self._con.cursor()
        try:
            res = cur.execute(sql, list(params))
            names = [d[0] for d in res.description or []]
            return [dict(zip(names, row)) for row in res.fetchall()]
        finally:
            cur.close()

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._con.close()
                self._closed = True
