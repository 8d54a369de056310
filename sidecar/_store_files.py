"""Durable file primitives of the local store: streamed, fsynced temp files.

:class:`IncomingFile` receives an upload chunk by chunk on a writer thread (write — and sha256
for the older protocol — overlap with the network); nothing becomes visible until the store
renames it into place.

Example::

    inc = IncomingFile(Path("forensics-data/incidents"), "inc-1")
    inc.write(chunk)
    digest = inc.finish()          # fsynced; or inc.abort()
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import threading
import uuid
from collections.abc import Hashable, Iterator
from pathlib import Path

from integrations.errors import SidecarError

__all__ = ["IncomingFile", "KeyLocks", "StoreError", "StoreUnavailableError"]


#: The writer thread flushes the data written so far every this many bytes (off the receiving
#: thread), so the final fsync before the ack is short.
SYNC_EVERY = 8 * 1024 * 1024


class StoreError(SidecarError):
    """The store could not complete an operation (I/O or index failure)."""


class StoreUnavailableError(StoreError):
    """The object store holding the incident files (``store.uri``) could not be reached or
    refused a write; nothing was acknowledged — retry later."""


class KeyLocks:
    """One lock per key, held only while used: uploads of the same (tenant, id) are one at a
    time, uploads of different keys (an object store's slow PUTs) run side by side.

    Example::

        locks = KeyLocks()
        with locks.hold(("acme", "inc-1")):
            ...
    """

    def __init__(self) -> None:
        self._guard = threading.Condition()
        self._locks: dict[Hashable, tuple[threading.Lock, int]] = {}
        self._exclusive = False

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold every key at once: waits until no key is held, and no key can be taken until
        it ends (a reconciliation of the index with the files must not interleave with an
        upload's publish + insert)."""
        with self._guard:
            self._guard.wait_for(lambda: not self._exclusive)
            self._exclusive = True
            self._guard.wait_for(lambda: not self._locks)
        try:
            yield
        finally:
            with self._guard:
                self._exclusive = False
                self._guard.notify_all()

    @contextlib.contextmanager
    def hold(self, key: Hashable) -> Iterator[None]:
        with self._guard:
            self._guard.wait_for(lambda: not self._exclusive)
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._guard:
                lock, users = self._locks[key]
                if users == 1:
                    del self._locks[key]
                    self._guard.notify_all()
                else:
                    self._locks[key] = (lock, users - 1)


def _write_tmp(directory: Path, stem: str, data: bytes | memoryview) -> Path:
    tmp = directory / f".{stem}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return tmp


class IncomingFile:
    """An upload being streamed into a temp file by a writer thread (hashing as it writes), so
    disk I/O and sha256 overlap with the network. ``finish`` fsyncs and returns the digest;
    ``abort`` removes the temp file. Nothing is visible to readers until ``put_incoming``."""

    def __init__(self, directory: Path, incident_id: str, *, queue_chunks: int = 32,
                 sha256: bool = True) -> None:
        self.incident_id = incident_id
        self.path = directory / f".{incident_id}.{uuid.uuid4().hex}.tmp"
        self.size = 0
        self._digest = hashlib.sha256() if sha256 else None
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        self._q: queue.Queue[bytes | None] = queue.Queue(maxsize=queue_chunks)
        self._error: BaseException | None = None
        self._done = False
        self._thread = threading.Thread(target=self._drain, name="forensics-ingest-writer",
                                        daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        unsynced = 0
        while (chunk := self._q.get()) is not None:
            if self._error is not None:
                continue
            try:
                if self._digest is not None:
                    self._digest.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(self._fd, view):]
                unsynced += len(chunk)
                if unsynced >= SYNC_EVERY:   # flush while the rest streams in: the fsync
                    os.fdatasync(self._fd)   # before the ack then only has the tail left
                    unsynced = 0
            except BaseException as e:   # reported by write()/finish()
                self._error = e

    def write(self, chunk: bytes) -> None:
        """Queue one chunk (blocks when the writer is behind: back-pressure)."""
        if self._error is not None:
            raise StoreError(f"cannot write incident {self.incident_id}: {self._error}")
        self.size += len(chunk)
        self._q.put(chunk)

    def finish(self) -> str:
        """Flush, fsync, close; the sha256 hex digest of everything written (``""`` when
        created with ``sha256=False``)."""
        self._q.put(None)
        self._thread.join()
        try:
            if self._error is None:
                os.fsync(self._fd)
        except OSError as e:
            self._error = e
        finally:
            self._close()
        if self._error is not None:
            self.path.unlink(missing_ok=True)
            raise StoreError(f"cannot write incident {self.incident_id} to {self.path.parent}: "
                             f"{self._error}; check free disk space and permissions")
        return self._digest.hexdigest() if self._digest is not None else ""

    def abort(self) -> None:
        """Stop and remove the temp file (idempotent)."""
        if self._thread.is_alive():
            self._error = self._error or StoreError("aborted")
            self._q.put(None)
            self._thread.join()
        self._close()
        self.path.unlink(missing_ok=True)

    def _close(self) -> None:
        if not self._done:
            self._done = True
            os.close(self._fd)
