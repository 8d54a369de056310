"""The shared PostgreSQL catalog (``catalog.kind: postgres``, DESIGN §12): the same tables and
SQL as the embedded DuckDB index (:mod:`sidecar._schema`, :class:`~sidecar._store_index.
CatalogBase`), reached with psycopg 3 by every sidecar of a fleet, so ``ListIncidents`` on any
sidecar answers for the whole fleet (tenant-scoped as everywhere, DESIGN §10).

What differs from DuckDB is translated here, never written twice: ``?`` parameters become
psycopg's ``%s`` (:func:`pg_sql`), DDL types become PostgreSQL's with the bytewise ``"C"``
collation so string order and comparisons equal DuckDB's (:func:`pg_ddl`), and
:meth:`PostgresCatalog.lock` is a transaction-scoped advisory lock (schema creation, job
submission quotas). A lost connection or a server that does not answer within
``catalog.connect_timeout_s`` raises :class:`~integrations.errors.CatalogUnavailableError`
(gRPC ``UNAVAILABLE``); the next call reconnects. DuckLake is not used: its DuckDB extension
cannot be installed offline for the pinned duckdb 2.0.1 (PyPI's ``duckdb-ext-ducklake`` is built
for duckdb 1.4.4), so the catalog is plain PostgreSQL tables.

Example::

    cat = PostgresCatalog("host=db dbname=forensics user=forensics", connect_timeout_s=5)
    cat.read("SELECT count(*) FROM incidents WHERE tenant = ?", ["acme"])   # [(12,)]
"""

from __future__ import annotations

import contextlib
import functools
import re
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from integrations.errors import CatalogUnavailableError

from ._schema import SHARED_CATALOG_INDEXES
from ._store_index import CF_JOIN_LATERAL, CatalogBase

__all__ = ["PostgresCatalog", "pg_ddl", "pg_sql"]

#: Idle connections kept for reuse (more are opened while more threads query at once).
_MAX_IDLE = 8
_TYPES = ((re.compile(r"\bVARCHAR\b"), 'TEXT COLLATE "C"'),
          (re.compile(r"\bDOUBLE\b"), "DOUBLE PRECISION"))


@functools.lru_cache(maxsize=1024)
def pg_sql(sql: str) -> str:
    """``sql`` with ``?`` parameters as psycopg's ``%s`` (and a literal ``%`` doubled);
    quoted text (``'…'``, ``"…"``) is left as it is.

    Example::

        pg_sql("SELECT 1 FROM t WHERE a = ? AND b LIKE '%x'")  # "... a = %s AND b LIKE '%%x'"
    """
    out: list[str] = []
    quote = ""
    for ch in sql:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "?":
            out.append("%s")
            continue
        out.append("%%" if ch == "%" else ch)
    return "".join(out)


def pg_ddl(sql: str) -> str:
    """A :mod:`sidecar._schema` statement with PostgreSQL types: ``VARCHAR`` → ``TEXT COLLATE
    "C"`` (bytewise, as DuckDB compares), ``DOUBLE`` → ``DOUBLE PRECISION``."""
    for pattern, replacement in _TYPES:
        sql = pattern.sub(replacement, sql)
    return sql


class _Connection:
    """A psycopg connection that takes the catalog's ``?`` SQL (what ``write()`` yields)."""

    def __init__(self, con: Any) -> None:
        self.raw = con

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.raw.execute(pg_sql(sql), list(params))

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self.raw.cursor() as cur:
            cur.executemany(pg_sql(sql), [list(r) for r in rows])


class PostgresCatalog(CatalogBase):
    """The catalog in a PostgreSQL database (module doc); thread-safe (a connection per
    concurrent caller, reused)."""

    shared = True
    cf_join = CF_JOIN_LATERAL   # PostgreSQL has no QUALIFY
    indexes = SHARED_CATALOG_INDEXES

    def __init__(self, dsn: str, *, connect_timeout_s: float = 5.0,
                 where: str = "catalog.kind=postgres") -> None:
        self._dsn = dsn
        self._timeout = max(1, round(connect_timeout_s))
        self._where = where
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False
        self.init_schema(where)

    def _connect(self) -> Any:
        import psycopg

        try:
            return psycopg.connect(self._dsn, autocommit=True, connect_timeout=self._timeout)
        except psycopg.OperationalError as e:
            raise self._unavailable(e) from e

    def _unavailable(self, error: Exception) -> CatalogUnavailableError:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return CatalogUnavailableError(
            f"the shared incident catalog ({self._where}) is unreachable: {first}; uploads are "
            "still acknowledged and back-filled when it answers again — retry queries later "
            "(operators: check that PostgreSQL is up and the DSN in catalog.dsn_env is right)")

    @contextlib.contextmanager
    def _conn(self) -> Iterator[Any]:
        """A connection for one call; a broken one is dropped and reported as unavailable."""
        import psycopg

        with self._lock:
            if self._closed:
                raise CatalogUnavailableError("the catalog was closed (the sidecar is stopping)")
            con = self._idle.pop() if self._idle else None
        if con is None:
            con = self._connect()
        try:
            yield con
        except (psycopg.OperationalError, psycopg.InterfaceError) as e:
            con.close()
            self._drop_idle()   # a restarted server broke them all: the next call reconnects
            raise self._unavailable(e) from e
        except BaseException:
            if con.closed:
                raise
            self._release(con)
            raise
        self._release(con)

    def _drop_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for con in idle:
            con.close()

    def _release(self, con: Any) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < _MAX_IDLE and not con.closed:
                self._idle.append(con)
                return
        con.close()

    @contextlib.contextmanager
    def write(self) -> Iterator[Any]:
        """A connection inside one transaction (committed on success)."""
        with self._conn() as con, con.transaction():
            yield _Connection(con)

    def read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._conn() as con:
            return list(con.execute(pg_sql(sql), list(params)).fetchall())

    def read_dicts(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._conn() as con:
            cur = con.execute(pg_sql(sql), list(params))
            names = [d.name for d in cur.description or []]
            return [dict(zip(names, row)) for row in cur.fetchall()]

    def ddl(self, sql: str) -> str:
        return pg_ddl(sql)

    def lock(self, con: Any, name: str) -> None:
        con.execute("SELECT pg_advisory_xact_lock(hashtext(?))", [f"forensics:{name}"])

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for con in idle:
            con.close()
