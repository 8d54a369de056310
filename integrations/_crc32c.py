"""CRC32C (Castagnoli), the upload's transport check (DESIGN §10), hardware-accelerated.

The middleware computes it per chunk while it sends and the sidecar while it receives; both
use ``google-crc32c`` (SSE4.2 / ARMv8 CRC instructions; ~10 GB/s here, versus ~1.5 GB/s for
sha256 on a CPU with SHA extensions and ~0.3 GB/s without).

Example::

    crc = 0
    for chunk in chunks:
        crc = crc32c_extend(crc, chunk)
    crc == crc32c(b"".join(chunks))        # True
"""

from __future__ import annotations

from typing import Any

__all__ = ["crc32c", "crc32c_extend"]

_impl: Any = None


def _g() -> Any:
    global _impl
    if _impl is None:
        import google_crc32c

        _impl = google_crc32c
    return _impl


def crc32c_extend(crc: int, data: bytes) -> int:
    """The CRC32C of (the bytes ``crc`` covers) + ``data``; start from 0."""
    return int(_g().extend(crc, data if isinstance(data, bytes) else bytes(data)))


def crc32c(data: bytes) -> int:
    """The CRC32C of ``data`` (an unsigned 32-bit int)."""
    return crc32c_extend(0, data)
