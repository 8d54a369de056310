"""Write incidents: collect tensor rows and a manifest, emit one validated Arrow IPC stream.

Example::

    b = IncidentBuilder(manifest=new_manifest(id="inc-1"))
    b.add(kind="activation", site="blocks.0.resid_post", module_path="model.layers.0", step=0,
          tensor=h)                                   # h: [batch, pos, d_model]
    data = b.to_bytes(max_bytes=50 * 2**20)          # bytes of one Arrow IPC stream
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from integrations.errors import IncidentFormatError, IncidentTooLargeError

from ._digest import RowDigest
from ._manifest import normalize_manifest
from ._schema import MANIFEST_KEY, ROW_KINDS, SCHEMA, RowMeta, check_little_endian, dtype_name

if TYPE_CHECKING:
    import torch

    from ._record import TensorRecord

__all__ = ["IncidentBuilder", "too_large"]

_ROW_OVERHEAD = 64  # bytes per row for offsets, indices, shape, strings (estimate)
_MAX_INT32 = 2**31 - 1


@dataclass(frozen=True)
class _Row(RowMeta):
    data: np.ndarray  # uint8, owned, contiguous


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def too_large(incident_id: str, nbytes: int, max_bytes: int) -> IncidentTooLargeError:
    """The error for an incident of ``nbytes`` over a cap of ``max_bytes``."""
    return IncidentTooLargeError(
        f"incident {incident_id!r} is {nbytes} bytes ({_mib(nbytes)}), over the cap of "
        f"{max_bytes} bytes ({_mib(max_bytes)}) set by recorder.max_bundle_size_mb; raise "
        "recorder.max_bundle_size_mb or record fewer sites/steps"
    )


def _row_meta(kind: str, site: str, module_path: str, step: int, tensor: Any) -> RowMeta:
    """The row's columns, or :class:`IncidentFormatError` saying what is wrong with them."""
    import torch

    if kind not in ROW_KINDS:
        raise IncidentFormatError(f"unknown row kind {kind!r}; use one of {list(ROW_KINDS)}")
    if not isinstance(site, str) or not site:
        raise IncidentFormatError(f"site must be a non-empty string, got {site!r}")
    if not isinstance(module_path, str):
        raise IncidentFormatError(f"module_path must be a string, got {module_path!r}")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= _MAX_INT32:
        raise IncidentFormatError(f"step must be an int in [0, 2**31), got {step!r}")
    if not isinstance(tensor, torch.Tensor):
        raise IncidentFormatError(
            f"tensor for {kind} {site!r} step {step} must be a torch.Tensor, "
            f"got {type(tensor).__name__}"
        )
    if tensor.layout != torch.strided or tensor.is_quantized:
        raise IncidentFormatError(
            f"tensor for {kind} {site!r} must be a dense (strided) tensor; call .to_dense()"
        )
    dtype = dtype_name(tensor.dtype)
    shape = tuple(int(d) for d in tensor.shape)
    if any(d > _MAX_INT32 for d in shape):
        raise IncidentFormatError(f"tensor for {site!r} has a dimension over 2**31-1")
    return RowMeta(kind, site, module_path, step, dtype, shape)


def _raw_bytes(tensor: torch.Tensor, *, copy: bool) -> np.ndarray:
    """The tensor's raw little-endian bytes as a uint8 array (bf16 bits kept).

    A copy unless ``copy=False`` and the tensor already is contiguous CPU memory."""
    import torch

    src = tensor.detach()
    fresh = False  # does src already live in new memory that only the builder sees?
    if src.device.type != "cpu":
        src, fresh = src.cpu(), True
    if src.is_conj() or src.is_neg():
        src, fresh = src.resolve_conj().resolve_neg(), True
    if not src.is_contiguous():
        src, fresh = src.contiguous(), True
    data = src.reshape(-1).view(torch.uint8).numpy()
    if copy and not fresh:
        data = data.copy()  # numpy memcpy: one plain copy, no thread pool
    return data


class IncidentBuilder:
    """Collects tensor rows for one incident and serialises them (see module doc).

    ``manifest`` needs at least ``id`` (build complete ones with :func:`new_manifest`); missing
    format keys are set to ``None`` (= not recorded). ``max_bytes`` makes :meth:`add` raise
    :class:`IncidentTooLargeError` as soon as the rows exceed it, so a recorder can stop copying.
    Each ``add`` copies the tensor (a later in-place change of the source does not leak in)
    unless ``copy=False``. :meth:`to_buffer` avoids the final copy into ``bytes``.
    """

    def __init__(self, *, manifest: Mapping[str, Any], max_bytes: int | None = None) -> None:
        check_little_endian()
        self._manifest = normalize_manifest(manifest)
        self._derive_sites = self._manifest["sites"] is None
        self._max_bytes = max_bytes
        self._rows: list[_Row] = []
        self._keys: set[tuple[str, str, int]] = set()
        self._nbytes = len(json.dumps(self._manifest)) + 1024

    @property
    def id(self) -> str:
        """The incident id from the manifest."""
        return str(self._manifest["id"])

    @property
    def nbytes(self) -> int:
        """Estimated size in bytes of the serialised incident so far (data + overhead)."""
        return self._nbytes

    def __len__(self) -> int:
        return len(self._rows)

    def add(
        self,
        *,
        kind: str,
        site: str,
        tensor: torch.Tensor,
        module_path: str = "",
        step: int = 0,
        copy: bool = True,
    ) -> None:
        """Append one tensor row (exact dtype/shape/bits kept).

        The tensor is copied now unless ``copy=False``: then a contiguous CPU tensor is kept by
        reference (saves a copy when the caller already cloned it) and must not be modified
        afterwards.

        Raises :class:`IncidentFormatError` for an unknown kind, an empty site, a bad step, an
        unsupported dtype or a duplicate (kind, site, step); :class:`IncidentTooLargeError` when
        ``max_bytes`` would be exceeded (the row is then not added).
        """
        meta = _row_meta(kind, site, module_path, step, tensor)
        key = (kind, site, step)
        if key in self._keys:
            raise IncidentFormatError(
                f"duplicate row: {kind} {site!r} at step {step} was already added; each "
                "(kind, site, step) is stored once — use a new step per forward call"
            )
        size = tensor.numel() * tensor.element_size()
        projected = self._nbytes + size + _ROW_OVERHEAD + len(site) + len(module_path)
        if self._max_bytes is not None and projected > self._max_bytes:
            raise too_large(self.id, projected, self._max_bytes)
        self._rows.append(_Row(**vars(meta), data=_raw_bytes(tensor, copy=copy)))
        self._keys.add(key)
        self._nbytes = projected

    def extend(self, records: Iterable[TensorRecord], *, copy: bool = True) -> None:
        """:meth:`add` every record, in order (``copy`` as for :meth:`add`)."""
        for r in records:
            self.add(kind=r.kind, site=r.site, module_path=r.module_path, step=r.step,
                     tensor=r.tensor, copy=copy)

    def manifest(self) -> dict[str, Any]:
        """A copy of the manifest as it will be written (``sites`` and ``integrity`` filled)."""
        m = json.loads(json.dumps(self._manifest))
        if self._derive_sites:
            m["sites"] = sorted({r.site for r in self._rows if r.kind == "activation"})
        return dict(m)

    def to_buffer(self, *, max_bytes: int | None = None,
                  compression: str | None = None) -> pa.Buffer:
        """Like :meth:`to_bytes` but returns the Arrow buffer (no final copy).

        ``compression="zstd"`` (or ``"lz4"``) compresses the Arrow body buffers losslessly
        (``recorder.compression_ratio`` < 1); readers decompress transparently, at the price of
        zero-copy reads.
        """
        cap = max_bytes if max_bytes is not None else self._max_bytes
        if cap is not None and self._nbytes > cap:
            raise too_large(self.id, self._nbytes, cap)
        manifest = self.manifest()
        rows = self._rows
        digest = RowDigest(manifest)
        offsets = np.zeros(len(rows) + 1, dtype="<i8")
        np.cumsum([r.data.nbytes for r in rows], out=offsets[1:])
        data = np.empty(int(offsets[-1]), dtype=np.uint8)
        for i, r in enumerate(rows):
            data[offsets[i] : offsets[i + 1]] = r.data
            digest.add_row(r, r.data)
        manifest["integrity"] = digest.integrity()

        kinds = pa.DictionaryArray.from_arrays(
            pa.array([ROW_KINDS.index(r.kind) for r in rows], pa.int8()), pa.array(ROW_KINDS, pa.utf8())
        )
        sites = pa.array([r.site for r in rows], pa.utf8()).dictionary_encode()
        arrays = [
            kinds,
            sites,
            pa.array([r.module_path for r in rows], pa.utf8()),
            pa.array([r.step for r in rows], pa.int32()),
            pa.array([r.dtype for r in rows], pa.utf8()),
            pa.array([list(r.shape) for r in rows], SCHEMA.field("shape").type),
            pa.LargeBinaryArray.from_buffers(
                pa.large_binary(), len(rows), [None, pa.py_buffer(offsets), pa.py_buffer(data)]
            ),
        ]
        schema = SCHEMA.with_metadata({MANIFEST_KEY: json.dumps(manifest).encode("utf-8")})
        batch = pa.RecordBatch.from_arrays(arrays, schema=schema)
        sink = pa.BufferOutputStream()
        options = pa.ipc.IpcWriteOptions(compression=compression)
        with pa.ipc.new_stream(sink, schema, options=options) as writer:
            writer.write_batch(batch)
        out = sink.getvalue()
        if cap is not None and out.size > cap:
            raise too_large(self.id, out.size, cap)
        return out

    def to_bytes(self, *, max_bytes: int | None = None, compression: str | None = None) -> bytes:
        """Serialise to one Arrow IPC stream (manifest in schema metadata, digest included).

        ``max_bytes`` (default: the builder's ``max_bytes``) caps the result; over it,
        :class:`IncidentTooLargeError` names the size, the cap and
        ``recorder.max_bundle_size_mb``.
        """
        return bytes(self.to_buffer(max_bytes=max_bytes, compression=compression).to_pybytes())
