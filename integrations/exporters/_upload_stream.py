"""The ``UploadIncident`` message stream of one incident, with its checks computed as it is sent.

Two protocols (DESIGN §10; the sidecar's ``sidecar._ingest`` documents both ends):

* **CRC32C** (the default whenever the incident's manifest carries its content digest — every
  incident this package builds does): the header names the content digest (the manifest's
  ``integrity.sha256``, computed when the incident was built, so sending costs no hash pass),
  every chunk carries its CRC32C, the trailer the CRC32C of the whole stream.
* **sha256** (``content_sha256=None``; what clients before the CRC32C protocol sent): the trailer
  carries the sha256 of every byte, hashed while sending.

Example::

    parts = UploadStream("inc-1", data, traceparent=tp)
    stub.UploadIncident(iter(parts), timeout=30)
    parts.crc32c                       # of everything sent (compare with the response)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

from .._crc32c import crc32c, crc32c_extend

__all__ = ["AUTO", "UploadStream", "content_digest", "manifest_from_arrow"]

_MANIFEST_KEY = b"forensics.manifest"

_CHUNK = 1024 * 1024  # sidecar.api.v1.MAX_CHUNK_BYTES (kept literal: no import cost here)
#: ``content_sha256=AUTO``: the manifest's digest when it has one, else the sha256 protocol.
AUTO = "auto"


def manifest_from_arrow(data: bytes) -> dict[str, Any] | None:
    """The manifest from the Arrow stream's schema metadata (reads the schema message only)."""
    try:
        import pyarrow as pa

        schema = pa.ipc.open_stream(pa.py_buffer(data)).schema
        meta = schema.metadata or {}
        m = json.loads(meta[_MANIFEST_KEY])
        return m if isinstance(m, dict) else None
    except Exception:
        return None


def content_digest(data: bytes) -> str | None:
    """The manifest's ``integrity.sha256`` of incident bytes (reads the schema message only),
    or ``None`` when the bytes have none (not an incident, or no integrity section)."""
    integ = (manifest_from_arrow(data) or {}).get("integrity")
    digest = integ.get("sha256") if isinstance(integ, dict) else None
    return digest if isinstance(digest, str) and len(digest) == 64 else None


class UploadStream:
    """Iterable of ``UploadIncidentRequest`` for ``data`` (iterate once).

    ``content_sha256``: :data:`AUTO`, a digest (CRC32C protocol) or ``None`` (sha256 protocol).
    ``trailer_sha256`` / ``trailer_crc32c`` / ``chunk_crc32c=False`` override what is sent
    (tests of the sidecar's checks). After iteration, ``crc32c`` and ``sha256`` (sha256
    protocol only, else ``""``) describe the bytes sent."""

    def __init__(self, incident_id: str, data: bytes, *, traceparent: str = "",
                 tenant: str = "", content_sha256: str | None = AUTO,
                 chunk_size: int = _CHUNK, chunk_crc32c: bool = True,
                 trailer_sha256: str | None = None,
                 trailer_crc32c: int | None = None) -> None:
        self.incident_id, self.data = incident_id, data
        self.traceparent, self.tenant = traceparent, tenant
        self.content_sha256 = content_digest(data) if content_sha256 == AUTO else content_sha256
        self.chunk_size, self.chunk_crc32c = chunk_size, chunk_crc32c
        self._trailer_sha256, self._trailer_crc32c = trailer_sha256, trailer_crc32c
        self.crc32c = 0
        self.sha256 = ""

    @property
    def crc_protocol(self) -> bool:
        return self.content_sha256 is not None

    def __iter__(self) -> Iterator[Any]:
        from sidecar.api.v1 import incidents_pb2 as pb

        yield pb.UploadIncidentRequest(header=pb.UploadHeader(
            incident_id=self.incident_id, total_size=len(self.data), tenant=self.tenant,
            traceparent=self.traceparent, content_sha256=self.content_sha256 or ""))
        hasher = None if self.crc_protocol else hashlib.sha256()
        crc = 0
        view = memoryview(self.data)
        for off in range(0, len(self.data), self.chunk_size):
            chunk = bytes(view[off:off + self.chunk_size])
            if hasher is not None:
                hasher.update(chunk)
            own = crc32c(chunk)
            crc = crc32c_extend(crc, chunk) if off else own
            msg = pb.Chunk(data=chunk)
            if self.chunk_crc32c and self.crc_protocol:
                msg.crc32c = own
            yield pb.UploadIncidentRequest(chunk=msg)
        self.crc32c = crc
        trailer = pb.UploadTrailer()
        if hasher is not None:
            self.sha256 = hasher.hexdigest()
            trailer.sha256 = self._trailer_sha256 if self._trailer_sha256 is not None \
                else self.sha256
        if self.crc_protocol or self._trailer_crc32c is not None:
            trailer.crc32c = crc if self._trailer_crc32c is None else self._trailer_crc32c
        yield pb.UploadIncidentRequest(trailer=trailer)
