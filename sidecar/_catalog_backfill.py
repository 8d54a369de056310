"""Back-fill: incidents acknowledged while the catalog was unreachable, written into it later.

With a shared catalog (``catalog.kind: postgres``) the database can be down while uploads
arrive. Ingest does not wait for it (DESIGN §11: acknowledged = durable): the Arrow file and its
receipt are already durable when the index insert fails (:meth:`Backfill.insert`), so the
store acknowledges, and :meth:`Backfill.defer` leaves a durable marker
``<data_dir>/backfill/<tenant dir>/<id>``; meanwhile :meth:`Backfill.lookup` answers the store's
"is this (tenant, id) stored?" from the files, so a retried upload stays idempotent.
A daemon thread runs :meth:`Backfill.run_once` at start and every ``catalog.
backfill_interval_s``: while markers exist it runs the store's own start-up reconciliation
(``LocalStore.recover``: every stored file without a catalog row is validated and indexed, the
marked ones included, whatever the file layer — a directory or object storage), then announces
each marked incident to watchers and listeners (the server enqueues its ingest analyses) and
removes its marker. While the catalog is still down a pass changes nothing and is retried;
nothing is lost, and a restart picks the markers up again. A listener that cannot reach the
catalog (:class:`~integrations.errors.CatalogUnavailableError`) keeps the marker for the next
pass (listeners are idempotent: ingest jobs carry a request id); the same marker is left by
the server for an incident indexed just before the catalog stopped answering, whose analyses
could not be enqueued (:meth:`Backfill.defer` with a reason).

Example::

    backfill = Backfill(store, interval_s=10.0)
    backfill.insert(row)          # False: the catalog is unreachable, the incident is marked
    backfill.run_once()           # 1 (when the catalog answers again)
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from integrations.errors import CatalogUnavailableError
from integrations.incident import fsync_dir

from ._observer import incident_attributes
from ._store_layout import is_tenant_dir, tenant_dir
from ._store_recovery import row_from_file

if TYPE_CHECKING:
    from ._catalog import Catalog
    from ._incident_files import IncidentFiles
    from ._observer import Telemetry
    from ._store_index import IncidentRow

__all__ = ["Backfill"]

log = logging.getLogger("sidecar.store")


class _Store(Protocol):
    """What the back-fill needs of :class:`~sidecar._store.LocalStore`."""

    root: Path
    index: Catalog
    files: IncidentFiles
    telemetry: Telemetry

    def recover(self) -> Any: ...

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
        #: (tenant, id) announced to watchers whose listeners still have to succeed
        self._published: set[tuple[str, str]] = set()

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
        is unreachable: the incident is then marked for back-fill (:meth:`defer`).

        On a shared store another sidecar's reconcile (its back-fill pass) may index the file
        between this upload's publish and its insert; the insert then conflicts with a row of
        the same bytes, which counts as inserted (the upload goes on: acknowledged, its
        analyses enqueued). A conflicting row of other bytes is an error."""
        index = self.store.index
        try:
            with self.store.telemetry.span("index", traceparent=row.traceparent,
                                           attributes=incident_attributes(row)), \
                    index.write() as con:
                index.insert_incident(con, row)
        except CatalogUnavailableError:
            self.defer(row)
            return False
        except Exception:
            try:
                found = index.get_incident(row.id, tenant=row.tenant)
            except CatalogUnavailableError:
                found = None
            if found is None or found.sha256 != row.sha256:
                raise
            log.info("incident %s (tenant %r) was indexed by a reconcile of the shared store "
                     "before this upload's insert", row.id, row.tenant)
        return True

    def defer(self, row: IncidentRow, *, reason: str = "acknowledged to local disk") -> None:
        """Mark ``row``'s incident (its file is durable) for back-fill; durable on return."""
        directory = self.dir / tenant_dir(row.tenant)
        if not directory.is_dir():
            directory.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.dir)
        (directory / row.id).write_text(json.dumps({"tenant": row.tenant}), encoding="utf-8")
        fsync_dir(directory)
        log.warning("catalog unreachable: incident %s (tenant %r): %s; it is back-filled when "
                    "the catalog answers", row.id, row.tenant, reason)

    def _marks(self) -> list[tuple[Path, str, str]]:
        """(marker, tenant, id) of every incident waiting for back-fill, oldest first."""
        if not self.dir.is_dir():
            return []
        found = []
        for d in self.dir.iterdir():
            for m in (d.iterdir() if d.is_dir() and is_tenant_dir(d.name) else ()):
                tenant = json.loads(m.read_text(encoding="utf-8"))["tenant"]
                found.append((m.stat().st_mtime_ns, m, str(tenant), m.name))
        return [(m, t, i) for _, m, t, i in sorted(found)]

    def pending(self) -> list[tuple[str, str]]:
        """(tenant, id) of every incident waiting for back-fill, oldest first."""
        return [(t, i) for _, t, i in self._marks()]

    def stored_row(self, incident_id: str, tenant: str) -> IncidentRow | None:
        """The row of an incident stored here, read from its file (when the catalog cannot
        tell: idempotent retries of an upload during an outage); None when there is none. The
        file is read where the store keeps it (a local directory, or a checked local copy of
        an object-store object)."""
        path = self.store.files.local_path(tenant, incident_id, row_of=lambda: None)
        if not path.exists():
            return None
        return row_from_file(path, dir_name=tenant_dir(tenant))

    def run_once(self) -> int:
        """One pass: while incidents are marked, reconcile the catalog with the stored files
        (the store's start-up recovery: every file without a row is validated and indexed),
        then announce each marked incident's row and drop its marker. How many were
        announced; 0 with the markers kept while the catalog is unreachable."""
        with self._pass:
            marks = self._marks()
            if not marks:
                return 0
            try:
                self.store.recover()
                rows = [(m, self.store.index.get_incident(i, tenant=t)) for m, t, i in marks]
            except CatalogUnavailableError:
                return 0
            announced = 0
            for marker, row in rows:
                if row is None:
                    log.warning("incident %s marked for back-fill is no longer stored (deleted "
                                "or quarantined by recovery)", marker.name)
                elif not self._announce(row):
                    continue   # the catalog stopped answering: the marker stays for next pass
                else:
                    announced += 1
                marker.unlink(missing_ok=True)
            return announced

    def _announce(self, row: IncidentRow) -> bool:
        """Publish ``row`` (once per process) and call the listeners; False when one could
        not reach the catalog (retried on the next pass)."""
        key = (row.tenant, row.id)
        if key not in self._published:
            log.info("back-filled incident %s (tenant %r) into the catalog", row.id, row.tenant)
            self.store._publish(row)
            self._published.add(key)
        for listener in list(self.listeners):
            try:
                listener(row)
            except CatalogUnavailableError as e:
                log.warning("back-fill of %s kept for the next pass: %s", row.id, e)
                return False
            except Exception:
                log.exception("back-fill listener failed for %s", row.id)
        self._published.discard(key)
        return True

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
