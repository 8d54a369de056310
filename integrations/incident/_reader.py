"""Read incidents: validated, indexed, zero-copy access to the stored tensors.

Tensor memory and safety:

* :meth:`Incident.open` maps the file **privately, copy-on-write** (``mmap.ACCESS_COPY``):
  tensors are zero-copy views of the mapping. Writing one in place never reaches the file (and
  never crashes on a read-only page); it does change what this ``Incident`` returns afterwards,
  and a later :meth:`Incident.to_bytes`/:meth:`Incident.write` then fails the integrity check.
  ``clone()`` a tensor before modifying it, or ask for ``copy=True``.
* :meth:`Incident.from_bytes` validates the caller's bytes without copying them, but hands out
  *copies* of tensors: a writable view into an immutable ``bytes`` object would be unsound.
* Incidents built here (:meth:`Incident.from_records`, :meth:`Incident.with_manifest`) own their
  buffer and give zero-copy views, like ``open``.

Example::

    inc = Incident.open("inc-1.arrow")
    inc.sites()                                   # ['blocks.0.resid_post', ...]
    h = inc.tensor("blocks.0.resid_post", step=0) # [batch, pos, d_model], exact dtype
"""

from __future__ import annotations

import copy as _copy
import mmap
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from integrations.errors import IncidentError, IncidentFormatError, TensorNotFoundError

from ._atomic import atomic_write
from ._builder import IncidentBuilder
from ._limits import DEFAULT_LIMITS, DecodeLimits
from ._record import TensorRecord
from ._schema import DTYPE_ITEMSIZE, ROW_KINDS, check_little_endian, torch_dtype
from ._validate import StoredRow, parse_stream, verify_digest

if TYPE_CHECKING:
    import torch

__all__ = ["Incident"]


def _listing(items: Iterable[Any], limit: int = 20) -> str:
    items = list(items)
    shown = ", ".join(repr(x) for x in items[:limit])
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"[{shown}{more}]"


class Incident:
    """A validated incident: manifest plus tensor rows (see module doc for memory semantics).

    Build with :meth:`open`, :meth:`from_bytes` or :meth:`from_records`, never directly.

    Example::

        inc = Incident.from_bytes(data)
        for step in inc.steps("blocks.1.resid_post"):
            h = inc.tensor("blocks.1.resid_post", step=step)   # [batch, pos, d_model]
    """

    def __init__(
        self, buf: pa.Buffer, *, private: memoryview | None, verify: bool, _token: object,
        limits: DecodeLimits = DEFAULT_LIMITS,
    ) -> None:
        if _token is not _TOKEN:
            raise TypeError("use Incident.open, Incident.from_bytes or Incident.from_records")
        check_little_endian()
        self._buf = buf
        self._private = private  # writable view of buf's memory when it is ours alone
        self._views_out = False
        self._manifest, self._rows = parse_stream(buf, verify=verify, limits=limits)
        self._index = {(r.kind, r.site, r.step): r for r in self._rows}

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview | pa.Buffer, *,
                   verify: bool = True, limits: DecodeLimits | None = None) -> Incident:
        """Validate ``data`` (one Arrow IPC stream) and return the incident.

        ``verify=False`` skips only the sha256 digest (structure, schema, manifest, sizes and row
        count are always checked). ``limits`` (default :data:`DEFAULT_LIMITS`) caps what decoding
        may cost, checked before anything is inflated. Raises :class:`IncidentFormatError` on
        anything malformed, :class:`~integrations.errors.DecodeLimitError` over a limit.
        """
        if isinstance(data, pa.Buffer):
            buf = data
        else:
            try:
                buf = pa.py_buffer(data)
            except TypeError as e:
                raise IncidentFormatError(
                    f"incident data must be bytes-like, got {type(data).__name__}"
                ) from e
        return cls(buf, private=None, verify=verify, _token=_TOKEN,
                   limits=limits or DEFAULT_LIMITS)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, verify: bool = True,
             limits: DecodeLimits | None = None) -> Incident:
        """Memory-map and validate the incident file at ``path`` (zero-copy, see module doc);
        ``verify`` and ``limits`` as in :meth:`from_bytes`."""
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise IncidentFormatError(
                    f"incident file {os.fspath(path)!r} is empty (0 bytes); re-export it"
                )
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        view = memoryview(mm)
        return cls(pa.py_buffer(view), private=view, verify=verify, _token=_TOKEN,
                   limits=limits or DEFAULT_LIMITS)

    @classmethod
    def from_records(cls, manifest: Mapping[str, Any], records: Iterable[TensorRecord], *,
                     max_bytes: int | None = None) -> Incident:
        """Build a new incident from a manifest and records (e.g. a replay's activations).

        Example::

            inc2 = Incident.from_records(new_manifest(id="inc-1-replay", activations="replay"),
                                         [TensorRecord("activation", s, "", 0, t)])
        """
        b = IncidentBuilder(manifest=manifest, max_bytes=max_bytes)
        b.extend(records)
        out = b.to_buffer()
        view = memoryview(out)
        private = view if not view.readonly else None
        return cls(out, private=private, verify=False, _token=_TOKEN)

    def with_manifest(self, **updates: Any) -> Incident:
        """A new incident with the same rows and top-level manifest keys replaced.

        The integrity digest is recomputed; ``integrity`` itself cannot be set.

        Example::

            replayed = inc.with_manifest(id=inc.id + "-replay", activations="replay")
        """
        if "integrity" in updates:
            raise IncidentError("'integrity' is computed by the builder and cannot be set")
        manifest = self.manifest
        manifest.pop("integrity")
        manifest.update(updates)
        return Incident.from_records(manifest, self.records())

    # ----------------------------------------------------------------- properties
    @property
    def id(self) -> str:
        """The incident id (client-generated idempotency key)."""
        return str(self._manifest["id"])

    @property
    def manifest(self) -> dict[str, Any]:
        """A deep copy of the manifest (changing it does not change the incident)."""
        return _copy.deepcopy(self._manifest)

    @property
    def digest(self) -> str:
        """The recorded sha256 integrity digest (hex) of manifest and rows."""
        return str(self._manifest["integrity"]["sha256"])

    @property
    def nbytes(self) -> int:
        """Size of the serialised incident in bytes."""
        return int(self._buf.size)

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        kinds = sorted({r.kind for r in self._rows}, key=ROW_KINDS.index)
        return (f"Incident(id={self.id!r}, rows={len(self._rows)}, kinds={kinds}, "
                f"nbytes={self.nbytes})")

    # ----------------------------------------------------------------- lookups
    def _check_kind(self, kind: str | None) -> None:
        if kind is not None and kind not in ROW_KINDS:
            raise TensorNotFoundError(f"unknown kind {kind!r}; kinds are {list(ROW_KINDS)}")

    def sites(self, kind: str | None = "activation") -> list[str]:
        """Sorted distinct site strings of rows of ``kind`` (``None``: every kind)."""
        self._check_kind(kind)
        return sorted({r.site for r in self._rows if kind is None or r.kind == kind})

    def site_order(self, kind: str | None = "activation") -> list[str]:
        """Distinct sites of rows of ``kind`` in stored order: for recorded incidents, the order
        in which the forward pass computed them (``embed`` before ``blocks.0.*`` ...)."""
        self._check_kind(kind)
        seen: dict[str, None] = {}
        for r in self._rows:
            if kind is None or r.kind == kind:
                seen.setdefault(r.site, None)
        return list(seen)

    def steps(self, site: str, kind: str | None = None) -> list[int]:
        """Sorted steps stored for ``site`` (of ``kind``, any kind when ``None``)."""
        self._check_kind(kind)
        steps = sorted({r.step for r in self._rows
                        if r.site == site and (kind is None or r.kind == kind)})
        if not steps:
            raise TensorNotFoundError(
                f"incident {self.id!r} has no {kind or 'row'} for site {site!r}; sites stored: "
                f"{_listing(self.sites(kind))}"
            )
        return steps

    def tensor(self, site: str, *, step: int = 0, kind: str | None = None,
               copy: bool = False) -> torch.Tensor:
        """The stored tensor (exact dtype and shape) for ``site`` at ``step``.

        ``kind=None`` accepts any kind but fails if the site exists under several kinds.
        Zero-copy where the memory allows (see module doc); ``copy=True`` always copies.
        Raises :class:`TensorNotFoundError` listing what is stored.
        """
        self._check_kind(kind)
        kinds = [kind] if kind is not None else list(ROW_KINDS)
        found = [self._index[(k, site, step)] for k in kinds if (k, site, step) in self._index]
        if len(found) > 1:
            raise IncidentError(
                f"site {site!r} at step {step} is stored as kinds {[r.kind for r in found]}; "
                "pass kind= to choose one"
            )
        if not found:
            steps = sorted({r.step for r in self._rows
                            if r.site == site and (kind is None or r.kind == kind)})
            where = (f"steps stored for it: {steps}" if steps
                     else f"sites stored: {_listing(self.sites(kind))}")
            raise TensorNotFoundError(
                f"incident {self.id!r} has no {kind or 'row'} for site {site!r} at step {step}; "
                f"{where}"
            )
        return self._tensor(found[0], copy=copy)

    def records(self, *, kind: str | None = None, copy: bool = False) -> Iterator[TensorRecord]:
        """Every row, in stored order, as :class:`TensorRecord` (only ``kind`` if given)."""
        self._check_kind(kind)
        for r in self._rows:
            if kind is None or r.kind == kind:
                yield TensorRecord(r.kind, r.site, r.module_path, r.step,
                                   self._tensor(r, copy=copy))

    def _tensor(self, r: StoredRow, *, copy: bool) -> torch.Tensor:
        import torch

        dtype = torch_dtype(r.dtype)
        if r.buffer is None:
            return torch.empty(r.shape, dtype=dtype)
        address = r.buffer.address + r.start
        offset = address - self._buf.address
        zero_copy = (
            not copy
            and self._private is not None
            and address % DTYPE_ITEMSIZE[r.dtype] == 0
            and 0 <= offset <= self._buf.size - r.nbytes
        )
        if zero_copy:
            assert self._private is not None
            self._views_out = True
            flat = torch.frombuffer(self._private[offset : offset + r.nbytes], dtype=dtype)
        else:  # caller-owned or misaligned memory: one copy into memory the tensor owns
            flat = torch.frombuffer(bytearray(r.view()), dtype=dtype)
        return flat.reshape(r.shape)

    # ----------------------------------------------------------------- output
    def _check_unmodified(self) -> None:
        if self._views_out:
            try:
                verify_digest(self._manifest, self._rows)
            except IncidentFormatError as e:
                raise IncidentFormatError(
                    f"incident {self.id!r} was modified in memory after reading (a tensor it "
                    "returned was written in place); clone() tensors before modifying them, or "
                    "build a new incident with Incident.from_records"
                ) from e

    def to_bytes(self) -> bytes:
        """The incident's Arrow IPC stream bytes (re-verified if tensor views were handed out)."""
        self._check_unmodified()
        return bytes(self._buf.to_pybytes())

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write the incident to ``path`` atomically (tmp in same dir, fsync, rename, fsync dir)."""
        self._check_unmodified()
        atomic_write(path, self._buf)


_TOKEN = object()
