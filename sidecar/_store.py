"""The incident store: Arrow files are the source of truth, a DuckDB index makes them queryable.

:class:`IncidentStore` is the seam (DESIGN §12): today :class:`LocalStore` (a directory + DuckDB
file); later object storage with a shared catalog. Incident ids are unique per tenant (DESIGN
§10): an incident's key is (tenant, id), and two tenants may each hold an incident ``inc-1``.
``put`` verifies (size cap, sha256, full Arrow validation + schema + manifest through
``Incident.from_bytes``), writes ``incidents/<tenant dir>/<id>.arrow`` (:mod:`sidecar.
_store_layout`) atomically (temp file, fsync, rename, directory fsync) beside a small receipt
``<id>.json`` (tenant, received_at, digests) so :meth:`LocalStore.reindex` rebuilds the index
exactly, then inserts the index row. It returns only when both are durable. An upload of the
CRC32C protocol (``put_incoming(content_sha256=...)``) is stored ``integrity = 'pending'`` and
its rows' digest checked after the ack (:mod:`sidecar._store_verify`). A data directory of the
old flat layout (``incidents/<id>.arrow``) is migrated when the store opens
(:mod:`sidecar._store_migration`).

Every lookup takes ``tenant``; ``tenant=None`` (an admin who named no tenant) finds the id in
any tenant and raises :class:`AmbiguousIncidentError` when several tenants hold it.

Example::

    store = LocalStore("forensics-data")
    res = store.put("inc-1", data, tenant="acme")      # PutResult(created=True, ...)
    store.put("inc-1", other, tenant="globex").created  # True: another tenant's inc-1
    store.get("inc-1", tenant="acme").model_name
    store.reindex()                                    # rebuild the index from the files
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from integrations._crc32c import crc32c as crc32c_of
from integrations.errors import IncidentFormatError, IncidentTooLargeError
from integrations.incident import ID_PATTERN

from ._catalog_backfill import Backfill
from ._incident_files import IncidentFiles, LocalFiles
from ._incident_files_fs import files_for
from ._observer import Telemetry, as_telemetry
from ._store_api import AlreadyExistsError, AmbiguousIncidentError, IncidentStore, PutResult
from ._store_files import IncomingFile, KeyLocks, StoreError
from ._store_index import IncidentRow, Index, row_from_manifest, utcnow
from ._store_layout import stored_path
from ._store_recovery import ReindexReport, manifest_tenant, receipt_bytes
from ._store_verify import ContentVerifier

if TYPE_CHECKING:
    from integrations.incident import DecodeLimits, Incident

    from ._catalog import Catalog
    from ._config import SidecarConfig

__all__ = [
    "ID_PATTERN",
    "AlreadyExistsError",
    "AmbiguousIncidentError",
    "IncidentRow",
    "IncidentStore",
    "IncomingFile",
    "LocalStore",
    "PutResult",
    "ReindexReport",
    "StoreError",
]


class LocalStore:
    """Incidents in ``<root>/incidents/<tenant dir>/<id>.arrow``, index in
    ``<root>/index.duckdb``.

    Thread-safe. On construction, a flat layout is migrated, stray temp files are removed,
    files without an index row are indexed and rows whose file is gone are dropped (see
    :meth:`recover`).
    """

    def __init__(self, root: str | os.PathLike[str], *,
                 max_incident_bytes: int = 512 * 1024 * 1024, watch_queue: int = 1024,
                 decode_limits: DecodeLimits | None = None,
                 telemetry: Telemetry | None = None,
                 files: IncidentFiles | None = None, catalog: Catalog | None = None,
                 backfill_interval_s: float = 10.0) -> None:
        self.root = Path(root)
        self.incidents_dir = self.root / "incidents"
        self.quarantine_dir = self.root / "quarantine"
        #: Where the incident files and receipts live (default: ``<root>/incidents``).
        self.files: IncidentFiles = LocalFiles(self.root) if files is None else files
        self.max_incident_bytes = max_incident_bytes
        #: What reading one stored or uploaded incident may cost (checked before decoding).
        self.decode_limits = decode_limits
        self.telemetry = as_telemetry(telemetry)
        self._watch_queue = watch_queue
        #: The catalog (``catalog:`` config; default: the DuckDB file ``index.duckdb``).
        self.index: Catalog = Index(self.root / "index.duckdb") if catalog is None else catalog
        self._put_lock = threading.Lock()   # delete, quarantine, reconcile
        #: Per (tenant, id): id check + publish + insert are one step; other keys in parallel.
        self._key_locks = KeyLocks()
        self._subs: list[queue.Queue[IncidentRow | None]] = []
        self._subs_lock = threading.Lock()
        #: Checks acknowledged CRC32C-protocol uploads against their rows' digest.
        self.verifier = ContentVerifier(self)
        #: Incidents acknowledged while the catalog was unreachable (:mod:`sidecar.
        #: _catalog_backfill`).
        self.backfill = Backfill(self, interval_s=backfill_interval_s)
        try:
            self.last_recovery = self.recover()
        except BaseException:   # e.g. the object store of store.uri is unreachable
            self.index.close()
            raise
        self.verifier.resume()
        self.backfill.start()

    @classmethod
    def from_config(cls, config: SidecarConfig, *,
                    telemetry: Telemetry | None = None) -> LocalStore:
        """The store of ``config.data_dir`` with its ``limits`` (incident size, decoding), its
        files where ``store.uri`` says (:func:`~sidecar._incident_files_fs.files_for`) and its
        ``catalog`` (:func:`sidecar._catalog.open_catalog`)."""
        from ._catalog import open_catalog

        return cls(config.data_dir, max_incident_bytes=config.limits.max_incident_bytes,
                   decode_limits=config.limits.decode_limits(), telemetry=telemetry,
                   files=files_for(config.store, data_dir=Path(config.data_dir)),
                   catalog=open_catalog(config),
                   backfill_interval_s=config.catalog.backfill_interval_s)

    # -- paths -------------------------------------------------------------------------------

    def _check_id(self, incident_id: str) -> None:
        if not ID_PATTERN.fullmatch(incident_id):
            raise IncidentFormatError(
                f"incident id {incident_id!r} must be 1-200 characters of [A-Za-z0-9._-] "
                "starting with a letter or digit")

    def _owner(self, incident_id: str, tenant: str | None) -> str:
        """``tenant``, or the one tenant holding the id (:class:`StoreError` when none does,
        :class:`AmbiguousIncidentError` when several do)."""
        self._check_id(incident_id)
        if tenant is None:
            row = self.get(incident_id)
            if row is None:
                raise StoreError(f"no stored incident {incident_id!r}")
            tenant = row.tenant
        return tenant

    def path(self, incident_id: str, *, tenant: str | None = None) -> Path:
        """A local Arrow file of (``tenant``, ``incident_id``), which may not exist (an object
        store's: a cached copy checked against the index row); without a tenant, of the one
        tenant holding the id (see :meth:`_owner`)."""
        owner = self._owner(incident_id, tenant)
        return self.files.local_path(owner, incident_id, row_of=lambda: self.index.get_incident(
            incident_id, tenant=owner))

    def ref(self, incident_id: str, *, tenant: str | None = None) -> str:
        """How a job on another machine opens (``tenant``, ``incident_id``): on an object store
        the object's URI with the digest of its index row (:mod:`sidecar._incident_refs`: the
        worker fetches it and checks the digest); in a local directory its path (a remote
        worker then needs that directory mounted at the same path)."""
        owner = self._owner(incident_id, tenant)
        uri = self.files.uri if "://" in self.files.uri else ""     # a URI, not a local dir
        row = self.index.get_incident(incident_id, tenant=owner) if uri else None
        if row is None:
            return str(self.path(incident_id, tenant=owner))
        from ._incident_refs import incident_ref

        return incident_ref(uri, row.path, sha256=row.sha256, size_bytes=row.size_bytes,
                            crc32c=row.crc32c)

    # -- write -------------------------------------------------------------------------------

    def incoming(self, incident_id: str, *, sha256: bool = True) -> IncomingFile:
        """Start receiving ``incident_id``: chunks go to a temp file as they arrive (hashed
        with sha256 on the way unless ``sha256=False``: the CRC32C protocol)."""
        self._check_id(incident_id)
        return IncomingFile(self.files.spool_dir, incident_id, sha256=sha256)

    def put(self, incident_id: str, data: bytes, *, tenant: str | None,
            sha256: str | None = None) -> PutResult:
        """Verify and store one incident given as bytes (see :meth:`put_incoming`).

        ``sha256``, when given, must equal the digest of ``data`` (else :class:`StoreError`).
        """
        self._check_size(incident_id, len(data))
        inc = self.incoming(incident_id)
        try:
            inc.write(data)
            digest = inc.finish()
        except BaseException:
            inc.abort()
            raise
        if sha256 is not None and sha256 != digest:
            inc.abort()
            raise StoreError(f"incident {incident_id}: sha256 {digest} differs from the "
                             f"claimed {sha256}")
        return self.put_incoming(inc, tenant=tenant, sha256=digest, crc32c=crc32c_of(data))

    def _check_size(self, incident_id: str, size: int) -> None:
        if size > self.max_incident_bytes:
            raise IncidentTooLargeError(
                f"incident {incident_id} is {size} bytes, over this sidecar's "
                f"limits.max_incident_bytes = {self.max_incident_bytes}; raise the limit or "
                "record fewer sites")

    def put_incoming(self, incoming: IncomingFile, *, tenant: str | None, sha256: str = "",
                     crc32c: int | None = None, content_sha256: str = "",
                     digest_verified: bool = False) -> PutResult:
        """Verify a finished upload and make it durable; idempotent on (tenant, incident id)
        (same size, CRC32C and content digest — or sha256 — is success).

        ``sha256`` is the verified transport digest from :meth:`IncomingFile.finish` (sha256
        protocol); ``crc32c`` the checked CRC32C of the bytes. Validation is ``Incident.open``
        (full Arrow validation, schema, decoded-size caps, manifest, row digest — the digest
        pass is skipped when ``digest_verified``: the caller proved it while receiving, see
        :mod:`sidecar._ingest_digest`). With ``content_sha256`` (CRC32C protocol) it must equal
        the manifest's digest, the row is ``pending`` and the rows are checked after this
        returns (:class:`~sidecar._store_verify.ContentVerifier`); then the
        receipt and the Arrow file are renamed into place, the directory fsynced and the index
        row inserted. ``tenant`` is the owner recorded in the index (``None``: the manifest's
        ``request.tenant``, else ``""``). On any error the temp file is removed.

        Raises :class:`IncidentTooLargeError`, :class:`IncidentFormatError` (not a valid
        incident, manifest id ≠ upload id), :class:`AlreadyExistsError` (same tenant and id,
        different bytes), :class:`StoreError` (I/O). Another tenant's incident of the same id
        is never looked at.
        """
        incident_id = incoming.incident_id
        tmp_receipt: Path | None = None
        try:
            self._check_size(incident_id, incoming.size)
            existing = None if tenant is None else self.backfill.lookup(incident_id, tenant)
            if existing is not None:
                return self._existing(existing, incoming.size, sha256, crc32c, content_sha256)
            row = self._verified_row(incoming, tenant=tenant, sha256=sha256, crc32c=crc32c,
                                     content_sha256=content_sha256,
                                     digest_verified=digest_verified)
            tmp_receipt = self.files.stage_receipt(row.tenant, incident_id, receipt_bytes(row))
            with self._key_locks.hold((row.tenant, incident_id)):
                existing = self.backfill.lookup(incident_id, row.tenant)
                if existing is not None:   # a concurrent upload of the same key won the race
                    return self._existing(existing, row.size_bytes, sha256, crc32c,
                                          row.content_sha256)
                self.files.publish(row.tenant, incident_id, data=incoming.path,
                                   receipt=tmp_receipt)
                deferred = not self.backfill.insert(row)
        except OSError as e:
            raise StoreError(f"cannot store incident {incident_id}: {e}; check free disk "
                             "space and permissions") from e
        finally:
            incoming.path.unlink(missing_ok=True)
            if tmp_receipt is not None:
                tmp_receipt.unlink(missing_ok=True)
        if deferred:   # the back-fill publishes it (and its checks) once indexed
            return PutResult(row=row, created=True, deferred=True)
        self._publish(row)
        if row.integrity == "pending":
            self.verifier.submit(row.id, tenant=row.tenant)
        return PutResult(row=row, created=True)

    def _verified_row(self, incoming: IncomingFile, *, tenant: str | None, sha256: str,
                      crc32c: int | None, content_sha256: str,
                      digest_verified: bool) -> IncidentRow:
        """The index row of a received upload, after ``Incident.open`` validated it."""
        from integrations.incident import Incident

        inc = Incident.open(incoming.path, verify=not (digest_verified or content_sha256),
                            limits=self.decode_limits)
        if inc.id != incoming.incident_id:
            raise IncidentFormatError(
                f"upload header says incident id {incoming.incident_id!r} but the manifest "
                f"says {inc.id!r}; send the manifest's id in the header")
        manifest = inc.manifest
        if content_sha256 and manifest["integrity"]["sha256"] != content_sha256:
            raise IncidentFormatError(
                f"header.content_sha256 {content_sha256[:16]}… is not the manifest's digest "
                f"{str(manifest['integrity']['sha256'])[:16]}…; send the manifest's "
                "integrity.sha256")
        sites = manifest.get("sites")
        owner = manifest_tenant(manifest) if tenant is None else tenant
        return row_from_manifest(
            manifest, tenant=owner,
            size_bytes=incoming.size, sha256=sha256, path=stored_path(owner, inc.id),
            received_at=utcnow(), crc32c=crc32c,
            integrity="pending" if content_sha256 else "verified",
            n_sites=len(sites) if isinstance(sites, list) else len(inc.sites()))

    def _existing(self, row: IncidentRow, size: int, sha256: str, crc32c: int | None,
                  content_sha256: str) -> PutResult:
        """An upload of an id already stored: success when it is the same incident (same
        size, and the same CRC32C and content digest — or sha256 — where both sides know it)."""
        same = row.size_bytes == size
        if same and crc32c is not None and row.crc32c is not None:
            same = row.crc32c == crc32c
        if same and content_sha256 and row.content_sha256:
            same = row.content_sha256 == content_sha256
        if same and sha256 and row.sha256:
            same = row.sha256 == sha256
        if not same:
            raise AlreadyExistsError(
                f"incident {row.id} already exists with different content; incident ids "
                "must be unique per tenant — generate a new id")
        return PutResult(row=row, created=False)

    # -- read --------------------------------------------------------------------------------

    def get(self, incident_id: str, *, tenant: str | None = None) -> IncidentRow | None:
        """The index row of (``tenant``, ``incident_id``), or ``None`` (another tenant's
        incident of that id is absent). ``tenant=None``: of whichever tenant holds the id
        (:class:`AmbiguousIncidentError` when several do)."""
        if not ID_PATTERN.fullmatch(incident_id):
            return None
        if tenant is not None:
            return self.index.get_incident(incident_id, tenant=tenant)
        rows = self.index.find_incident(incident_id)
        if len(rows) > 1:
            raise AmbiguousIncidentError(incident_id, [r.tenant for r in rows])
        return rows[0] if rows else None

    def open(self, incident_id: str, *, tenant: str | None = None) -> Incident:
        """The stored incident, memory-mapped and validated (within the decode limits)."""
        from integrations.incident import Incident

        return Incident.open(self.path(incident_id, tenant=tenant), limits=self.decode_limits)

    def read_chunks(self, incident_id: str, chunk_size: int, *,
                    tenant: str | None = None) -> Iterator[bytes]:
        """The stored bytes in chunks of at most ``chunk_size``."""
        return self.files.read_chunks(self._owner(incident_id, tenant), incident_id, chunk_size)

    def delete(self, incident_id: str, *, tenant: str | None = None) -> bool:
        """Delete file, receipt, row, jobs and analyses of (``tenant``, ``incident_id``);
        False when absent (another tenant's incident of that id is absent). The file goes
        first: a crash in between leaves a row that recovery drops."""
        row = self.get(incident_id, tenant=tenant)
        if row is None:
            return False
        with self._put_lock:
            self.files.delete(row.tenant, row.id)
            return self.index.delete_incident(row.id, tenant=row.tenant)

    # -- watch -------------------------------------------------------------------------------

    def subscribe(self) -> queue.Queue[IncidentRow | None]:
        """A queue receiving every newly stored row; ``None`` = closed or overflowed."""
        q: queue.Queue[IncidentRow | None] = queue.Queue(maxsize=self._watch_queue)
        with self._subs_lock:
            self._subs.append(q)
        return q

    def unsubscribe(self, q: queue.Queue[IncidentRow | None]) -> None:
        with self._subs_lock, contextlib.suppress(ValueError):
            self._subs.remove(q)

    def _publish(self, row: IncidentRow | None) -> None:
        with self._subs_lock:
            subs = list(self._subs)
        for q in subs:
            try:
                q.put_nowait(row)
            except queue.Full:   # the watcher fell behind: end its stream rather than skip
                self.unsubscribe(q)
                with contextlib.suppress(queue.Empty):
                    q.get_nowait()
                q.put_nowait(None)

    # -- recovery ----------------------------------------------------------------------------

    def recover(self) -> ReindexReport:
        """Start-up reconciliation: migrate a flat layout, remove temp files, index unindexed
        files, drop rows whose file is gone, remove receipts without a file."""
        return self._reconcile(full=False)

    def reindex(self) -> ReindexReport:
        """Rebuild the whole ``incidents`` index from the files (each re-validated and
        re-hashed); files that fail validation move to ``<root>/quarantine/``."""
        return self._reconcile(full=True)

    def _reconcile(self, *, full: bool) -> ReindexReport:
        report = ReindexReport()
        with self._put_lock, self._key_locks.exclusive():   # no upload publishes meanwhile
            return self.files.reconcile(self.index, full=full, report=report)

    def close(self) -> None:
        """Stop the post-ack checker (pending rows resume at the next start), close watchers
        and the index."""
        self.verifier.close()
        self.backfill.close()
        self._publish(None)
        self.index.close()

    def __enter__(self) -> LocalStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
