"""Back-fill: incidents acknowledged while the catalog was unreachable, written into it later.

With a shared catalog (``catalog.kind: postgres``) the database can be down while uploads
arrive. Ingest does not wait for it (DESIGN §11: acknowledged = durable): the Arrow file and its
receipt are already durable when the index insert fails (:meth:`Backfill.insert`), so the
store acknowledges, and :meth:`Backfill.defer` leaves a durable marker
``<data_dir>/backfill/<tenant dir>/<id>``; meanwhile :meth:`Backfill.lookup` answers the store's
"is this (tenant, id) stored?" from the files, so a retried upload stays idempotent.
A daemon thread runs :meth:`Backfill.run_once` at start and every ``catalog.
backfill_interval_s``: each marked incident is re-read from its file (fully validated, as
reindexing does: :func:`~sidecar._store_recovery.row_from_file`), inserted unless a row exists,
announced to watchers and listeners (the server enqueues the ingest analyses), and its marker
removed. While the catalog is still down a pass stops at the first failure and retries later;
nothing is lost, and a restart picks the markers up again.

Example::

    backfill = Backfill(store, interval_s=10.0)
    backfill.insert(row)          # False: the catalog is unreachable, the incident is marked
    backfill.run_once()           # 1 (when the catalog answers again)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from integrations.errors import CatalogUnavailableError, IncidentFormatError
from integrations.incident import fsync_dir

from ._observer import incident_attributes
from ._store_layout import incident_file, is_tenant_dir, tenant_dir
from ._store_recovery import quarantine, row_from_file

if TYPE_CHECKING:
    from ._catalog import Catalog
    from ._observer import Telemetry
    from ._store_index import IncidentRow

__all__ = ["Backfill"]

log = logging.getLogger("sidecar.store")


class _Store(Protocol):
    """What the back-fill needs of :class:`~sidecar._store.LocalStore`."""

    root: Path
    index: Catalog
    incidents_dir: Path
    quarantine_dir: Path
    telemetry: Telemetry
    _put_lock: Any

    def _publish(self, row: IncidentRow | None) -> None: ...


class Backfill:
    """The store's back-fill (module doc); ``listeners`` are called with each back-filled row."""

    def __init__(self, store: _Store, *, interval_s: float) -> None:
        self.store = store
        self.dir = store.root / "backfill"
        self.interval_s = interval_s
        self.listeners: list[Callable[[IncidentRow], None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pass = threading.Lock()

    def lookup(self, incident_id: str, tenant: str) -> IncidentRow | None:
        """The stored row of (tenant, id): the catalog's, else (unreachable) the file's
        (:meth:`stored_row`)."""
        index = self.store.index
        try:
            if not index.has_incident(incident_id, tenant=tenant):
                return None
            return index.get_incident(incident_id, tenant=tenant)
        except CatalogUnavailableError:
            return self.stored_row(incident_id, tenant)

    def insert(self, row: IncidentRow) -> bool:
        """Insert the row of a durable incident (an ``index`` span); False when the catalog
        is unreachable: the incident is then marked for back-fill (:meth:`defer`)."""
        index = self.store.index
        try:
            with self.store.telemetry.span("index", traceparent=row.traceparent,
                                           attributes=incident_attributes(row)), \
                    index.write() as con:
                index.insert_incident(con, row)
        except CatalogUnavailableError:
            self.defer(row)
            return False
        return True

    def defer(self, row: IncidentRow) -> None:
        """Mark ``row``'s incident (its file is durable) for back-fill; durable on return."""
        directory = self.dir / tenant_dir(row.tenant)
        if not directory.is_dir():
            directory.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.dir)
        marker = directory / row.id
        marker.touch()
        fsync_dir(directory)
        log.warning("catalog unreachable: incident %s (tenant %r) acknowledged to local disk; "
                    "it is back-filled when the catalog answers", row.id, row.tenant)

    def pending(self) -> list[tuple[str, str]]:
        """(tenant dir, id) of every incident waiting for back-fill, oldest marker first."""
        if not self.dir.is_dir():
            return []
        found = [(m.stat().st_mtime_ns, d.name, m.name) for d in self.dir.iterdir()
                 if d.is_dir() and is_tenant_dir(d.name) for m in d.iterdir() if m.is_file()]
        return [(d, i) for _, d, i in sorted(found)]

    def stored_row(self, incident_id: str, tenant: str) -> IncidentRow | None:
        """The row of an incident stored here, read from its file (when the catalog cannot
        tell: idempotent retries of an upload during an outage); None when there is none."""
        path = incident_file(self.store.incidents_dir, tenant, incident_id)
        if not path.exists():
            return None
        return row_from_file(path, dir_name=tenant_dir(tenant))

    def run_once(self) -> int:
        """Back-fill every marked incident the catalog lacks; how many rows were inserted.
        Stops early (markers kept) while the catalog is unreachable."""
        done = 0
        with self._pass:
            for dir_name, incident_id in self.pending():
                try:
                    row = self._fill(dir_name, incident_id)
                except CatalogUnavailableError:
                    return done
                except Exception:   # e.g. a concurrent insert won: retried next pass
                    log.exception("back-fill of %s/%s failed; retrying later", dir_name,
                                  incident_id)
                    continue
                if row is not None:
                    done += 1
                    self._announce(row)
        return done

    def _fill(self, dir_name: str, incident_id: str) -> IncidentRow | None:
        """Insert one marked incident (None: nothing to insert) and drop its marker."""
        marker = self.dir / dir_name / incident_id
        path = self.store.incidents_dir / dir_name / f"{incident_id}.arrow"
        row = None
        with self.store._put_lock:
            if path.exists():
                try:
                    candidate = row_from_file(path, dir_name=dir_name)
                except (IncidentFormatError, OSError, ValueError) as e:
                    quarantine(path, self.store.quarantine_dir, e, dir_name=dir_name)
                else:
                    index = self.store.index
                    with index.write() as con:
                        found = con.execute("SELECT count(*) FROM incidents WHERE id = ? AND "
                                            "tenant = ?", [candidate.id, candidate.tenant]
                                            ).fetchone()[0]
                        if not found:
                            index.insert_incident(con, candidate)
                            row = candidate
            marker.unlink(missing_ok=True)
        return row

    def _announce(self, row: IncidentRow) -> None:
        log.info("back-filled incident %s (tenant %r) into the catalog", row.id, row.tenant)
        self.store._publish(row)
        for listener in list(self.listeners):
            try:
                listener(row)
            except Exception:
                log.exception("back-fill listener failed for %s", row.id)

    def start(self) -> None:
        """Run a pass now (in the thread) and every ``interval_s`` until :meth:`close`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="forensics-backfill",
                                            daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("back-fill pass failed")
            self._stop.wait(self.interval_s)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
