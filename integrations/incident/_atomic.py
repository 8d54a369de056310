"""Atomic, durable file writes: readers see the old file or the whole new one, never a part.

Example::

    atomic_write("/data/inc-1.arrow", data)   # tmp in same dir, fsync, rename, fsync dir
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any

__all__ = ["atomic_write"]


def atomic_write(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` (bytes-like) to ``path`` atomically and durably.

    Writes a temporary file in the same directory (mode 0600), fsyncs it, ``os.replace``\\ s it
    over ``path`` and fsyncs the directory. On any error the temporary file is removed and the
    previous content of ``path`` (if any) is left untouched.
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
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
