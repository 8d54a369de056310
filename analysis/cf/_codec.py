"""The CF codec: fixed-scale quantisation, byte planes, zstd — bits per value per position.

Each unit (one position's feature vector) is quantised with the site's FIXED scale learned from
the benign baseline (``scale`` = the benign robust max-abs, mapped to ±127) into int16, so benign
values use ~8 bits and values up to ~258x the benign range still fit (clipping is counted, never
hidden). The int16 codes are zigzag-encoded (small magnitudes -> small codes) and split into a
low-byte and a high-byte plane (the high plane is all zeros for benign values and compresses
to almost nothing), then compressed with zstd. The statistic is compressed bits / value.

Example::

    codec = Codec(level=1)
    bits, clipped = codec.bits_per_value(x, scale=3.2)     # x: [n_units, features]
"""

from __future__ import annotations

import numpy as np

__all__ = ["QMAX_BENIGN", "Codec", "byte_planes", "quantize"]

#: Benign robust max-abs maps to this code; int16 leaves headroom for ~258x larger values.
QMAX_BENIGN = 127.0
_I16 = 32767


def quantize(x: np.ndarray, scale: float) -> tuple[np.ndarray, int]:
    """``round(x / (scale / 127))`` as int16 (clipped to ±32767) and the number clipped."""
    step = scale / QMAX_BENIGN
    q = np.rint(np.asarray(x, dtype=np.float32) / np.float32(step))
    q = np.nan_to_num(q, nan=0.0, posinf=_I16, neginf=-_I16)
    clipped = int(np.count_nonzero(np.abs(q) > _I16))
    return np.clip(q, -_I16, _I16).astype(np.int16), clipped


def byte_planes(q: np.ndarray) -> np.ndarray:
    """Zigzag int16 codes ``[n, d]`` -> uint8 ``[n, 2d]``: low-byte plane then high-byte plane."""
    q32 = q.astype(np.int32)
    z = ((q32 << 1) ^ (q32 >> 31)).astype(np.uint16)  # [n, d]
    return np.concatenate([(z & 0xFF).astype(np.uint8), (z >> 8).astype(np.uint8)], axis=1)


class Codec:
    """zstd at ``level`` (single-threaded, no checksum/size headers) measuring bits per value."""

    def __init__(self, *, level: int = 1) -> None:
        import zstandard

        self.level = level
        self._c = zstandard.ZstdCompressor(level=level, write_checksum=False,
                                           write_content_size=False, write_dict_id=False)

    def compressed_sizes(self, planes: np.ndarray) -> np.ndarray:
        """Compressed byte count of every row of ``planes`` (one zstd frame per row)."""
        c = self._c.compress
        return np.fromiter((len(c(row.tobytes())) for row in planes), dtype=np.float64,
                           count=planes.shape[0])

    def bits_per_value(self, x: np.ndarray, *, scale: float) -> tuple[np.ndarray, int]:
        """Bits per value of every row of ``x`` ``[n_units, features]`` and the clip count."""
        q, clipped = quantize(x, scale)
        sizes = self.compressed_sizes(byte_planes(q))
        return sizes * 8.0 / max(x.shape[1], 1), clipped
