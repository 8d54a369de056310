"""Durable file writes: atomic replacement of a file, and making a directory's entries durable.

Example::

    atomic_write("/data/inc-1.arrow", data)   # tmp in same dir, fsync, rename, fsync dir
    fsync_dir("/var/spool/forensics")         # after renaming or creating files there
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from typing import Any

__all__ = ["atomic_write", "fsync_dir"]

#: ``fsync`` errors meaning "this filesystem cannot fsync a directory" (some network and FUSE
#: filesystems), as opposed to an I/O error: tolerated by :func:`fsync_dir`.
_FSYNC_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF})


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the entries just created, renamed or removed in directory ``path`` durable.

    Error policy (the one every caller relies on): an :class:`OSError` is raised when the
    directory cannot be opened (missing, permissions) or its fsync fails with an I/O error —
    the caller's rename is then not known to be durable and must be treated as failed.
    Tolerated, silently: platforms and filesystems where a directory cannot be fsynced at all
    — Windows (a directory cannot be opened for fsync) and an fsync refused with ``EINVAL``,
    ``ENOTSUP``/``EOPNOTSUPP`` or ``EBADF``; there the rename is as durable as it can be made.

    Example::

        os.replace(tmp, final)
        fsync_dir(os.path.dirname(final))
    """
    if os.name == "nt":  # pragma: no cover - directories cannot be opened for fsync there
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` (bytes-like) to ``path`` atomically and durably.

    Writes a temporary file in the same directory (mode 0600), fsyncs it, ``os.replace``\\ s it
    over ``path`` and fsyncs the directory (:func:`fsync_dir`, whose errors propagate). On any
    error before the rename the temporary file is removed and the previous content of ``path``
    (if any) is left untouched.
    """
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(target)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(data).cast("B"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)
