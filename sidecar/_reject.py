"""Refusals: the bounded set of reasons an upload or query is rejected for, and how one is counted.

Every rejection is a specific gRPC status with a message saying what to do, trailing metadata
``forensics-reject-reason: <reason>`` and one ``forensics_ingest_rejected_total{reason}`` count.

Example::

    raise Rejection(grpc.StatusCode.INVALID_ARGUMENT, "bad_filter", "unknown field 'x'")
    reject(context, telemetry, rejection)      # counts it, then aborts the call
"""

from __future__ import annotations

from typing import NoReturn

import grpc

from ._observer import Telemetry, counter

__all__ = [
    "INGEST_REJECTED",
    "METRICS",
    "REASON_KEY",
    "REJECT_REASONS",
    "Rejection",
    "count_rejection",
    "reject",
]

#: Trailing metadata key carrying the reason of a refusal.
REASON_KEY = "forensics-reject-reason"

#: Every reason an upload or query can be rejected for (label values of
#: ``forensics_ingest_rejected_total{reason}``). Bounded: never an incident id or a site.
REJECT_REASONS = (
    "bad_framing",        # stream not header → chunks → trailer, or a missing/duplicate part
    "bad_id",             # incident id not [A-Za-z0-9][A-Za-z0-9._-]{0,199}, or ≠ manifest id
    "chunk_too_large",    # one chunk over limits.max_chunk_bytes
    "too_large",          # declared or actual total over limits.max_incident_bytes
    "size_mismatch",      # bytes received ≠ header.total_size
    "sha256_mismatch",    # trailer sha256 ≠ sha256 of the bytes
    "invalid_incident",   # non-Arrow, truncated Arrow, wrong schema, bad manifest
    "already_exists",     # same id, different bytes
    "permission_denied",  # tenant in header ≠ token's tenant
    "unauthenticated",    # missing / unknown bearer token
    "bad_filter",         # ListIncidents/WatchIncidents filter, order_by or page_token invalid
    "deadline_exceeded",  # the client's deadline passed before the incident was durable
    "internal",           # store failure (disk full, index error); nothing acknowledged
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
