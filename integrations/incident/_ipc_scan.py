"""What an Arrow IPC stream asks for, read from its message metadata before anything is decoded.

Each IPC message carries a flatbuffer header (the ``Message`` table of Arrow's ``Message.fbs``):
a record batch's row count, its buffers' offsets and lengths, and — when the body is compressed —
the codec. A compressed buffer starts with its decoded length (int64, ``-1`` = stored raw). This
module walks those headers with a minimal, bounds-checked flatbuffer reader (no inflation, no
array construction) and enforces :class:`~integrations.incident._limits.DecodeLimits`: message
count, row count and total decoded bytes. pyarrow only decodes a stream that passed.

Example::

    shape = scan_stream(pa.py_buffer(data), DecodeLimits())
    shape.decoded_bytes, shape.rows, shape.compressed     # (66068480, 64, False)
"""

from __future__ import annotations

import dataclasses
import struct
from typing import NoReturn

import pyarrow as pa

from integrations.errors import DecodeLimitError, IncidentFormatError

from ._limits import DecodeLimits

__all__ = ["StreamShape", "leading_compressed", "scan_stream"]

# Message.header union tags (Message.fbs): Schema 1, DictionaryBatch 2, RecordBatch 3.
_SCHEMA, _DICTIONARY, _RECORD_BATCH = 1, 2, 3
_STRUCT16 = 16   # FieldNode {length, null_count} and Buffer {offset, length}: two int64


@dataclasses.dataclass(frozen=True)
class StreamShape:
    """What a scanned stream holds: messages, rows, decoded body bytes, any compression."""

    messages: int
    rows: int
    decoded_bytes: int
    compressed: bool


def _bad(msg: str) -> NoReturn:
    raise IncidentFormatError(f"{msg}; the stream is malformed: re-export the incident from its "
                              "source (the recorder's spool or the sidecar store)")


class _Table:
    """One flatbuffer table inside ``buf`` at ``pos`` (every read bounds-checked)."""

    def __init__(self, buf: bytes, pos: int) -> None:
        self.buf, self.pos = buf, pos
        self.vtable = pos - self._read("<i", pos)
        self.vtable_len = self._read("<H", self.vtable)

    def _read(self, fmt: str, pos: int) -> int:
        size = struct.calcsize(fmt)
        if pos < 0 or pos + size > len(self.buf):
            _bad(f"IPC message metadata reads outside itself (offset {pos})")
        return int(struct.unpack_from(fmt, self.buf, pos)[0])

    def _field(self, index: int) -> int | None:
        slot = 4 + 2 * index
        if slot + 2 > self.vtable_len:
            return None
        off = self._read("<H", self.vtable + slot)
        return self.pos + off if off else None

    def scalar(self, index: int, fmt: str, default: int) -> int:
        pos = self._field(index)
        return default if pos is None else self._read(fmt, pos)

    def table(self, index: int) -> _Table | None:
        pos = self._field(index)
        return None if pos is None else _Table(self.buf, pos + self._read("<I", pos))

    def structs(self, index: int) -> list[tuple[int, int]]:
        """A vector of 16-byte structs of two int64 (FieldNode / Buffer)."""
        pos = self._field(index)
        if pos is None:
            return []
        vec = pos + self._read("<I", pos)
        n = self._read("<I", vec)
        if vec + 4 + n * _STRUCT16 > len(self.buf):
            _bad(f"IPC message metadata declares {n} entries beyond its end")
        return [struct.unpack_from("<qq", self.buf, vec + 4 + i * _STRUCT16) for i in range(n)]


def _decoded_size(batch: _Table, body: pa.Buffer | None) -> tuple[int, bool]:
    """(decoded bytes of a RecordBatch body, compressed?) without inflating anything."""
    buffers = batch.structs(2)
    compressed = batch.table(3) is not None
    size = 0 if body is None else body.size
    total = 0
    for offset, length in buffers:
        if offset < 0 or length < 0 or offset + length > size:
            _bad(f"IPC buffer [{offset}, {offset}+{length}) lies outside the message body "
                 f"({size} bytes)")
        if not compressed or length == 0:
            total += length
            continue
        if length < 8:
            _bad(f"compressed IPC buffer of {length} bytes has no length prefix")
        assert body is not None
        declared = struct.unpack_from("<q", body, offset)[0]
        if declared < -1:
            _bad(f"compressed IPC buffer declares a negative decoded length {declared}")
        total += length - 8 if declared == -1 else declared
    return total, compressed


def _batch_of(message: pa.ipc.Message) -> tuple[_Table | None, bool]:
    """(the RecordBatch table of a batch / dictionary message or None, is a record batch?)."""
    meta = message.metadata.to_pybytes()
    if len(meta) < 4:
        _bad(f"IPC message metadata of {len(meta)} bytes")
    root = _Table(meta, struct.unpack_from("<I", meta, 0)[0])
    kind = root.scalar(1, "<B", 0)
    header = root.table(2)
    if kind == _SCHEMA:
        return None, False
    if kind not in (_DICTIONARY, _RECORD_BATCH) or header is None:
        _bad(f"unexpected IPC message type {kind} (an incident holds a schema, dictionaries and "
             "record batches only)")
    if kind == _DICTIONARY:
        data = header.table(1)
        if data is None:
            _bad("IPC dictionary batch without data")
        return data, False
    return header, True


def leading_compressed(buf: pa.Buffer, *, first_batch_only: bool = True) -> bool:
    """Whether any dictionary or record batch (up to the first record batch, or in the whole
    stream) of the stream in ``buf`` has a compressed body, read from the message headers only
    (nothing is inflated): a reader that decodes batches itself before :func:`scan_stream` ran
    (the sidecar's streamed digest) must not decode such a stream. Malformed headers raise
    :class:`IncidentFormatError`."""
    reader = pa.ipc.MessageReader.open_stream(pa.BufferReader(buf))
    while True:
        try:
            message = reader.read_next_message()
        except StopIteration:
            return False
        except (pa.ArrowException, OSError, ValueError) as e:
            _bad(f"not a readable Arrow IPC stream ({type(e).__name__}: {e})")
        batch, is_records = _batch_of(message)
        if batch is not None and batch.table(3) is not None:
            return True
        if is_records and first_batch_only:
            return False


def _limit(what: str, value: int, cap: int, key: str) -> NoReturn:
    raise DecodeLimitError(f"incident {what} {value} exceed this reader's {key} = {cap}; the "
                           "stream is refused before decoding (a decompression bomb or a "
                           f"malformed export) — raise {key} only for an incident you trust")


def scan_stream(buf: pa.Buffer, limits: DecodeLimits) -> StreamShape:
    """Walk every IPC message header of ``buf`` and enforce ``limits`` (module doc).

    Raises :class:`DecodeLimitError` over a cap, :class:`IncidentFormatError` when a header is
    malformed (pyarrow's own reader reports everything else later)."""
    reader = pa.ipc.MessageReader.open_stream(pa.BufferReader(buf))
    messages = rows = decoded = 0
    compressed = False
    while True:
        try:
            message = reader.read_next_message()
        except StopIteration:
            break
        except (pa.ArrowException, OSError, ValueError) as e:
            _bad(f"not a readable Arrow IPC stream ({type(e).__name__}: {e})")
        messages += 1
        if messages > limits.max_messages:
            _limit("IPC messages", messages, limits.max_messages, "max_messages")
        batch, is_records = _batch_of(message)
        if batch is None:
            continue
        if is_records:
            rows += max(0, batch.scalar(0, "<q", 0))
            if rows > limits.max_rows:
                _limit("rows", rows, limits.max_rows, "max_rows")
        size, packed = _decoded_size(batch, message.body)
        compressed = compressed or packed
        decoded += size
        if decoded > limits.max_decoded_bytes:
            _limit("decoded bytes", decoded, limits.max_decoded_bytes, "max_decoded_bytes")
    return StreamShape(messages=messages, rows=rows, decoded_bytes=decoded,
                       compressed=compressed)
