"""Ingest: an ``UploadIncident`` stream from its first message to a durable, indexed incident.

:func:`receive_upload` enforces framing, size caps and the transport check while the chunks
stream into a sink; :func:`upload_tenant` decides the owner; :func:`store_upload` makes the
upload durable inside the ``ingest`` span, mapping store errors to counted rejections;
:func:`count_received` reports a new incident. Nothing is written for a rejected upload.

Two integrity protocols (DESIGN §10, chosen by the client's header):

* **CRC32C** (``header.content_sha256`` set; today's clients): each chunk's CRC32C is checked as
  it arrives and the whole stream's against the trailer; the sink only writes. The header's
  content digest must be the manifest's ``integrity.sha256``; the store acknowledges once the
  file is validated, durable and indexed, and verifies the digest against the rows *after* the
  ack (:mod:`sidecar._store_verify`: a mismatch is quarantined and counted).
* **sha256** (no content digest; older clients): the trailer's sha256 over every byte is
  checked, and the rows' digest is verified before the ack (:mod:`sidecar._ingest_digest`).
  The CRC32C is computed as well, so both protocols index the same facts.

Example::

    upload = receive_upload(request_iterator, config.limits, open_sink)
    result = store_upload(store, upload, tenant=upload_tenant(principal, upload), telemetry=tel)
    if result.created:
        count_received(tel, result.row.size_bytes)
"""

from __future__ import annotations

import dataclasses
import errno
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import grpc

from integrations._crc32c import crc32c, crc32c_extend
from integrations.errors import DecodeLimitError, IncidentFormatError, IncidentTooLargeError

from ._auth import Principal
from ._config_sections import LimitsConfig
from ._ingest_digest import VerifyingSink
from ._observer import Telemetry, counter, incident_attributes
from ._reject import Rejection
from ._store import ID_PATTERN, AlreadyExistsError, IncidentStore, PutResult, StoreError
from ._store_files import StoreUnavailableError
from .api import v1

__all__ = [
    "INCIDENTS_RECEIVED",
    "INGEST_BYTES",
    "METRICS",
    "Sink",
    "Upload",
    "count_received",
    "crc_protocol",
    "receive_upload",
    "store_upload",
    "unavailable",
    "upload_tenant",
]

log = logging.getLogger("sidecar.ingest")

INCIDENTS_RECEIVED = counter("incidents_received", "Incidents made durable and indexed "
                             "(idempotent retries not counted).")
INGEST_BYTES = counter("ingest_bytes", "Bytes of incidents made durable.")
METRICS = (INCIDENTS_RECEIVED, INGEST_BYTES)


class Sink(Protocol):
    """Where received chunks go (``LocalStore.incoming`` returns one)."""

    def write(self, chunk: bytes) -> None: ...

    def finish(self) -> str: ...

    def abort(self) -> None: ...


_HEX64 = frozenset("0123456789abcdef")


@dataclasses.dataclass(frozen=True)
class Upload:
    """A completely received upload whose transport check passed (its bytes are in ``sink``).

    ``sha256``: the transport sha256 (sha256 protocol), ``""`` with the CRC32C protocol;
    ``crc32c``: of every byte received; ``content_sha256``: the header's claim (CRC32C
    protocol), ``""`` with the sha256 protocol."""

    header: v1.UploadHeader
    sink: Any
    sha256: str
    crc32c: int = 0
    content_sha256: str = ""

    @property
    def crc_protocol(self) -> bool:
        return bool(self.content_sha256)


def crc_protocol(header: v1.UploadHeader) -> bool:
    """Whether ``header`` selects the CRC32C protocol (it carries a content digest)."""
    return bool(header.content_sha256)


def _invalid(reason: str, message: str) -> Rejection:
    return Rejection(grpc.StatusCode.INVALID_ARGUMENT, reason, message)


def _read_header(it: Iterator[v1.UploadIncidentRequest], limits: LimitsConfig) -> v1.UploadHeader:
    first = next(it, None)
    if first is None or first.WhichOneof("part") != "header":
        raise _invalid("bad_framing", "UploadIncident must start with a header message")
    header = first.header
    if not ID_PATTERN.fullmatch(header.incident_id):
        raise _invalid("bad_id", f"incident id {header.incident_id!r} must be 1-200 characters "
                                 "of [A-Za-z0-9._-] starting with a letter or digit")
    if header.total_size <= 0:
        raise _invalid("bad_framing",
                       "header.total_size must be the positive byte size of the incident")
    if header.total_size > limits.max_incident_bytes:
        raise Rejection(grpc.StatusCode.RESOURCE_EXHAUSTED, "too_large",
                        f"incident is {header.total_size} bytes, over this sidecar's "
                        f"limits.max_incident_bytes = {limits.max_incident_bytes}")
    digest = header.content_sha256
    if digest and (len(digest) != 64 or not _HEX64.issuperset(digest)):
        raise _invalid("bad_framing", "header.content_sha256 must be the manifest's "
                                      "integrity.sha256: 64 lower-case hex digits")
    return header


def _receive_chunks(it: Iterator[v1.UploadIncidentRequest], header: v1.UploadHeader,
                    limits: LimitsConfig, sink: Sink) -> tuple[v1.UploadTrailer, int]:
    """Chunks into ``sink`` until the trailer; the byte count must match the header. Returns
    the trailer and the CRC32C of every byte (a chunk's own CRC32C is checked on arrival)."""
    received = 0
    crc = 0
    trailer: v1.UploadTrailer | None = None
    for msg in it:
        part = msg.WhichOneof("part")
        if trailer is not None or part not in ("chunk", "trailer"):
            raise _invalid("bad_framing", f"unexpected {part or 'empty'} message: after the "
                                          "header send only chunks, then exactly one trailer")
        if part == "trailer":
            trailer = msg.trailer
            continue
        data = msg.chunk.data
        if len(data) > limits.max_chunk_bytes:
            raise Rejection(grpc.StatusCode.RESOURCE_EXHAUSTED, "chunk_too_large",
                            f"chunk of {len(data)} bytes is over limits.max_chunk_bytes = "
                            f"{limits.max_chunk_bytes}; send smaller chunks")
        received += len(data)
        if received > header.total_size:
            raise _invalid("size_mismatch", f"more bytes than header.total_size = "
                                            f"{header.total_size}")
        if msg.chunk.HasField("crc32c") and crc32c(data) != msg.chunk.crc32c:
            raise _data_loss("crc32c_mismatch", f"chunk at byte {received - len(data)} fails "
                                                "its CRC32C; it was corrupted in transit — resend")
        crc = crc32c_extend(crc, data)
        sink.write(data)
    if trailer is None:
        raise _invalid("bad_framing",
                       "stream ended without a trailer; the upload is incomplete")
    if received != header.total_size:
        raise _invalid("size_mismatch", f"received {received} bytes but header.total_size = "
                                        f"{header.total_size}")
    if crc_protocol(header) and not trailer.HasField("crc32c"):
        raise _invalid("bad_framing", "with header.content_sha256 set, the trailer must carry "
                                      "the CRC32C of the whole stream")
    if trailer.HasField("crc32c") and trailer.crc32c != crc:
        raise _data_loss("crc32c_mismatch", f"CRC32C of the received bytes is {crc:#010x}, the "
                                            f"trailer says {trailer.crc32c:#010x}; the data was "
                                            "corrupted in transit — resend")
    return trailer, crc


def _data_loss(reason: str, message: str) -> Rejection:
    return Rejection(grpc.StatusCode.DATA_LOSS, reason, message)


def receive_upload(requests: Iterable[v1.UploadIncidentRequest], limits: LimitsConfig,
                   open_sink: Callable[[v1.UploadHeader], Sink]) -> Upload:
    """Read header → chunks → trailer into ``open_sink(header)``, enforcing framing, size caps
    and the transport check of the header's protocol (module doc). On any rejection or error
    the sink is aborted. ``open_sink`` returns a hashing sink for the sha256 protocol and a
    plain writer (``finish`` returns ``""``) for the CRC32C protocol (:func:`crc_protocol`)."""
    it = iter(requests)
    header = _read_header(it, limits)
    sink = open_sink(header)
    try:
        trailer, crc = _receive_chunks(it, header, limits, sink)
        hexdigest = sink.finish()
        if not crc_protocol(header) and trailer.sha256.lower() != hexdigest:
            raise _data_loss("sha256_mismatch",
                             f"sha256 of the received bytes is {hexdigest}, the trailer says "
                             f"{trailer.sha256!r}; the data was corrupted in transit — resend")
    except BaseException:
        sink.abort()
        raise
    return Upload(header=header, sink=sink, sha256=hexdigest if not crc_protocol(header) else "",
                  crc32c=crc, content_sha256=header.content_sha256)


def upload_tenant(principal: Principal, upload: Upload) -> str | None:
    """The owner recorded for ``upload``: the token's tenant; an admin may name one in the
    header or the call's metadata (``None``: the manifest's). Naming a tenant other than the
    token's (or than the one the metadata names) is refused."""
    header = upload.header
    if principal.admin and principal.tenant is None:
        return header.tenant or None
    if header.tenant and header.tenant != principal.tenant:
        upload.sink.abort()
        raise Rejection(grpc.StatusCode.PERMISSION_DENIED, "permission_denied",
                        f"header.tenant {header.tenant!r} is not the tenant of this token; "
                        "leave header.tenant empty")
    return principal.tenant


def _put(store: IncidentStore, upload: Upload, tenant: str | None) -> PutResult:
    """``store.put_incoming`` with store errors as counted rejections."""
    streamed = isinstance(upload.sink, VerifyingSink)
    try:
        return store.put_incoming(upload.sink.inner if streamed else upload.sink, tenant=tenant,
                                  sha256=upload.sha256, crc32c=upload.crc32c,
                                  content_sha256=upload.content_sha256,
                                  digest_verified=streamed and upload.sink.digest_verified)
    except IncidentTooLargeError as e:
        raise Rejection(grpc.StatusCode.RESOURCE_EXHAUSTED, "too_large", str(e)) from e
    except DecodeLimitError as e:   # before IncidentFormatError, its base
        raise Rejection(grpc.StatusCode.RESOURCE_EXHAUSTED, "decoded_too_large", str(e)) from e
    except AlreadyExistsError as e:
        raise Rejection(grpc.StatusCode.ALREADY_EXISTS, "already_exists", str(e)) from e
    except IncidentFormatError as e:
        raise _invalid("invalid_incident", f"not a valid incident: {e}") from e
    except StoreError as e:
        log.exception("store failure for %s", upload.header.incident_id)
        raise unavailable(e) from e


def _disk_full(error: BaseException) -> bool:
    seen: BaseException | None = error
    for _ in range(8):   # the exception chain, bounded
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def unavailable(error: StoreError) -> Rejection:
    """The rejection for a store failure (nothing was acknowledged; the client retries). The
    client is told what happened, never where (paths stay in the sidecar's log): reason
    ``disk_full`` for a full disk or quota, ``store_unavailable`` when the object store of
    ``store.uri`` failed, else ``internal``."""
    if isinstance(error, StoreUnavailableError):
        return Rejection(grpc.StatusCode.UNAVAILABLE, "store_unavailable",
                         "the sidecar could not write the incident to its object store; "
                         "nothing was acknowledged — retry later (operators: check store.uri "
                         "and the sidecar's log)")
    if _disk_full(error) or "No space left" in str(error):
        return Rejection(grpc.StatusCode.UNAVAILABLE, "disk_full",
                         "the sidecar's disk is full; nothing was acknowledged — retry later "
                         "(operators: free space in the data dir, see the sidecar's log)")
    return Rejection(grpc.StatusCode.UNAVAILABLE, "internal",
                     "the sidecar could not store the incident (store failure); nothing was "
                     "acknowledged — retry later (operators: see the sidecar's log)")


def store_upload(store: IncidentStore, upload: Upload, *, tenant: str | None,
                 telemetry: Telemetry) -> PutResult:
    """Make ``upload`` durable and indexed inside an ``ingest`` span (linked to the request's
    trace); raises :class:`Rejection` when the store refuses it."""
    header = upload.header
    with telemetry.span("ingest", traceparent=header.traceparent or None,
                        attributes={"forensics.incident.id": header.incident_id,
                                    "forensics.incident.bytes": header.total_size,
                                    "forensics.incident.tenant": tenant or ""}) as span:
        result = _put(store, upload, tenant)
        for key, value in incident_attributes(result.row).items():
            span.set_attribute(key, value)
        span.set_attribute("forensics.ingest.created", result.created)
        span.set_attribute("forensics.ingest.protocol",
                           "crc32c" if upload.crc_protocol else "sha256")
        span.set_attribute("forensics.ingest.digest_streamed",
                           bool(getattr(upload.sink, "digest_verified", False)))
    return result


def count_received(telemetry: Telemetry, nbytes: int) -> None:
    """A new incident of ``nbytes`` was made durable and indexed (never for retries)."""
    telemetry.observe(INCIDENTS_RECEIVED)
    telemetry.observe(INGEST_BYTES, max(0, int(nbytes)))
