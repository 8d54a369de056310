"""``forensics.v1.IncidentService``: a thin servicer over pure helpers, the store and the jobs.

Ingest is :mod:`sidecar._ingest`; every refusal is a counted :class:`sidecar._reject.Rejection`
(specific status, a message saying what to do, ``forensics-reject-reason`` trailing metadata).
Incident ids are unique per tenant: every call is scoped to the caller's tenant (an admin's: the
tenant named in ``x-forensics-tenant``, else any — and an id several tenants hold is then
``FAILED_PRECONDITION ambiguous_id``, never a guess), and another tenant's incident of the same
id answers exactly like an absent one.

Example::

    servicer = IncidentServicer(store=store, jobs=runner, auth=auth, config=cfg)
    v1.add_IncidentServiceServicer_to_server(servicer, server)
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
from collections.abc import Iterator
from typing import Any, NoReturn

import grpc
from google.protobuf import empty_pb2

from integrations.errors import CatalogUnavailableError

from ._auth import Authenticator, Principal, TenantNotPermittedError
from ._config import SidecarConfig
from ._filters import (
    FilterError,
    compile_filter,
    compile_order_by,
    decode_page_token,
    encode_page_token,
    query_key,
)
from ._ingest import (
    Sink,
    count_received,
    crc_protocol,
    receive_upload,
    store_upload,
    unavailable,
    upload_tenant,
)
from ._ingest_digest import VerifyingSink
from ._messages import job_to_proto, row_to_proto
from ._observer import Telemetry, as_telemetry
from ._reject import Rejection, reject, typed_errors
from ._store import AmbiguousIncidentError, IncidentStore, PutResult, StoreError
from ._store_index import IncidentRow
from ._stream_guard import StreamGuard
from .api import v1
from .jobs import JobOptionsError, JobQuotaError, JobRunner, UnknownJobKindError

__all__ = ["IncidentServicer", "job_to_proto", "row_to_proto"]

log = logging.getLogger("sidecar.servicer")

#: Room kept in every response for framing beyond the messages counted.
_HEADROOM = 64 * 1024

def _params(params_json: str) -> dict[str, Any]:
    """RunAnalysis ``params_json`` as a dict (:class:`JobOptionsError` when it is not one)."""
    try:
        params = json.loads(params_json) if params_json else {}
    except (ValueError, RecursionError) as e:
        raise JobOptionsError(f"params_json is not JSON: {e}") from None
    if not isinstance(params, dict):
        raise JobOptionsError("params_json must be a JSON object")
    return params


def _client_gone(rej: Rejection, context: grpc.ServicerContext) -> Rejection:
    """``rej``, or ``cancelled`` when a stream "ended" early because its client went away.

    A client killed mid-upload closes its socket without a trailer; gRPC may hand that to the
    handler as a normal end of stream (``bad_framing``: no trailer) rather than a cancellation,
    but by then the call is no longer active. Counted as a client bug it would be a false alarm
    (the chaos run saw 2 of 6 ``kill -9``ed clients counted ``bad_framing``)."""
    if rej.reason != "bad_framing" or context.is_active():
        return rej
    return Rejection(grpc.StatusCode.CANCELLED, "cancelled",
                     "the client went away mid-upload (its stream ended without a trailer and "
                     "the call is no longer active); nothing was stored — resend the incident")


class IncidentServicer(v1.IncidentServiceServicer):
    """Implements ``forensics.v1.IncidentService`` (thread-safe; one instance per server)."""

    def __init__(self, *, store: IncidentStore, jobs: JobRunner, auth: Authenticator,
                 config: SidecarConfig, telemetry: Telemetry | None = None) -> None:
        self.store, self.jobs, self.auth, self.config = store, jobs, auth, config
        self.limits = config.limits
        self.telemetry = as_telemetry(telemetry)
        self.closing = False
        self.guard = StreamGuard(idle_timeout_s=self.limits.idle_timeout_s,
                                 max_messages=self.limits.max_stream_messages,
                                 max_streams=self.limits.max_concurrent_uploads)
        #: Verify the incident's row digest while it streams in (see sidecar._ingest_digest);
        #: False = the store verifies it after the upload (a second pass; for comparisons).
        self.stream_digest = True

    # -- helpers -----------------------------------------------------------------------------

    def _abort(self, context: grpc.ServicerContext, rej: Rejection) -> NoReturn:
        reject(context, self.telemetry, rej)

    def _principal(self, context: grpc.ServicerContext) -> Principal:
        try:
            p = self.auth.principal(context)
        except TenantNotPermittedError as e:
            self._abort(context, Rejection(grpc.StatusCode.PERMISSION_DENIED,
                                           "permission_denied", str(e)))
        if p is None:   # the interceptor already refuses these; defence in depth
            self._abort(context, Rejection(grpc.StatusCode.UNAUTHENTICATED, "unauthenticated",
                                           "missing or invalid bearer token"))
        return p

    def _row(self, incident_id: str, principal: Principal,
             context: grpc.ServicerContext) -> IncidentRow:
        try:
            row = self.store.get(incident_id, tenant=principal.scope())
        except AmbiguousIncidentError as e:   # only without a tenant: an admin's call
            self._abort(context, Rejection(grpc.StatusCode.FAILED_PRECONDITION, "ambiguous_id",
                                           str(e)))
        if row is None:
            self._abort(context, Rejection(grpc.StatusCode.NOT_FOUND, "not_found",
                                           f"incident {incident_id!r} not found"))
        return row

    def _full(self, row: IncidentRow) -> v1.Incident:
        """``row`` with its manifest when the message fits ``limits.max_response_bytes`` (an
        incident stored before ``limits.max_manifest_bytes`` existed may not)."""
        msg = row_to_proto(row, full=True)
        if msg.ByteSize() > self.limits.max_response_bytes - _HEADROOM:
            msg.manifest_json = ""
        return msg

    # -- ingest ------------------------------------------------------------------------------

    def _open_sink(self, header: v1.UploadHeader) -> Sink:
        if crc_protocol(header):   # the rows' digest is checked after the ack
            return self.store.incoming(header.incident_id, sha256=False)
        incoming = self.store.incoming(header.incident_id)
        return VerifyingSink(incoming, header.total_size) if self.stream_digest else incoming

    @typed_errors
    def UploadIncident(self, request_iterator: Iterator[v1.UploadIncidentRequest],
                       context: grpc.ServicerContext) -> v1.UploadIncidentResponse:
        principal = self._principal(context)
        try:
            with self.guard.admit(context) as watch:
                result = self._receive_and_store(self.guard.messages(watch, request_iterator),
                                                 principal, context)
        except Rejection as rej:
            self._abort(context, _client_gone(rej, context))
        if result.created:
            count_received(self.telemetry, result.row.size_bytes)
        # Also on an idempotent retry (created=False): the first attempt may have stored the
        # incident and failed before enqueuing; submits carry request ids, so this is a no-op
        # when its analyses exist.
        if not result.deferred:   # else the back-fill enqueues them once indexed
            self._enqueue_or_defer(result.row)
        row = result.row
        resp = v1.UploadIncidentResponse(incident_id=row.id, sha256=row.sha256,
                                         size=row.size_bytes, created=result.created,
                                         content_sha256=row.content_sha256)
        if row.crc32c is not None:
            resp.crc32c = row.crc32c
        return resp

    def _receive_and_store(self, requests: Iterator[v1.UploadIncidentRequest],
                           principal: Principal, context: grpc.ServicerContext) -> PutResult:
        """Receive one upload and make it durable (raises :class:`Rejection`)."""
        try:
            upload = receive_upload(requests, self.limits, self._open_sink)
        except StoreError as e:
            log.exception("store failure while receiving")
            raise unavailable(e) from e
        tenant = upload_tenant(principal, upload)
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            upload.sink.abort()
            raise Rejection(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline_exceeded",
                            "deadline passed before the incident was stored; retry")
        return store_upload(self.store, upload, tenant=tenant, telemetry=self.telemetry)

    def enqueue_ingest_jobs(self, row: IncidentRow) -> None:
        """The analyses every new incident gets (``SidecarConfig.ingest_kinds``); idempotent
        (each carries a request id). Raises :class:`CatalogUnavailableError` when the catalog
        does not answer (the caller keeps the incident for the back-fill); any other failure is
        logged and the next kind is enqueued."""
        for kind in self.config.ingest_kinds():
            try:
                self.jobs.submit(row.id, kind, tenant=row.tenant, request_id=f"on_ingest:{kind}")
            except CatalogUnavailableError:
                raise
            except Exception:
                log.exception("could not enqueue %s for %s", kind, row.id)

    def _enqueue_or_defer(self, row: IncidentRow) -> None:
        """Enqueue a new incident's analyses; when the catalog stopped answering after the
        incident was indexed, leave it to the back-fill (never lost, never raised: the upload
        is acknowledged either way)."""
        try:
            self.enqueue_ingest_jobs(row)
        except CatalogUnavailableError:
            try:
                self.store.backfill.defer(row, reason="its analyses could not be enqueued")
            except Exception:
                log.exception("could not mark %s for back-fill: its ingest analyses are not "
                              "enqueued (run them with RunAnalysis)", row.id)

    # -- queries -----------------------------------------------------------------------------

    @typed_errors
    def GetIncident(self, request: v1.GetIncidentRequest,
                    context: grpc.ServicerContext) -> v1.Incident:
        row = self._row(request.incident_id, self._principal(context), context)
        if request.view != v1.INCIDENT_VIEW_FULL:
            return row_to_proto(row)
        msg = self._full(row)
        if not msg.manifest_json:
            self._abort(context, Rejection(
                grpc.StatusCode.FAILED_PRECONDITION, "response_too_large",
                f"the manifest of incident {row.id!r} ({len(row.manifest_json)} bytes) does not "
                f"fit limits.max_response_bytes = {self.limits.max_response_bytes}; read it "
                "with DownloadIncident (the manifest is in the Arrow schema metadata)"))
        return msg

    def _compile(self, filter_text: str, scope: str | None) -> tuple[str, list[Any]]:
        flt = compile_filter(filter_text)
        if scope is None:
            return flt.sql, list(flt.params)
        return f'"tenant" = ? AND ({flt.sql})', [scope, *flt.params]

    @typed_errors
    def ListIncidents(self, request: v1.ListIncidentsRequest,
                      context: grpc.ServicerContext) -> v1.ListIncidentsResponse:
        scope = self._principal(context).scope()
        try:
            where, params = self._compile(request.filter, scope)
            order = compile_order_by(request.order_by)
            if request.page_size < 0:
                raise FilterError("page_size must be >= 0")
            size = min(request.page_size or self.limits.default_page_size,
                       self.limits.max_page_size)
            key = query_key(request.filter, request.order_by, scope or "*")
            offset = decode_page_token(request.page_token, key) if request.page_token else 0
        except FilterError as e:
            self._abort(context, Rejection(grpc.StatusCode.INVALID_ARGUMENT, "bad_filter", str(e)))
        rows = self.store.index.query_incidents(where, params, order, limit=size + 1,
                                                offset=offset)
        resp = v1.ListIncidentsResponse(total_size=self.store.index.count_incidents(where,
                                                                                     params))
        taken = self._fill_page(resp, rows[:size], full=request.view == v1.INCIDENT_VIEW_FULL)
        if len(rows) > taken:
            resp.next_page_token = encode_page_token(offset + taken, key)
        return resp

    def _fill_page(self, resp: v1.ListIncidentsResponse, rows: list[IncidentRow], *,
                   full: bool) -> int:
        """Add rows to ``resp`` while it fits ``limits.max_response_bytes`` (FULL manifests
        make a page end early: the next page token continues from there); how many."""
        budget = self.limits.max_response_bytes - _HEADROOM - resp.ByteSize()
        for taken, row in enumerate(rows):
            msg = self._full(row) if full else row_to_proto(row)
            cost = msg.ByteSize() + 8   # field tag + length prefix
            if cost > budget and taken:
                return taken
            budget -= cost
            resp.incidents.append(msg)
        return len(rows)

    @typed_errors
    def WatchIncidents(self, request: v1.WatchIncidentsRequest,
                       context: grpc.ServicerContext) -> Iterator[v1.WatchIncidentsResponse]:
        scope = self._principal(context).scope()
        try:
            where, params = self._compile(request.filter, scope)
        except FilterError as e:
            self._abort(context, Rejection(grpc.StatusCode.INVALID_ARGUMENT, "bad_filter", str(e)))
        q = self.store.subscribe()

        def wake() -> None:
            with contextlib.suppress(queue.Full):
                q.put_nowait(None)

        context.add_callback(wake)
        try:
            while context.is_active():
                try:
                    row = q.get(timeout=1.0)
                except queue.Empty:
                    continue
                if row is None:
                    if not context.is_active() or self.closing:
                        return
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  "watcher fell behind the incident stream; list with a "
                                  "received_at filter to catch up, then watch again")
                if self.store.index.count_incidents(f'"id" = ? AND "tenant" = ? AND {where}',
                                                    [row.id, row.tenant, *params]):
                    yield v1.WatchIncidentsResponse(incident=row_to_proto(row))
        finally:
            self.store.unsubscribe(q)

    @typed_errors
    def DownloadIncident(self, request: v1.DownloadIncidentRequest,
                         context: grpc.ServicerContext) -> Iterator[v1.DownloadIncidentResponse]:
        row = self._row(request.incident_id, self._principal(context), context)
        if row.integrity == "pending":   # announce a checked file (and its sha256) only
            self.store.verifier.verify(row.id, tenant=row.tenant)
            row = self._row(request.incident_id, self._principal(context), context)
        header = v1.DownloadHeader(incident_id=row.id, total_size=row.size_bytes,
                                   sha256=row.sha256)
        if row.crc32c is not None:
            header.crc32c = row.crc32c
        yield v1.DownloadIncidentResponse(header=header)
        try:
            for chunk in self.store.read_chunks(row.id, self.limits.max_chunk_bytes,
                                                tenant=row.tenant):
                if not context.is_active():
                    return
                yield v1.DownloadIncidentResponse(chunk=v1.Chunk(data=chunk))
        except FileNotFoundError:
            context.abort(grpc.StatusCode.NOT_FOUND, f"incident {row.id!r} was deleted")
        except StoreError as e:   # the object store of store.uri failed: retry later
            self._abort(context, unavailable(e))

    @typed_errors
    def DeleteIncident(self, request: v1.DeleteIncidentRequest,
                       context: grpc.ServicerContext) -> empty_pb2.Empty:
        row = self._row(request.incident_id, self._principal(context), context)
        try:
            deleted = self.store.delete(row.id, tenant=row.tenant)
        except StoreError as e:
            self._abort(context, unavailable(e))
        if not deleted:   # deleted meanwhile
            self._abort(context, Rejection(grpc.StatusCode.NOT_FOUND, "not_found",
                                           f"incident {request.incident_id!r} not found"))
        return empty_pb2.Empty()

    # -- analyses ----------------------------------------------------------------------------

    @typed_errors
    def RunAnalysis(self, request: v1.RunAnalysisRequest,
                    context: grpc.ServicerContext) -> v1.Analysis:
        row = self._row(request.incident_id, self._principal(context), context)
        try:
            job = self.jobs.submit(row.id, request.kind, tenant=row.tenant,
                                   params=_params(request.params_json),
                                   request_id=request.request_id or None, caller=True)
        except (UnknownJobKindError, JobOptionsError) as e:
            self._abort(context, Rejection(grpc.StatusCode.INVALID_ARGUMENT, "bad_params",
                                           str(e)))
        except JobQuotaError as e:
            self._abort(context, Rejection(grpc.StatusCode.RESOURCE_EXHAUSTED, "quota_exceeded",
                                           str(e)))
        return job_to_proto(job)

    @typed_errors
    def GetAnalysis(self, request: v1.GetAnalysisRequest,
                    context: grpc.ServicerContext) -> v1.Analysis:
        job = self.jobs.get(request.analysis_id, tenant=self._principal(context).scope())
        if job is None:
            self._abort(context, Rejection(grpc.StatusCode.NOT_FOUND, "not_found",
                                           f"analysis {request.analysis_id!r} not found"))
        return job_to_proto(job)

    @typed_errors
    def ListAnalyses(self, request: v1.ListAnalysesRequest,
                     context: grpc.ServicerContext) -> v1.ListAnalysesResponse:
        principal = self._principal(context)
        row = self._row(request.incident_id, principal, context)
        jobs = self.jobs.list_for(row.id, tenant=row.tenant)
        return v1.ListAnalysesResponse(analyses=[job_to_proto(j) for j in jobs])
