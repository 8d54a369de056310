"""``forensics.v1`` protobuf messages and gRPC stubs, generated from ``proto/forensics/v1``.

Importable with only grpcio + protobuf (no torch, no duckdb): the middleware's SidecarExporter
uses it. Regenerate with ``python proto/gen.py``; never edit the ``*_pb2*`` files by hand.

Example::

    import grpc
    from sidecar.api import v1
    stub = v1.IncidentServiceStub(grpc.insecure_channel("127.0.0.1:7431"))
    page = stub.ListIncidents(v1.ListIncidentsRequest(filter='tenant = "acme"', page_size=10))
"""

from sidecar.api.v1.incidents_pb2 import (
    INCIDENT_VIEW_BASIC,
    INCIDENT_VIEW_FULL,
    INCIDENT_VIEW_UNSPECIFIED,
    JOB_STATE_DONE,
    JOB_STATE_FAILED,
    JOB_STATE_PENDING,
    JOB_STATE_RUNNING,
    JOB_STATE_UNSPECIFIED,
    Analysis,
    Chunk,
    DeleteIncidentRequest,
    DownloadHeader,
    DownloadIncidentRequest,
    DownloadIncidentResponse,
    GetAnalysisRequest,
    GetIncidentRequest,
    Incident,
    IncidentView,
    JobState,
    ListAnalysesRequest,
    ListAnalysesResponse,
    ListIncidentsRequest,
    ListIncidentsResponse,
    RunAnalysisRequest,
    UploadHeader,
    UploadIncidentRequest,
    UploadIncidentResponse,
    UploadTrailer,
    WatchIncidentsRequest,
    WatchIncidentsResponse,
)
from sidecar.api.v1.incidents_pb2_grpc import (
    IncidentServiceServicer,
    IncidentServiceStub,
    add_IncidentServiceServicer_to_server,
)

#: Fully qualified gRPC service name (for health checks and reflection).
SERVICE_NAME = "forensics.v1.IncidentService"
#: Largest chunk payload a client may send or the server streams back.
MAX_CHUNK_BYTES = 1024 * 1024
#: Largest response message the server sends (gRPC clients' default receive limit): pages of
#: ``ListIncidents`` with ``view = FULL`` end early to stay under it.
MAX_RESPONSE_BYTES = 4 * 1024 * 1024

__all__ = [
    "INCIDENT_VIEW_BASIC",
    "INCIDENT_VIEW_FULL",
    "INCIDENT_VIEW_UNSPECIFIED",
    "JOB_STATE_DONE",
    "JOB_STATE_FAILED",
    "JOB_STATE_PENDING",
    "JOB_STATE_RUNNING",
    "JOB_STATE_UNSPECIFIED",
    "MAX_CHUNK_BYTES",
    "MAX_RESPONSE_BYTES",
    "SERVICE_NAME",
    "Analysis",
    "Chunk",
    "DeleteIncidentRequest",
    "DownloadHeader",
    "DownloadIncidentRequest",
    "DownloadIncidentResponse",
    "GetAnalysisRequest",
    "GetIncidentRequest",
    "Incident",
    "IncidentServiceServicer",
    "IncidentServiceStub",
    "IncidentView",
    "JobState",
    "ListAnalysesRequest",
    "ListAnalysesResponse",
    "ListIncidentsRequest",
    "ListIncidentsResponse",
    "RunAnalysisRequest",
    "UploadHeader",
    "UploadIncidentRequest",
    "UploadIncidentResponse",
    "UploadTrailer",
    "WatchIncidentsRequest",
    "WatchIncidentsResponse",
    "add_IncidentServiceServicer_to_server",
]
