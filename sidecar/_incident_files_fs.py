"""Incident files on any ``pyarrow.fs`` URI (``store.uri``: ``s3://bucket/prefix``, ...).

The layout under the URI is the local one (:mod:`sidecar._store_layout`)::

    <uri>/incidents/t-acme/inc-1.arrow      the incident (one object: a single PUT is atomic)
    <uri>/incidents/t-acme/inc-1.json       its receipt, written AFTER the incident object
    <uri>/quarantine/t-acme/inc-1.arrow     an incident that failed a check (+ .reason.json)

Uploads are still received and validated in a local spool (``<data_dir>/spool/``) exactly as
for the local store (CRC32C per chunk, Arrow validation, digests); :meth:`FsFiles.publish`
then writes the incident object, checks its size, writes the receipt object — so a receipt
means a complete incident — and only then does the store index and acknowledge it. Any failure
of the object store is a :class:`~sidecar._store_files.StoreUnavailableError` (the servicer's
``UNAVAILABLE``, reason ``store_unavailable``): nothing is acknowledged.

Reads go through ``pyarrow.fs``: ``DownloadIncident`` streams the object; a job (or
``Incident.open``) gets a local copy in ``<data_dir>/cache/<tenant dir>/<id>.arrow``, checked
against the index row before use (its sha256, or — while the row is pending — the CRC32C of
the acknowledged bytes) and fetched again when it does not match. Recovery and reindexing list
the object store (:func:`~sidecar._store_recovery.reconcile_listing`).

Example::

    files = files_for(StoreConfig(uri="s3://forensics/prod"), data_dir=Path("forensics-data"))
    store = LocalStore("forensics-data", files=files)   # index local, files in the bucket
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._incident_cache import DEFAULT_CACHE_BYTES, LocalCache
from ._store_files import StoreError, StoreUnavailableError, _write_tmp
from ._store_layout import is_tenant_dir, stored_path, tenant_dir
from ._store_recovery import ReindexReport, _remove_tmp, reconcile_listing, row_from_file

if TYPE_CHECKING:
    from ._catalog import Catalog
    from ._config_store import StoreConfig
    from ._incident_files import IncidentFiles, RowLookup
    from ._store_index import IncidentRow

__all__ = ["FsFiles", "files_for", "put_file"]

log = logging.getLogger("sidecar.store")
_BLOCK = 8 * 1024 * 1024


#: A temp object of a shared store younger than this may be another sidecar's write in flight.
TMP_OBJECT_MIN_AGE_S = 3600.0


def _stale(info: Any) -> bool:
    mtime = getattr(info, "mtime", None)
    return mtime is None or time.time() - mtime.timestamp() > TMP_OBJECT_MIN_AGE_S


def put_file(fs: Any, src: Path, key: str) -> None:
    """Write the object ``key`` of ``fs`` from the local file ``src``, complete or not at all:
    S3/GCS: one PUT (atomic); elsewhere (a mounted path) a temp object renamed into place and,
    on a local file system, fsynced like the local store. Checked by its size afterwards
    (``OSError`` and the object removed when it differs). ``key``'s directory must exist.

    Example::

        fs, base = StoreConfig(uri="s3://forensics/prod").filesystem()
        put_file(fs, Path("/tmp/x.npz"), f"{base}/baselines/tenant-acme/fp/norm-v0001.npz")
    """
    parent = key.rsplit("/", 1)[0]
    size = src.stat().st_size
    atomic = fs.type_name in ("s3", "gcs")
    target = key if atomic else f"{parent}/.{uuid.uuid4().hex}.tmp"
    with open(src, "rb") as f, fs.open_output_stream(target) as out:
        shutil.copyfileobj(f, out, _BLOCK)
    if not atomic:
        fs.move(target, key)
        if fs.type_name == "local":   # a mounted path: make the rename durable
            from integrations.incident import fsync_dir

            fd = os.open(key, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(Path(parent))
    stored = fs.get_file_info(key).size
    if stored != size:
        try:
            fs.delete_file(key)
        except OSError as e:
            log.warning("could not remove %s after a failed write: %s", key, e)
        raise OSError(f"object {key} has {stored} bytes after writing {size}")


def files_for(config: StoreConfig, *, data_dir: Path) -> IncidentFiles | None:
    """The file side ``store`` configures: ``None`` for the default local layout (the store
    builds :class:`~sidecar._incident_files.LocalFiles`), else :class:`FsFiles`."""
    if config.is_local:
        return None
    fs, base = config.filesystem()
    return FsFiles(fs, base, data_dir=data_dir, uri=config.uri)


class FsFiles:
    """Incidents and receipts in a ``pyarrow.fs`` filesystem under ``base`` (module doc)."""

    def __init__(self, fs: Any, base: str, *, data_dir: Path, uri: str,
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.fs, self.base, self.uri = fs, base.rstrip("/"), uri
        self.spool_dir = data_dir / "spool"
        #: Spool temp files older than this were left by a previous run; newer ones are
        #: uploads in flight (a reconcile while running, the catalog's back-fill, keeps them).
        self.opened_at = time.time()
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        #: Local copies for jobs, least recently used evicted past ``cache_bytes``.
        self.cache = LocalCache(data_dir / "cache", budget_bytes=cache_bytes)
        self._dirs: set[str] = set()

    # -- names -------------------------------------------------------------------------------

    def _key(self, tenant: str, incident_id: str, suffix: str = ".arrow") -> str:
        return f"{self.base}/{stored_path(tenant, incident_id)[:-len('.arrow')]}{suffix}"

    def _unavailable(self, what: str, error: BaseException) -> StoreUnavailableError:
        log.error("object store %s: %s failed: %s", self.uri, what, error)
        return StoreUnavailableError(
            f"the incident store ({self.uri}) could not {what}: {error}; check that it is "
            "reachable (store.uri, store.s3) and the credentials in the AWS environment "
            "variables")

    # -- write -------------------------------------------------------------------------------

    def stage_receipt(self, tenant: str, incident_id: str, receipt: bytes) -> Path:
        """The receipt in a local temp file of the spool."""
        return _write_tmp(self.spool_dir, incident_id, receipt)

    def publish(self, tenant: str, incident_id: str, *, data: Path, receipt: Path) -> None:
        """Write the incident object, then its receipt object; keep the validated bytes as
        the cached copy. Raises :class:`StoreUnavailableError` (nothing published)."""
        arrow_key = self._key(tenant, incident_id)
        try:
            self._put(data, arrow_key)
            try:
                self._put(receipt, self._key(tenant, incident_id, ".json"))
            except BaseException:
                self._delete_quietly(arrow_key)
                raise
        except (OSError, ValueError) as e:   # pyarrow's errors are OSError subclasses
            raise self._unavailable(f"store incident {incident_id}", e) from e
        cached = self.cache.path(tenant_dir(tenant), incident_id)
        cached.parent.mkdir(parents=True, exist_ok=True)
        os.replace(data, cached)
        self.cache.admit(cached)

    def _put(self, src: Path, key: str) -> None:
        """One object from a local file, complete or not at all (:func:`put_file`)."""
        self._parent(key)
        put_file(self.fs, src, key)

    def _parent(self, key: str) -> str:
        """``key``'s directory, created once per process (S3: a marker object)."""
        parent = key.rsplit("/", 1)[0]
        if parent not in self._dirs:
            self.fs.create_dir(parent, recursive=True)
            self._dirs.add(parent)
        return parent

    def _delete_quietly(self, key: str) -> None:
        try:
            self.fs.delete_file(key)
        except OSError as e:   # a leftover incident object without receipt: recovery indexes it
            log.warning("could not remove %s after a failed write: %s", key, e)

    # -- read --------------------------------------------------------------------------------

    def local_path(self, tenant: str, incident_id: str, *, row_of: RowLookup) -> Path:
        """A local copy of the object, checked against its index row when there is one (a
        copy that does not match is fetched again; a fetched one that does not match raises
        :class:`~integrations.errors.IncidentFormatError`). A missing object: a path that
        does not exist."""
        from integrations.errors import IncidentFormatError

        cached, row = self.cache.path(tenant_dir(tenant), incident_id), row_of()
        if row is not None and cached.exists() and self._matches(cached, row):
            self.cache.touch(cached)
            return cached
        try:
            self._fetch(self._key(tenant, incident_id), cached)
        except FileNotFoundError:
            self.cache.drop(cached)
            return cached
        self.cache.admit(cached)
        if row is not None and not self._matches(cached, row):
            self.cache.drop(cached)
            raise IncidentFormatError(
                f"the stored object of incident {incident_id} is not the acknowledged one "
                f"(its digest differs from the index row); see {self.uri}")
        return cached

    def _matches(self, path: Path, row: IncidentRow) -> bool:
        """Whether a local copy holds the row's bytes: its sha256 when known, else (a row
        still pending) its size and CRC32C."""
        sha, crc = self.cache.digests(path)
        if row.sha256:
            return sha == row.sha256
        return path.stat().st_size == row.size_bytes and (row.crc32c is None or
                                                          crc == row.crc32c)

    def _fetch(self, key: str, target: Path) -> None:
        """Download ``key`` to ``target`` (temp file, then rename); FileNotFoundError when
        absent, :class:`StoreUnavailableError` on any other failure."""
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            with self.fs.open_input_stream(key) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, _BLOCK)
            os.replace(tmp, target)
        except FileNotFoundError:
            raise
        except (OSError, ValueError) as e:
            raise self._unavailable(f"read {key}", e) from e
        finally:
            tmp.unlink(missing_ok=True)

    def read_chunks(self, tenant: str, incident_id: str, chunk_size: int) -> Iterator[bytes]:
        """The object's bytes, streamed (FileNotFoundError when it is gone)."""
        key = self._key(tenant, incident_id)
        try:
            with self.fs.open_input_stream(key) as src:
                while chunk := src.read(chunk_size):
                    yield chunk
        except FileNotFoundError:
            raise
        except (OSError, ValueError) as e:
            raise self._unavailable(f"read {key}", e) from e

    # -- delete, quarantine ------------------------------------------------------------------

    def delete(self, tenant: str, incident_id: str) -> None:
        """The incident object first, then its receipt (a receipt left alone is dropped by
        recovery), then the cached copy."""
        try:
            for suffix in (".arrow", ".json"):
                self._delete_if_present(self._key(tenant, incident_id, suffix))
        except OSError as e:
            raise self._unavailable(f"delete incident {incident_id}", e) from e
        self.cache.drop(self.cache.path(tenant_dir(tenant), incident_id))

    def _delete_if_present(self, key: str) -> None:
        try:
            self.fs.delete_file(key)
        except FileNotFoundError:
            pass

    def _quarantine_key(self, dir_name: str, name: str) -> str:
        return f"{self.base}/quarantine/{dir_name}/{name}"

    def quarantine(self, tenant: str, incident_id: str, *, reason: str, detail: str) -> None:
        """Move the object to ``<uri>/quarantine/<tenant dir>/`` beside a reason object; drop
        its receipt and cached copy."""
        dir_name = tenant_dir(tenant)
        log.error("acknowledged incident %s failed its post-ack check (%s: %s); moved to %s",
                  incident_id, reason, detail, self._quarantine_key(dir_name, ""))
        self._move_aside(self._key(tenant, incident_id), dir_name, incident_id)
        with self.fs.open_output_stream(
                self._quarantine_key(dir_name, f"{incident_id}.reason.json")) as out:
            out.write(json.dumps({"reason": reason, "detail": detail}).encode("utf-8"))
        self._delete_if_present(self._key(tenant, incident_id, ".json"))
        self.cache.drop(self.cache.path(dir_name, incident_id))

    def _move_aside(self, key: str, dir_name: str, incident_id: str) -> None:
        import pyarrow.fs as pafs

        target = self._quarantine_key(dir_name, f"{incident_id}.arrow")
        self._parent(target)
        if self.fs.get_file_info(key).type == pafs.FileType.File:
            self.fs.move(key, target)

    # -- recovery (a FileListing for reconcile_listing) -------------------------------------

    def reconcile(self, index: Catalog, *, full: bool, report: ReindexReport) -> ReindexReport:
        """Make the index agree with the objects under ``<uri>/incidents/``. Refused while
        ``<data_dir>/incidents/`` still holds incidents of the local layout (their rows would
        be dropped): copy them to the store first (the layout is the same)."""
        local = self.spool_dir.parent / "incidents"
        if next(local.glob("*/*.arrow"), None) is not None:
            raise StoreError(
                f"{local} holds incidents of the local layout but store.uri is {self.uri}; "
                f"copy them there first (e.g. `aws s3 sync {local} {self.uri}/incidents`), "
                f"then move {local} away, or set store.uri back to \"\"")
        _remove_tmp(self.spool_dir, report, before=self.opened_at)
        return reconcile_listing(self, index, full=full, report=report)

    def sweep(self, report: ReindexReport) -> dict[tuple[str, str], Any]:
        """The incident objects by (tenant dir, id); receipts without one are deleted."""
        import pyarrow.fs as pafs

        root = f"{self.base}/incidents"
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(root, recursive=True,
                                                            allow_not_found=True))
        except OSError as e:
            raise self._unavailable(f"list {root}", e) from e
        found: dict[tuple[str, str, str], str] = {}
        for info in infos:
            parts = info.path[len(root) + 1:].split("/")
            if info.type != pafs.FileType.File or len(parts) != 2 or not is_tenant_dir(parts[0]):
                continue
            stem, dot, ext = parts[1].rpartition(".")
            if stem.startswith(".") and ext == "tmp":   # a write cut short (not S3: no temps)
                if _stale(info):      # not another sidecar's write in flight (a shared store)
                    self._delete_if_present(info.path)
                    report.tmp_removed += 1
            elif dot and ext in ("arrow", "json") and not stem.startswith("."):
                found[(parts[0], stem, ext)] = info.path
        for (dir_name, stem, ext), key in found.items():
            if ext == "json" and (dir_name, stem, "arrow") not in found:
                self._delete_if_present(key)
        return {(d, s): key for (d, s, ext), key in found.items() if ext == "arrow"}

    def row_of(self, handle: Any, dir_name: str) -> IncidentRow:
        """Fetch the object and its receipt, re-validate (:func:`row_from_file`); the checked
        bytes become the cached copy."""
        key = str(handle)
        stem = key.rsplit("/", 1)[1][:-len(".arrow")]
        scratch = self.cache.root / ".reindex" / dir_name
        arrow, receipt = scratch / f"{stem}.arrow", scratch / f"{stem}.json"
        try:
            self._fetch(key, arrow)
            try:
                self._fetch(key[:-len(".arrow")] + ".json", receipt)
            except FileNotFoundError:
                receipt.unlink(missing_ok=True)
            row = row_from_file(arrow, dir_name=dir_name)
            cached = self.cache.path(dir_name, stem)
            cached.parent.mkdir(parents=True, exist_ok=True)
            os.replace(arrow, cached)
            self.cache.admit(cached)
            return row
        finally:
            arrow.unlink(missing_ok=True)
            receipt.unlink(missing_ok=True)

    def still_stored(self, dir_name: str, incident_id: str) -> bool:
        """Whether the incident object exists now (reconcile's re-check before dropping a row:
        a sidecar sharing the catalog may have stored it after the listing)."""
        import pyarrow.fs as pafs

        key = f"{self.base}/incidents/{dir_name}/{incident_id}.arrow"
        try:
            return bool(self.fs.get_file_info(key).type == pafs.FileType.File)
        except OSError as e:
            raise self._unavailable(f"check {key}", e) from e

    def quarantine_file(self, handle: Any, error: Exception, dir_name: str) -> str:
        """Move an invalid object (and drop its receipt) to ``<uri>/quarantine/<dir>/``."""
        key = str(handle)
        stem = key.rsplit("/", 1)[1][:-len(".arrow")]
        log.error("incident object %s is invalid (%s); moved to %s", key, error,
                  self._quarantine_key(dir_name, ""))
        self._move_aside(key, dir_name, stem)
        self._delete_if_present(key[:-len(".arrow")] + ".json")
        return f"{dir_name}/{stem}"
