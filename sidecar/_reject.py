"""Refusals: the bounded set of reasons an upload or query is rejected for, and how one is counted.

Every rejection is a specific gRPC status with a message saying what to do, trailing metadata
``forensics-reject-reason: <reason>`` and one ``forensics_ingest_rejected_total{reason}`` count.

Example::

    raise Rejection(grpc.StatusCode.INVALID_ARGUMENT, "bad_filter", "unknown field 'x'")
    reject(context, telemetry, rejection)      # counts it, then aborts the call
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import grpc

from integrations.errors import CatalogUnavailableError

from ._observer import Telemetry, counter

__all__ = [
    "INGEST_REJECTED",
    "METRICS",
    "REASON_KEY",
    "REJECT_REASONS",
    "Rejection",
    "catalog_unavailable",
    "count_rejection",
    "reject",
    "typed_errors",
]

log = logging.getLogger("sidecar.servicer")
F = TypeVar("F", bound=Callable[..., Any])

#: Trailing metadata key carrying the reason of a refusal.
REASON_KEY = "forensics-reject-reason"

#: Every reason an upload or query can be rejected for (label values of
#: ``forensics_ingest_rejected_total{reason}``). Bounded: never an incident id or a site.
REJECT_REASONS = (
    "bad_framing",        # stream not header → chunks → trailer, or a missing/duplicate part
    "bad_id",             # incident id not [A-Za-z0-9][A-Za-z0-9._-]{0,199}, or ≠ manifest id
    "chunk_too_large",    # one chunk over limits.max_chunk_bytes
    "too_large",          # declared or actual total over limits.max_incident_bytes
    "decoded_too_large",  # decoding would exceed limits.max_decoded_bytes / max_rows /
                          # max_ipc_messages / max_manifest_bytes (refused before inflating)
    "too_many_messages",  # an upload stream over limits.max_stream_messages
    "idle_timeout",       # no message for limits.idle_timeout_s: the stream was cancelled
    "busy",               # limits.max_concurrent_uploads uploads in progress: retry later
    "cancelled",          # the client went away (or its deadline passed) mid-upload
    "size_mismatch",      # bytes received ≠ header.total_size
    "sha256_mismatch",    # trailer sha256 ≠ sha256 of the bytes
    "crc32c_mismatch",    # a chunk's or the trailer's CRC32C ≠ CRC32C of the bytes
    "invalid_incident",   # non-Arrow, truncated Arrow, wrong schema, bad manifest
    "already_exists",     # same id, different bytes
    "permission_denied",  # tenant in header ≠ token's tenant
    "unauthenticated",    # missing / unknown bearer token
    "bad_filter",         # ListIncidents/WatchIncidents filter, order_by or page_token invalid
    "not_found",          # no such incident or analysis for this caller (never another tenant's)
    "ambiguous_id",       # an admin named no tenant (x-forensics-tenant) for an id several hold
    "response_too_large", # GetIncident FULL: the manifest does not fit limits.max_response_bytes
    "quota_exceeded",     # jobs.max_pending_per_tenant analyses already pending for the tenant
    "bad_params",         # RunAnalysis kind, params_json or an option of the kind invalid
    "deadline_exceeded",  # the client's deadline passed before the incident was durable
    "disk_full",          # the data dir's disk (or quota) is full; nothing acknowledged
    "store_unavailable",  # the object store of store.uri failed a read/write; nothing acknowledged
    "internal",           # store failure (I/O or index error); nothing acknowledged
    "catalog_unavailable",  # a query while the shared catalog (PostgreSQL) is unreachable
)

INGEST_REJECTED = counter("ingest_rejected", "Uploads and queries rejected, by reason.",
                          labels=("reason",), values={"reason": REJECT_REASONS})
METRICS = (INGEST_REJECTED,)


class Rejection(Exception):
    """A request refused with ``code`` for a counted ``reason`` (one of
    :data:`REJECT_REASONS`)."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


def count_rejection(telemetry: Telemetry, reason: str) -> None:
    """One ``forensics_ingest_rejected_total{reason}``."""
    telemetry.observe(INGEST_REJECTED, labels={"reason": reason})


def reject(context: grpc.ServicerContext, telemetry: Telemetry, rej: Rejection) -> NoReturn:
    """Count ``rej``, attach its reason as trailing metadata and abort the call with it."""
    count_rejection(telemetry, rej.reason)
    context.set_trailing_metadata(((REASON_KEY, rej.reason),))
    context.abort(rej.code, rej.message)


def catalog_unavailable(error: CatalogUnavailableError) -> Rejection:
    """The refusal of a call that needs the unreachable shared catalog (the client retries)."""
    return Rejection(grpc.StatusCode.UNAVAILABLE, "catalog_unavailable", str(error))


def _terminated(context: grpc.ServicerContext) -> bool:
    """Whether the call already has a status (``context.abort`` raised on purpose)."""
    code = getattr(context, "code", None)
    return callable(code) and code() is not None


def typed_errors(method: F) -> F:
    """A servicer method whose *unexpected* exceptions become a counted ``INTERNAL`` with a
    message, never gRPC's untyped ``UNKNOWN`` (deliberate aborts pass through untouched); an
    unreachable shared catalog is ``UNAVAILABLE`` (``catalog_unavailable``: retry later).
    Server-streaming methods (generators) are covered while they stream.

    Example::

        class Servicer:
            @typed_errors
            def GetIncident(self, request, context): ...     # self.telemetry counts
    """
    def refuse(self: Any, context: grpc.ServicerContext, e: Exception) -> NoReturn:
        if isinstance(e, CatalogUnavailableError):
            log.warning("%s: %s", method.__name__, e)
            reject(context, self.telemetry, catalog_unavailable(e))
        if _terminated(context):
            raise e
        log.exception("unexpected error in %s", method.__name__)
        reject(context, self.telemetry, Rejection(
            grpc.StatusCode.INTERNAL, "internal",
            f"{method.__name__} failed unexpectedly ({type(e).__name__}); the sidecar "
            "logged it with a traceback — please report it"))

    if inspect.isgeneratorfunction(method):   # a server-streaming call
        @functools.wraps(method)
        def stream(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                yield from method(self, request, context)
            except Exception as e:
                refuse(self, context, e)
        return stream  # type: ignore[return-value]

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as e:
            refuse(self, context, e)
    return wrapper  # type: ignore[return-value]
