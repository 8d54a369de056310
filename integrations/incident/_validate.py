"""Validate untrusted incident bytes and index their rows, without copying tensor data.

Checks, in order (any failure raises :class:`IncidentFormatError` saying what and what to do):
IPC framing (non-empty, ends with the end-of-stream marker, no trailing bytes), the exact schema
(names, types, nullability, dictionary index types), the ``forensics.manifest`` metadata key and
nothing else, manifest JSON + required keys + supported ``format_version``, Arrow
``validate(full=True)`` and no nulls, then every row (known kind, non-empty site, step >= 0,
allowed dtype, non-negative shape, ``prod(shape) * itemsize == len(data)``, bool bytes 0/1, no
duplicate (kind, site, step)), the row count and — with ``verify`` — the sha256 digest.

Example::

    manifest, rows = parse_stream(pa.py_buffer(data), verify=True)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
import pyarrow as pa

from integrations.errors import IncidentFormatError

from ._digest import DIGEST_ALGORITHM, RowDigest
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


def _read_batches(buf: pa.Buffer) -> tuple[pa.Schema, list[pa.RecordBatch]]:
    n = buf.size
    if n == 0:
        _fail("incident is empty (0 bytes)")
    if n < 16 or bytes(buf[n - 8 :]) != _EOS:
        _fail(
            f"not a complete Arrow IPC stream ({n} bytes): it does not end with the "
            "end-of-stream marker, so it is truncated or not an incident"
        )
    source = pa.BufferReader(buf)
    try:
        reader = pa.ipc.open_stream(source)
        schema = reader.schema
        batches = list(reader)
    except (pa.ArrowException, OSError, ValueError, IndexError) as e:
        _fail(f"not a readable Arrow IPC stream ({type(e).__name__}: {e})", cause=e)
    if source.tell() != n:
        _fail(f"{n - source.tell()} trailing bytes after the end of the Arrow IPC stream")
    return schema, batches


def _parse_manifest(schema: pa.Schema) -> dict[str, Any]:
    meta = schema.metadata or {}
    if MANIFEST_KEY not in meta:
        _fail(
            "Arrow stream has no 'forensics.manifest' schema metadata, so it is not an incident"
        )
    extra = sorted(k.decode("utf-8", "replace") for k in meta if k != MANIFEST_KEY)
    if extra:
        _fail(f"unexpected schema metadata keys {extra}")
    try:
        manifest = json.loads(meta[MANIFEST_KEY].decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as e:
        _fail(f"incident manifest is not valid UTF-8 JSON ({e})", cause=e)
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


def parse_stream(buf: pa.Buffer, *, verify: bool = True) -> tuple[dict[str, Any], list[StoredRow]]:
    """Validate incident bytes held in ``buf``; return (manifest, rows). See module doc."""
    try:
        return _parse(buf, verify=verify)
    except IncidentFormatError:
        raise
    except (pa.ArrowException, ValueError, TypeError, KeyError, IndexError, OverflowError) as e:
        # UnicodeDecodeError is a ValueError: e.g. a field name that is not UTF-8
        _fail(f"malformed incident ({type(e).__name__}: {e})", cause=e)


def _parse(buf: pa.Buffer, *, verify: bool) -> tuple[dict[str, Any], list[StoredRow]]:
    schema, batches = _read_batches(buf)
    _check_schema(schema)
    manifest = _parse_manifest(schema)
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
