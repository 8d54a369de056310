"""The incident's row digest, computed while its bytes arrive (one pass, off the ack path).

An incident carries its own integrity digest (``sha256-incident-v1``: manifest + every row's
fields and tensor bytes, see ``integrations.incident``). Verifying it after the upload is a
second full sha256 pass over the incident, serial between "last chunk received" and "ack". This
module overlaps it with the network: as soon as the first bytes give the stream's layout (schema,
manifest, dictionaries and every small buffer precede the tensor bytes, which are the last buffer
of the record batch), a thread hashes each row's bytes as they arrive. At the end, the layout is
re-read from the complete file and must match the speculated one exactly (every row's fields and
byte range); only then is the streamed digest compared with the manifest's. When anything does
not line up (a compressed or multi-batch stream, an unusual layout, a parse error), the result
is "not verified" and the store verifies the digest the ordinary way — this is an optimisation
that never changes an outcome.

Example::

    sink = VerifyingSink(store.incoming("inc-1"), total_size=n)
    for chunk in chunks:
        sink.write(chunk)
    sink.finish()                       # transport sha256 (hex)
    store.put_incoming(sink.inner, tenant=None, sha256=..., digest_verified=sink.digest_verified)
"""

from __future__ import annotations

import json
import mmap
import queue
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import hashlib

    from ._store_files import IncomingFile

__all__ = ["RowLayout", "StreamingDigest", "VerifyingSink", "read_layout"]

#: Bytes kept in memory while waiting for the layout; beyond this the speculation gives up.
MAX_PREFIX = 16 * 1024 * 1024


@dataclass(frozen=True)
class RowLayout:
    """One row: the digest head (its fields, length-prefixed) and its absolute byte range."""

    head: bytes
    start: int
    end: int


def _str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<I", len(b)) + b


def _head(kind: str, site: str, module_path: str, step: int, dtype: str,
          shape: Sequence[int], nbytes: int) -> bytes:
    """The ``sha256-incident-v1`` bytes hashed before a row's data (integrations.incident)."""
    return b"".join([_str(kind), _str(site), _str(module_path), struct.pack("<q", step),
                     _str(dtype), struct.pack("<I", len(shape)),
                     struct.pack(f"<{len(shape)}q", *shape), struct.pack("<Q", nbytes)])


def _manifest_prefix(manifest: dict[str, Any]) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "integrity"}
    m = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                   allow_nan=False).encode("utf-8")
    return struct.pack("<Q", len(m)) + m


def _buffers(arr: Any) -> list[Any]:
    out = [b for b in arr.buffers() if b is not None]
    if hasattr(arr, "dictionary"):
        out += [b for b in arr.dictionary.buffers() if b is not None]
    return out


def read_layout(buf: Any, *, first_batch_only: bool, known: int | None = None,
                ) -> tuple[dict[str, Any], list[RowLayout]] | None:
    """The digest layout of the incident stream in ``buf`` (a pyarrow Buffer over memory whose
    first ``known`` bytes are real; ``None`` = all). Returns ``None`` when it cannot be read
    from that much, or the stream is not an uncompressed incident layout."""
    import numpy as np
    import pyarrow as pa

    from integrations.incident import DIGEST_ALGORITHM, MANIFEST_KEY
    from integrations.incident._ipc_scan import leading_compressed

    known = buf.size if known is None else known
    base = buf.address
    if leading_compressed(buf, first_batch_only=first_batch_only):
        return None               # never inflate here: the store checks decoded sizes first
        return None
    reader = pa.ipc.open_stream(pa.BufferReader(buf))
    meta = reader.schema.metadata or {}
    manifest = json.loads(meta[MANIFEST_KEY])
    if not isinstance(manifest, dict) or \
            (manifest.get("integrity") or {}).get("algorithm") != DIGEST_ALGORITHM:
        return None
    batches = [reader.read_next_batch()] if first_batch_only else list(reader)
    rows: list[RowLayout] = []
    for batch in batches:
        data = batch.column("data")
        values = data.buffers()[2]
        small = [b for name in batch.schema.names if name != "data"
                 for b in _buffers(batch.column(name))] + [data.buffers()[1]]
        for b in small:   # everything but the tensor bytes must be real (and in the file)
            if not 0 <= b.address - base <= known - b.size:
                return None
        n = batch.num_rows
        vpos = 0 if values is None else values.address - base
        if values is not None and not 0 <= vpos <= buf.size - values.size:
            return None   # decompressed copy (compressed stream): not positions in the file
        offsets = np.frombuffer(data.buffers()[1], dtype="<i8", count=data.offset + n + 1)
        offsets = offsets[data.offset:]
        cols = [batch.column(c).to_pylist() for c in
                ("kind", "site", "module_path", "step", "dtype", "shape")]
        for i in range(n):
            s, e = int(offsets[i]), int(offsets[i + 1])
            if not 0 <= s <= e or (values is not None and e > values.size) or \
                    (rows and vpos + s < rows[-1].end):
                return None   # rows must not overlap and ascend (they are hashed in file order)
            kind, site, path, step, dtype, shape = (c[i] for c in cols)
            rows.append(RowLayout(_head(kind, site, path, step, dtype, shape, e - s),
                                  vpos + s, vpos + e))
    return manifest, rows


class StreamingDigest:
    """Feeds arriving chunks (in order) to a thread that computes the row digest."""

    def __init__(self, total_size: int, *, queue_chunks: int = 64) -> None:
        self.total_size = total_size
        self._q: queue.Queue[bytes | None] = queue.Queue(maxsize=queue_chunks)
        self._prefix = bytearray()
        self._manifest: dict[str, Any] | None = None
        self._rows: list[RowLayout] = []
        self._gave_up = False
        self._hash: hashlib._Hash | None = None
        self._row = 0          # index of the row being hashed
        self._head_done = False
        self._next_try = 4096  # prefix size of the next layout attempt
        self._offset = 0       # absolute offset of the next byte fed to the thread
        self._thread = threading.Thread(target=self._run, name="forensics-ingest-digest",
                                        daemon=True)
        self._thread.start()

    def feed(self, chunk: bytes) -> None:
        """Queue the next chunk (blocks when the thread is behind: back-pressure)."""
        if not self._gave_up:
            self._q.put(chunk)

    def _run(self) -> None:
        while (chunk := self._q.get()) is not None:
            if self._gave_up:
                continue
            try:
                self._consume(chunk)
            except Exception:   # never fail an upload here: the store verifies instead
                self._gave_up = True
                self._prefix = bytearray()

    def _consume(self, chunk: bytes) -> None:
        start = self._offset
        self._offset += len(chunk)
        if self._hash is not None:
            self._hash_range(chunk, start)
            return
        self._prefix += chunk
        done = self._offset >= self.total_size
        if len(self._prefix) < self._next_try and not done:
            return
        self._next_try = 2 * len(self._prefix)   # a bounded number of attempts (~13)
        if not self._try_layout():
            if len(self._prefix) > MAX_PREFIX or self._offset >= self.total_size:
                self._gave_up = True
                self._prefix = bytearray()
            return
        prefix, self._prefix = bytes(self._prefix), bytearray()
        self._hash_range(prefix, 0)

    def _try_layout(self) -> bool:
        import hashlib

        import pyarrow as pa

        mm = mmap.mmap(-1, self.total_size)   # zero pages; only the prefix is touched
        try:
            mm[:len(self._prefix)] = self._prefix
            try:
                found = read_layout(pa.py_buffer(mm), first_batch_only=True,
                                    known=len(self._prefix))
            except (pa.ArrowException, ValueError, KeyError, TypeError, IndexError, OSError):
                return False
        finally:
            try:
                mm.close()
            except BufferError:   # a pyarrow buffer still exports it: freed with that object
                pass
        if found is None:
            return False
        self._manifest, self._rows = found
        self._hash = hashlib.sha256(_manifest_prefix(self._manifest))
        self._advance()
        return True

    def _advance(self) -> None:
        """Hash the head of the current row (once), and skip past rows without data."""
        assert self._hash is not None
        while self._row < len(self._rows):
            r = self._rows[self._row]
            if not self._head_done:
                self._hash.update(r.head)
                self._head_done = True
            if r.end > r.start:
                return
            self._row += 1
            self._head_done = False

    def _hash_range(self, chunk: bytes, start: int) -> None:
        """Hash the parts of ``chunk`` (at absolute ``start``) that are row data, in order."""
        assert self._hash is not None
        view = memoryview(chunk)
        end = start + len(chunk)
        self._advance()
        while self._row < len(self._rows):
            r = self._rows[self._row]
            lo, hi = max(r.start, start), min(r.end, end)
            if hi > lo:
                self._hash.update(view[lo - start:hi - start])
            if r.end > end:
                return   # the row continues in a later chunk
            self._row += 1
            self._head_done = False
            self._advance()

    def result(self) -> tuple[str, dict[str, Any], list[RowLayout]] | None:
        """Wait for the thread; (hex digest, manifest, layout) or ``None`` (not computed)."""
        self._q.put(None)
        self._thread.join()
        if self._gave_up or self._hash is None or self._row < len(self._rows) or \
                self._manifest is None:
            return None
        return self._hash.hexdigest(), self._manifest, self._rows

    def abort(self) -> None:
        """Stop the thread (idempotent)."""
        self._gave_up = True
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()


def verify_streamed(path: Path, streamed: tuple[str, dict[str, Any], list[RowLayout]]) -> bool:
    """True when the complete file at ``path`` has exactly the streamed layout and the streamed
    digest equals the manifest's recorded one (so a second digest pass would agree)."""
    import pyarrow as pa

    digest, manifest, rows = streamed
    try:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            found = read_layout(pa.py_buffer(mm), first_batch_only=False)
        finally:
            import gc

            gc.collect()   # drop pyarrow views before closing the map
            try:
                mm.close()
            except BufferError:
                pass
    except Exception:
        return False
    if found is None:
        return False
    final_manifest, final_rows = found
    if final_manifest != manifest or [(r.head, r.start, r.end) for r in final_rows] != \
            [(r.head, r.start, r.end) for r in rows]:
        return False
    return digest == (manifest.get("integrity") or {}).get("sha256")


class VerifyingSink:
    """An :class:`~sidecar._store_files.IncomingFile` that also streams the row digest.

    After :meth:`finish`, ``digest_verified`` is True when the incident's own digest was proved
    while receiving (the store may then skip its second pass)."""

    def __init__(self, inner: IncomingFile, total_size: int) -> None:
        self.inner = inner
        self.digest_verified = False
        self._digest = StreamingDigest(total_size)

    def write(self, chunk: bytes) -> None:
        self.inner.write(chunk)
        self._digest.feed(chunk)

    def finish(self) -> str:
        hexdigest = self.inner.finish()
        streamed = self._digest.result()
        self.digest_verified = streamed is not None and verify_streamed(self.inner.path, streamed)
        return hexdigest

    def abort(self) -> None:
        self._digest.abort()
        self.inner.abort()
