"""Ingest: an ``UploadIncident`` stream from its first message to a durable, indexed incident.

:func:`receive_upload` enforces framing, size caps and the transport sha256 while the chunks
stream into a sink; :func:`upload_tenant` decides the owner; :func:`store_upload` makes the
upload durable inside the ``ingest`` span, mapping store errors to counted rejections;
:func:`count_received` reports a new incident. Nothing is written for a rejected upload.

Example::

    upload = receive_upload(request_iterator, config.limits, open_sink)
    result = store_upload(store, upload, tenant=upload_tenant(principal, upload), telemetry=tel)
    if result.created:
        count_received(tel, result.row.size_bytes)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import grpc

from integrations.errors import DecodeLimitError, IncidentFormatError, IncidentTooLargeError

from ._auth import Principal
from ._config_sections import LimitsConfig
from ._ingest_digest import VerifyingSink
from ._observer import Telemetry, counter, incident_attributes
from ._reject import Rejection
from ._store import ID_PATTERN, AlreadyExistsError, IncidentStore, PutResult, StoreError
from .api import v1

__all__ = [
    "INCIDENTS_RECEIVED",
    "INGEST_BYTES",
    "METRICS",
    "Sink",
    "Upload",
    "count_received",
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


@dataclasses.dataclass(frozen=True)
class Upload:
    """A completely received, sha256-verified upload (its bytes are in ``sink``)."""

    header: v1.UploadHeader
    sink: Any
    sha256: str


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
    return header


def _receive_chunks(it: Iterator[v1.UploadIncidentRequest], header: v1.UploadHeader,
                    limits: LimitsConfig, sink: Sink) -> v1.UploadTrailer:
    """Chunks into ``sink`` until the trailer; the byte count must match the header."""
    received = 0
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
        sink.write(data)
    if trailer is None:
        raise _invalid("bad_framing",
                       "stream ended without a trailer (sha256); the upload is incomplete")
    if received != header.total_size:
        raise _invalid("size_mismatch", f"received {received} bytes but header.total_size = "
                                        f"{header.total_size}")
    return trailer


def receive_upload(requests: Iterable[v1.UploadIncidentRequest], limits: LimitsConfig,
                   open_sink: Callable[[v1.UploadHeader], Sink]) -> Upload:
    """Read header → chunks → trailer into ``open_sink(header)``, enforcing framing, size caps
    and the sha256. On any rejection or error the sink is aborted."""
    it = iter(requests)
    header = _read_header(it, limits)
    sink = open_sink(header)
    try:
        trailer = _receive_chunks(it, header, limits, sink)
        hexdigest = sink.finish()
        if trailer.sha256.lower() != hexdigest:
            raise Rejection(grpc.StatusCode.DATA_LOSS, "sha256_mismatch",
                            f"sha256 of the received bytes is {hexdigest}, the trailer says "
                            f"{trailer.sha256!r}; the data was corrupted in transit — resend")
    except BaseException:
        sink.abort()
        raise
    return Upload(header=header, sink=sink, sha256=hexdigest)


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
                                  sha256=upload.sha256,
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


def unavailable(error: StoreError) -> Rejection:
    """The rejection for a store failure (nothing was acknowledged; the client retries)."""
    return Rejection(grpc.StatusCode.UNAVAILABLE, "internal",
                     f"{error}; nothing was acknowledged — retry later")


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
        span.set_attribute("forensics.ingest.digest_streamed",
                           bool(getattr(upload.sink, "digest_verified", False)))
    return result


def count_received(telemetry: Telemetry, nbytes: int) -> None:
    """A new incident of ``nbytes`` was made durable and indexed (never for retries)."""
    telemetry.observe(INCIDENTS_RECEIVED)
    telemetry.observe(INGEST_BYTES, max(0, int(nbytes)))
