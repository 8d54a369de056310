"""The local copies of object-store incidents that jobs read (``<data_dir>/cache/``), bounded.

An incident on an object store (:mod:`sidecar._incident_files_fs`) is read by a job through a
local file (``Incident.open`` memory-maps it). :class:`LocalCache` keeps those copies in
``<cache>/<tenant dir>/<id>.arrow`` and evicts the least recently used ones once their total
size passes ``budget_bytes`` (the newest copy is always kept, whatever its size). Evicting an
open file is safe: a reader keeps its inode until it closes it. A copy is never trusted
blindly: the store checks it against the index row before use, and :meth:`digests` remembers
the last check per (mtime, size) so an unchanged copy is hashed once.

Example::

    cache = LocalCache(Path("forensics-data/cache"), budget_bytes=2 << 30)
    path = cache.path("t-acme", "inc-1")
    ...                              # download into path (temp file + rename)
    cache.admit(path)                # counted; older copies evicted past the budget
"""

from __future__ import annotations

import collections
import hashlib
import threading
import time
from pathlib import Path

from integrations._crc32c import crc32c_extend

__all__ = ["DEFAULT_CACHE_BYTES", "LocalCache"]

#: Default budget of the local copies (bytes): a few large incidents, many small ones.
DEFAULT_CACHE_BYTES = 2 * 1024 ** 3
_BLOCK = 8 * 1024 * 1024
#: A temp file untouched this long (seconds) is a download cut short by a crash: removed when
#: a cache is built. Downloads in flight write continuously, so their files stay younger.
STRAY_TMP_AGE_S = 600.0


class LocalCache:
    """Least-recently-used local copies under ``root`` (thread-safe; module doc)."""

    def __init__(self, root: Path, *, budget_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.root, self.budget_bytes = root, budget_bytes
        root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._sizes: collections.OrderedDict[Path, int] = collections.OrderedDict()
        self._digests: dict[Path, tuple[tuple[int, int], str, int]] = {}
        copies = [p for p in root.glob("*/*.arrow") if p.is_file()]
        for p in sorted(copies, key=lambda p: p.stat().st_mtime_ns):   # oldest first
            self._sizes[p] = p.stat().st_size
        self._drop_strays()
        self._evict()

    def _drop_strays(self) -> None:
        """Remove downloads cut short by a crash: temp files untouched for
        :data:`STRAY_TMP_AGE_S`. A younger one may be another process's download in flight
        (workers beside the sidecar share the directory, and a restarted worker builds its
        cache while the others fetch), so it is left alone."""
        now = time.time()
        for stray in self.root.glob("**/.*.tmp"):
            try:
                if now - stray.stat().st_mtime > STRAY_TMP_AGE_S:
                    stray.unlink()
            except FileNotFoundError:   # its download finished (renamed) meanwhile
                pass

    def path(self, dir_name: str, incident_id: str) -> Path:
        """Where the copy of (tenant dir, id) lives (which may not exist)."""
        return self.root / dir_name / f"{incident_id}.arrow"

    @property
    def size_bytes(self) -> int:
        """The bytes of every copy held now."""
        with self._lock:
            return sum(self._sizes.values())

    def admit(self, path: Path) -> None:
        """Count a copy just written at ``path`` (the most recent), then evict past the budget."""
        with self._lock:
            self._sizes.pop(path, None)
            self._sizes[path] = path.stat().st_size
            self._evict()

    def touch(self, path: Path) -> None:
        """Mark a copy as just used."""
        with self._lock:
            if path in self._sizes:
                self._sizes.move_to_end(path)

    def drop(self, path: Path) -> None:
        """Remove a copy (its incident was deleted, quarantined or replaced)."""
        with self._lock:
            self._sizes.pop(path, None)
            self._digests.pop(path, None)
        path.unlink(missing_ok=True)

    def digests(self, path: Path) -> tuple[str, int]:
        """(sha256 hex, CRC32C) of a copy, computed once per (mtime, size)."""
        st = path.stat()
        stamp = (st.st_mtime_ns, st.st_size)
        known = self._digests.get(path)
        if known is not None and known[0] == stamp:
            return known[1], known[2]
        h, crc = hashlib.sha256(), 0
        with open(path, "rb") as f:
            while block := f.read(_BLOCK):
                h.update(block)
                crc = crc32c_extend(crc, block)
        self._digests[path] = (stamp, h.hexdigest(), crc)
        return h.hexdigest(), crc

    def _evict(self) -> None:
        total = sum(self._sizes.values())
        while total > self.budget_bytes and len(self._sizes) > 1:
            oldest, size = self._sizes.popitem(last=False)
            self._digests.pop(oldest, None)
            oldest.unlink(missing_ok=True)
            total -= size
