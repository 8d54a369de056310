"""Validate untrusted incident bytes and index their rows, without copying tensor data.

Checks, in order (any failure raises :class:`IncidentFormatError` saying what and what to do):
IPC framing (non-empty, ends with the end-of-stream marker, no trailing bytes), the decode limits
on the message headers before anything is inflated (:class:`DecodeLimitError`: decoded bytes,
rows, messages — see ``_ipc_scan``), the manifest's size and nesting depth, the exact schema
(names, types, nullability, dictionary index types), the ``forensics.manifest`` metadata key and
nothing else, manifest JSON + required keys + supported ``format_version``, Arrow
``validate(full=True)`` and no nulls, then every row (known kind, non-empty site, step >= 0,
allowed dtype, non-negative shape, ``prod(shape) * itemsize == len(data)``, bool bytes 0/1, no
duplicate (kind, site, step)), the row count and — with ``verify`` — the sha256 digest.

Example::

    manifest, rows = parse_stream(pa.py_buffer(data), verify=True, limits=DecodeLimits())
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
import pyarrow as pa

from integrations.errors import DecodeLimitError, IncidentFormatError

from ._digest import DIGEST_ALGORITHM, RowDigest
from ._ipc_scan import scan_stream
from ._limits import DecodeLimits
from ._manifest import validate_manifest
from ._schema import DTYPE_ITEMSIZE, MANIFEST_KEY, ROW_KINDS, SCHEMA, RowMeta

__all__ = ["StoredRow", "parse_stream", "verify_digest"]

_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"
_REEXPORT = "re-export the incident from its source (the recorder's spool or the sidecar store)"


@dataclass(frozen=True)
class StoredRow(RowMeta):
    """Index entry of one validated row; ``buffer[start:end]`` holds the tensor bytes."""

    buffer: pa.Buffer | None
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    def view(self) -> memoryview:
        """Read-only bytes of the row (zero-copy)."""
        if self.buffer is None:
            return memoryview(b"")
        return memoryview(self.buffer)[self.start : self.end]


def _fail(msg: str, *, cause: BaseException | None = None) -> NoReturn:
    raise IncidentFormatError(f"{msg}; {_REEXPORT}") from cause


def _reject_constant(name: str) -> Any:
    raise ValueError(f"JSON constant {name} is not allowed")


def _open_reader(buf: pa.Buffer, limits: DecodeLimits) -> tuple[pa.BufferReader, Any]:
    """Framing and decode limits checked, the stream opened (its schema read, nothing else)."""
    n = buf.size
    if n == 0:
        _fail("incident is empty (0 bytes)")
    if n < 16 or bytes(buf[n - 8 :]) != _EOS:
        _fail(
            f"not a complete Arrow IPC stream ({n} bytes): it does not end with the "
            "end-of-stream marker, so it is truncated or not an incident"
        )
    scan_stream(buf, limits)
    source = pa.BufferReader(buf)
    try:
        return source, pa.ipc.open_stream(source)
    except (pa.ArrowException, OSError, ValueError, IndexError) as e:
        _fail(f"not a readable Arrow IPC stream ({type(e).__name__}: {e})", cause=e)


def _read_batches(source: pa.BufferReader, reader: Any, n: int) -> list[pa.RecordBatch]:
    try:
        batches = list(reader)
    except (pa.ArrowException, OSError, ValueError, IndexError) as e:
        _fail(f"not a readable Arrow IPC stream ({type(e).__name__}: {e})", cause=e)
    if source.tell() != n:
        _fail(f"{n - source.tell()} trailing bytes after the end of the Arrow IPC stream")
    return batches


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON (iterative: no recursion limit to hit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict)
                                                 else item))
    return deepest


def _load_manifest(raw: bytes, limits: DecodeLimits) -> Any:
    """The manifest JSON, within the size and depth limits (checked before / while parsing)."""
    if len(raw) > limits.max_manifest_bytes:
        raise DecodeLimitError(
            f"incident manifest is {len(raw)} bytes, over this reader's max_manifest_bytes = "
            f"{limits.max_manifest_bytes}; keep large data in tensor rows, not in the manifest")
    try:
        manifest = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as e:
        _fail(f"incident manifest is not valid UTF-8 JSON ({e})", cause=e)
    except RecursionError as e:   # nesting deeper than the interpreter's recursion limit
        _fail(f"incident manifest nests deeper than max_manifest_depth = "
              f"{limits.max_manifest_depth}", cause=e)
    if _depth(manifest) > limits.max_manifest_depth:
        _fail(f"incident manifest nests {_depth(manifest)} levels deep, over "
              f"max_manifest_depth = {limits.max_manifest_depth}")
    return manifest


def _parse_manifest(schema: pa.Schema, limits: DecodeLimits) -> dict[str, Any]:
    meta = schema.metadata or {}
    if MANIFEST_KEY not in meta:
        _fail(
            "Arrow stream has no 'forensics.manifest' schema metadata, so it is not an incident"
        )
    extra = sorted(k.decode("utf-8", "replace") for k in meta if k != MANIFEST_KEY)
    if extra:
        _fail(f"unexpected schema metadata keys {extra}")
    manifest = _load_manifest(meta[MANIFEST_KEY], limits)
    validate_manifest(manifest)
    assert isinstance(manifest, dict)
    return manifest


def _check_schema(schema: pa.Schema) -> None:
    if not schema.equals(SCHEMA, check_metadata=False):
        got = str(schema.remove_metadata()).replace("\n", ", ")
        want = str(SCHEMA).replace("\n", ", ")
        _fail(f"Arrow schema is not the incident schema: got [{got}], expected [{want}]")


def _check_batch(batch: pa.RecordBatch, b: int) -> None:
    try:
        batch.validate(full=True)
    except (pa.ArrowException, ValueError) as e:
        _fail(f"record batch {b} is structurally invalid ({e})", cause=e)
    for name, col in zip(batch.schema.names, batch.columns):
        if col.null_count:
            _fail(f"column {name!r} of record batch {b} has null values")
    for name in ("kind", "site"):
        col = batch.column(name)
        if col.dictionary.null_count or col.indices.null_count:
            _fail(f"dictionary column {name!r} of record batch {b} has null values")
    if batch.column("shape").flatten().null_count:
        _fail(f"column 'shape' of record batch {b} has null dimensions")


def _rows_of(batch: pa.RecordBatch, b: int) -> list[StoredRow]:
    n = batch.num_rows
    kinds = batch.column("kind").to_pylist()
    sites = batch.column("site").to_pylist()
    paths = batch.column("module_path").to_pylist()
    steps = batch.column("step").to_pylist()
    dtypes = batch.column("dtype").to_pylist()
    shapes = batch.column("shape").to_pylist()
    data = batch.column("data")
    _, off_buf, data_buf = data.buffers()
    if n:
        offsets = np.frombuffer(off_buf, dtype="<i8", count=data.offset + n + 1)[data.offset :]
    else:
        offsets = np.zeros(1, dtype="<i8")
    size = 0 if data_buf is None else data_buf.size
    rows = []
    for i in range(n):
        where = f"row {i} of record batch {b} ({kinds[i]} {sites[i]!r} step {steps[i]})"
        if kinds[i] not in ROW_KINDS:
            _fail(f"{where}: unknown kind {kinds[i]!r} (allowed: {list(ROW_KINDS)})")
        if not sites[i]:
            _fail(f"{where}: empty site")
        if steps[i] < 0:
            _fail(f"{where}: negative step {steps[i]}")
        if dtypes[i] not in DTYPE_ITEMSIZE:
            _fail(f"{where}: dtype {dtypes[i]!r} is not allowed (allowed: {list(DTYPE_ITEMSIZE)})")
        shape = tuple(shapes[i])
        if any(d < 0 for d in shape):
            _fail(f"{where}: negative dimension in shape {list(shape)}")
        start, end = int(offsets[i]), int(offsets[i + 1])
        if not 0 <= start <= end <= size:
            _fail(f"{where}: data offsets [{start}, {end}) outside the data buffer ({size} bytes)")
        expected = math.prod(shape) * DTYPE_ITEMSIZE[dtypes[i]]
        if expected != end - start:
            _fail(
                f"{where}: shape {list(shape)} of {dtypes[i]} needs {expected} bytes but the "
                f"row holds {end - start}"
            )
        if dtypes[i] == "bool" and end > start:
            values = np.frombuffer(data_buf, dtype=np.uint8, count=end - start, offset=start)
            if int(values.max()) > 1:
                _fail(f"{where}: bool tensor holds bytes other than 0 and 1")
        rows.append(
            StoredRow(kinds[i], sites[i], paths[i], steps[i], dtypes[i], shape,
                      data_buf if end > start else None, start, end)
        )
    return rows


def verify_digest(manifest: dict[str, Any], rows: list[StoredRow]) -> None:
    """Recompute the ``sha256-incident-v1`` digest and compare with the manifest's."""
    integ = manifest["integrity"]
    digest = RowDigest(manifest)
    for r in rows:
        digest.add_row(r, r.view())
    if digest.hexdigest() != integ["sha256"]:
        _fail(
            f"integrity check failed for incident {manifest['id']!r}: sha256 of its content "
            f"is {digest.hexdigest()}, the manifest records {integ['sha256']}; the bytes were "
            "corrupted (or modified) after writing"
        )


def parse_stream(buf: pa.Buffer, *, verify: bool = True,
                 limits: DecodeLimits) -> tuple[dict[str, Any], list[StoredRow]]:
    """Validate incident bytes held in ``buf`` within ``limits``; return (manifest, rows). See
    module doc."""
    try:
        return _parse(buf, verify=verify, limits=limits)
    except IncidentFormatError:
        raise
    except (pa.ArrowException, ValueError, TypeError, KeyError, IndexError, OverflowError) as e:
        # UnicodeDecodeError is a ValueError: e.g. a field name that is not UTF-8
        _fail(f"malformed incident ({type(e).__name__}: {e})", cause=e)


def _parse(buf: pa.Buffer, *, verify: bool,
           limits: DecodeLimits) -> tuple[dict[str, Any], list[StoredRow]]:
    source, reader = _open_reader(buf, limits)
    schema = reader.schema
    _check_schema(schema)
    manifest = _parse_manifest(schema, limits)
    batches = _read_batches(source, reader, buf.size)
    integ = manifest["integrity"]
    if integ["algorithm"] != DIGEST_ALGORITHM:
        _fail(f"unsupported integrity algorithm {integ['algorithm']!r} (this code checks "
              f"{DIGEST_ALGORITHM!r}); upgrade model-forensics")
    rows: list[StoredRow] = []
    for b, batch in enumerate(batches):
        _check_batch(batch, b)
        rows.extend(_rows_of(batch, b))
    if len(rows) != integ["rows"]:
        _fail(f"incident {manifest['id']!r} holds {len(rows)} rows but was written with "
              f"{integ['rows']}: it is truncated or rows were lost")
    seen: set[tuple[str, str, int]] = set()
    for r in rows:
        key = (r.kind, r.site, r.step)
        if key in seen:
            _fail(f"duplicate row {r.kind} {r.site!r} at step {r.step}")
        seen.add(key)
    if verify:
        verify_digest(manifest, rows)
    return manifest, rows
