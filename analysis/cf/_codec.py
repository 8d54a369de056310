"""The CF codec: fixed-scale quantisation, byte planes, zstd — bits per value per position.

Each unit (one position's feature vector) is quantised with the site's FIXED scale learned from
the benign baseline (``scale`` = the benign robust max-abs, mapped to ±127) into int16, so benign
values use ~8 bits and values up to ~258x the benign range still fit (clipping is counted, never
hidden). The int16 codes are zigzag-encoded (small magnitudes -> small codes) and split into a
low-byte and a high-byte plane (the high plane is all zeros for benign values and compresses
to almost nothing), then compressed with zstd. The statistic is compressed bits / value.

Two ways to turn zstd output into a per-position cost (``mode``):

* ``"frame"`` (default): one zstd frame per unit — a position (the detector's default unit),
  or a group of consecutive positions (``offsets``: the (step, position-bucket) units of
  DESIGN §7, ``unit="bucket"``, 2x faster: per-position frames cost 3-4x one zstd call on the
  same float32 bytes at d=576, ``benchmarks/RESULTS_cf.md``); the cost is that frame's size.
* ``"share"``: ONE zstd frame for all the units of a call (planes laid out low plane
  then high plane); each unit gets the share of that frame's measured size proportional to its
  entropy-coded length under the frame's own byte statistics (one 256-symbol model per plane,
  the statistics zstd's literal coder works from). One zstd call per site instead of one per
  position, and sub-byte resolution; up to 1.3x faster than ``"frame"`` at d=576, but it
  localised planted faults and separated prompt injection worse (measured; hence not default).

Example::

    codec = Codec(level=1)
    bits, clipped = codec.bits_per_value(x, scale=3.2)     # x: [n_units, features]
"""

from __future__ import annotations

import itertools
from typing import Literal

import numpy as np

__all__ = ["CODEC_MODES", "QMAX_BENIGN", "Codec", "byte_planes", "quantize", "zigzag"]

#: Benign robust max-abs maps to this code; int16 leaves headroom for ~258x larger values.
QMAX_BENIGN = 127.0
_I16 = 32767
#: Per-position cost modes (see module doc).
CODEC_MODES: tuple[str, ...] = ("frame", "share")


def quantize(x: np.ndarray, scale: float | np.ndarray,
             center: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """``round((x - center) / (scale / 127))`` as int16 ``[n, d]`` (clipped to ±32767; NaN -> 0)
    and the number of values clipped (NaN and ±inf included). ``scale`` is one number or one
    per feature ``[d]``; ``center`` (optional) one per feature ``[d]``."""
    x = np.asarray(x, dtype=np.float32)
    mult = (np.float32(QMAX_BENIGN) / np.asarray(scale, dtype=np.float32)).astype(np.float32)
    if center is None:
        y = np.multiply(x, mult, dtype=np.float32)
    else:
        y = np.subtract(x, np.asarray(center, dtype=np.float32), dtype=np.float32)
        np.multiply(y, mult, out=y)
    np.rint(y, out=y)
    lo, hi = float(y.min()) if y.size else 0.0, float(y.max()) if y.size else 0.0
    clipped = 0
    if not (-_I16 <= lo and hi <= _I16):  # rare path: out of range, inf or NaN present
        bad = ~(np.abs(y) <= _I16)
        clipped = int(np.count_nonzero(bad))
        np.nan_to_num(y, copy=False, nan=0.0, posinf=_I16, neginf=-_I16)
        np.clip(y, -_I16, _I16, out=y)
    return y.astype(np.int16), clipped


def zigzag(q: np.ndarray) -> np.ndarray:
    """Zigzag int16 codes -> uint16 (0, -1, 1, -2, ... -> 0, 1, 2, 3, ...)."""
    q = np.asarray(q, dtype=np.int16)
    return ((q << 1) ^ (q >> 15)).view(np.uint16)


def byte_planes(q: np.ndarray) -> np.ndarray:
    """Zigzag int16 codes ``[n, d]`` -> uint8 ``[n, 2d]``: low-byte plane then high-byte plane."""
    z = zigzag(q)  # [n, d] uint16
    b = z.view(np.uint8).reshape(z.shape[0], z.shape[1], 2)  # little-endian: [..., 0] = low
    if np.little_endian:
        return np.ascontiguousarray(b.transpose(0, 2, 1)).reshape(z.shape[0], 2 * z.shape[1])
    return np.ascontiguousarray(b[:, :, ::-1].transpose(0, 2, 1)).reshape(  # pragma: no cover
        z.shape[0], 2 * z.shape[1])


def _code_lengths(counts: np.ndarray) -> np.ndarray:
    """Ideal code length in bits of each symbol (``-log2 p``; 0 for unused symbols)."""
    total = float(counts.sum())
    if total <= 0:
        return np.zeros(counts.shape, dtype=np.float64)
    with np.errstate(divide="ignore"):
        lengths = -np.log2(counts / total)
    lengths[counts == 0] = 0.0
    return lengths


class Codec:
    """zstd at ``level`` (single-threaded, no checksum/size headers) measuring bits per value;
    ``mode`` chooses how a frame's size is attributed to positions (see module doc)."""

    def __init__(self, *, level: int = 1, mode: Literal["share", "frame"] = "frame") -> None:
        import zstandard

        if mode not in CODEC_MODES:
            raise ValueError(f"mode={mode!r}: use one of {CODEC_MODES}")
        self.level = level
        self.mode = mode
        self._c = zstandard.ZstdCompressor(level=level, write_checksum=False,
                                           write_content_size=False, write_dict_id=False)

    def compressed_sizes(self, planes: np.ndarray,
                         offsets: np.ndarray | None = None) -> np.ndarray:
        """Compressed byte count of every row of ``planes`` (one zstd frame per row), or with
        ``offsets`` ([n_units + 1] row offsets) of every row group ``planes[o[i]:o[i+1]]``
        (one frame per group; rows are contiguous, so no copy)."""
        c = self._c.compress
        if offsets is None:
            return np.fromiter((len(c(row.data)) for row in planes), dtype=np.float64,
                               count=planes.shape[0])
        bounds = offsets.tolist()
        return np.fromiter((len(c(planes[a:b].data)) for a, b in itertools.pairwise(bounds)),
                           dtype=np.float64, count=len(bounds) - 1)

    def shared_sizes(self, z: np.ndarray) -> np.ndarray:
        """Per-row share (bytes) of one zstd frame over zigzag codes ``z`` ``[n, d]`` uint16.

        The frame holds the low-byte plane of every row, then the high-byte plane; row i gets
        ``frame_bytes * H_i / sum(H)``, ``H_i`` its code length under the frame's per-plane
        byte frequencies (equal shares if every H is 0, e.g. all-zero codes).
        """
        n, d = z.shape
        high = (z >> 8).astype(np.uint8)  # [n, d]
        low = (z & 0xFF).astype(np.uint8)  # [n, d]
        frame = len(self._c.compress(low.tobytes() + high.tobytes()))
        # per-row symbol counts in one bincount: index = row * 256 + byte
        idx = low.astype(np.uint32)
        idx |= (np.arange(n, dtype=np.uint32) << 8)[:, None]
        counts = np.bincount(idx.ravel(), minlength=n * 256).reshape(n, 256)  # [n, 256]
        h = counts @ _code_lengths(counts.sum(axis=0))  # [n] bits
        if high.any():  # the high plane is sparse: cost its nonzero bytes only
            nz = np.flatnonzero(high)
            vals = high.ravel()[nz]
            hc = np.bincount(vals, minlength=256)
            hc[0] = n * d - nz.size
            len_high = _code_lengths(hc)
            h = h + d * len_high[0] + np.bincount(nz // d, weights=len_high[vals] - len_high[0],
                                                  minlength=n)
        total = float(h.sum())
        if total <= 0.0 or n == 0:
            return np.full(n, frame / max(n, 1), dtype=np.float64)
        return h * (frame / total)

    def bits_per_value(self, x: np.ndarray, *, scale: float | np.ndarray,
                       offsets: np.ndarray | None = None,
                       center: np.ndarray | None = None) -> tuple[np.ndarray, int]:
        """Bits per value of every row of ``x`` ``[n_rows, features]`` — or, with ``offsets``
        ([n_units + 1]), of every row group (a unit of several positions) — and the clip count.
        ``scale``/``center``: see :func:`quantize`."""
        q, clipped = quantize(x, scale, center)
        n_units = x.shape[0] if offsets is None else len(offsets) - 1
        if n_units == 0 or x.shape[0] == 0:
            return np.zeros(n_units, dtype=np.float64), clipped
        if self.mode == "frame":
            sizes = self.compressed_sizes(byte_planes(q), offsets)
        else:
            sizes = self.shared_sizes(zigzag(q))
            if offsets is not None:
                sizes = np.add.reduceat(sizes, offsets[:-1])
        width = max(x.shape[1], 1)
        values = width if offsets is None else width * np.diff(offsets).astype(np.float64)
        return sizes * 8.0 / values, clipped
