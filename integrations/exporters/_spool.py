"""A local disk spool for incidents the sidecar could not take yet, bounded in bytes.

The :class:`SidecarExporter` parks incidents here while the sidecar is unreachable and a
background thread re-sends them, oldest first, deleting each file only after the sidecar
acknowledged it. Every entry is one complete incident (the same Arrow bytes that are uploaded)
written atomically (temp name, fsync, rename, fsync of the directory), so a crash of the serving
process never leaves a half entry under a final name; stray temp files are removed when a spool
is opened again, and the entries already there are picked up (a restarted serving process
re-sends what its predecessor spooled).

File names order the entries: ``<ordinal:020d>-<pid>-<incident id>.arrow``, where the ordinal is
strictly increasing within a spool directory (``max(time_ns, last + 1)``, continued from the
largest ordinal found on disk), so a sorted listing is the export order.

Example::

    spool = DiskSpool("/var/spool/forensics", max_bytes=1 << 30)
    entry = spool.put("inc-1", data)          # raises SpoolFullError at the byte bound
    for entry in spool.entries():              # oldest first
        send(entry.read()); spool.remove(entry)
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ExportError
from ..incident import fsync_dir

__all__ = ["DiskSpool", "SpoolEntry", "SpoolFullError"]

_SUFFIX = ".arrow"
_TMP_PREFIX = ".tmp-"
_LOCK_NAME = ".drain.lock"
_NAME_RE = re.compile(r"^(\d{20})-(\d+)-(.+)\.arrow$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class SpoolFullError(ExportError):
    """The spool is at its byte bound; the incident was not spooled (counted as ``spool_full``)."""


@dataclass(frozen=True, order=True)
class SpoolEntry:
    """One spooled incident: its ordinal (export order), file path, incident id and size."""

    ordinal: int
    path: Path
    incident_id: str
    nbytes: int

    def read(self) -> bytes:
        """The incident's Arrow bytes exactly as they were spooled."""
        return self.path.read_bytes()


def _safe_id(incident_id: str) -> str:
    """A file-name-safe form of the id (the id itself is inside the Arrow bytes anyway)."""
    safe = _UNSAFE.sub("_", incident_id)[:128]
    return safe or "_"


class DiskSpool:
    """A directory of atomically written incident files, bounded by ``max_bytes`` in total.

    Thread-safe. Several processes may share one directory (a forked server): names carry the
    writer's pid, and an entry removed by another process is simply gone for this one.
    """

    def __init__(self, directory: str | os.PathLike[str], *, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"spool max_bytes must be > 0, got {max_bytes}")
        self.directory = Path(directory)
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._last_ordinal = 0
        self._nbytes = 0
        self._lock_fd: int | None = None
        self._cleanup_and_scan()

    # -- state -------------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Bytes held by complete entries (as last counted by this process)."""
        with self._lock:
            return self._nbytes

    def __len__(self) -> int:
        return len(self.entries())

    def is_empty(self) -> bool:
        """True when no complete entry is on disk (stops at the first one found)."""
        try:
            with os.scandir(self.directory) as it:
                return not any(_NAME_RE.match(e.name) for e in it)
        except FileNotFoundError:
            return True

    # -- one drainer per directory -----------------------------------------------------------

    def try_acquire_drain_lock(self) -> bool:
        """Become the one process that re-sends this directory's entries (non-blocking).

        Several processes may spool into one directory (a pre-forked server); only the holder
        of this ``flock`` drains it, so entries are not uploaded N times. The OS releases the
        lock when the holder dies."""
        if self._lock_fd is not None:
            return True
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: every process drains (idempotent)
            return True
        fd = os.open(self.directory / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return False
            raise
        self._lock_fd = fd
        return True

    def release_drain_lock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)  # closing the descriptor releases the flock

    def forget_drain_lock_after_fork(self) -> None:
        """In a forked child: drop the inherited descriptor (the parent keeps the lock)."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)  # the parent's descriptor still holds the flock
        self._lock = threading.Lock()

    def _cleanup_and_scan(self) -> None:
        for p in self.directory.iterdir():
            if p.name.startswith(_TMP_PREFIX):
                with contextlib.suppress(OSError):
                    p.unlink()  # an interrupted put: never acknowledged to anyone
        self.rescan()

    def rescan(self) -> int:
        """Recount the bytes on disk (other processes may share the directory); returns them."""
        entries = self.entries()
        with self._lock:
            self._nbytes = sum(e.nbytes for e in entries)
            if entries:
                self._last_ordinal = max(self._last_ordinal, entries[-1].ordinal)
            return self._nbytes

    def entries(self) -> list[SpoolEntry]:
        """Every complete entry, oldest first."""
        out: list[SpoolEntry] = []
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return out
        for name in names:
            m = _NAME_RE.match(name)
            if m is None:
                continue
            path = self.directory / name
            try:
                size = path.stat().st_size
            except FileNotFoundError:  # removed concurrently
                continue
            out.append(SpoolEntry(int(m.group(1)), path, m.group(3), size))
        out.sort()
        return out

    # -- mutations ---------------------------------------------------------------------------

    def put(self, incident_id: str, data: bytes) -> SpoolEntry:
        """Durably add one incident after every entry already present.

        Raises :class:`SpoolFullError` when it would take the spool over ``max_bytes`` and
        ``OSError`` when the disk write (or the fsync of the directory, see
        :func:`~integrations.incident.fsync_dir`) fails; in both cases nothing is left behind.
        """
        n = len(data)
        with self._lock:
            if self._nbytes + n > self.max_bytes:
                raise SpoolFullError(
                    f"spool {self.directory} holds {self._nbytes} bytes; incident {incident_id!r} "
                    f"({n} bytes) would exceed spool_max_bytes={self.max_bytes}. Bring the "
                    "sidecar back or raise spool_max_bytes.")
            ordinal = max(time.time_ns(), self._last_ordinal + 1)
            self._last_ordinal = ordinal
            self._nbytes += n  # reserve before the (unlocked) write
        name = f"{ordinal:020d}-{os.getpid()}-{_safe_id(incident_id)}{_SUFFIX}"
        final = self.directory / name
        tmp = self.directory / f"{_TMP_PREFIX}{name}"
        try:
            # 0600 like incident files (atomic_write): an entry holds activations, maybe text
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            fsync_dir(self.directory)
        except BaseException:
            for path in (tmp, final):  # a non-durable entry must not be sent later either
                with contextlib.suppress(OSError):
                    path.unlink()
            with self._lock:
                self._nbytes -= n
            raise
        return SpoolEntry(ordinal, final, incident_id, n)

    def remove(self, entry: SpoolEntry) -> None:
        """Delete an entry (after the sidecar acknowledged it, or after it was dropped)."""
        with contextlib.suppress(FileNotFoundError):  # another process sharing the directory
            entry.path.unlink()                      # may have got there first
        with self._lock:
            self._nbytes = max(0, self._nbytes - entry.nbytes)
