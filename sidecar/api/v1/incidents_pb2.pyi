import datetime

from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class IncidentView(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INCIDENT_VIEW_UNSPECIFIED: _ClassVar[IncidentView]
    INCIDENT_VIEW_BASIC: _ClassVar[IncidentView]
    INCIDENT_VIEW_FULL: _ClassVar[IncidentView]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_PENDING: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_DONE: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
INCIDENT_VIEW_UNSPECIFIED: IncidentView
INCIDENT_VIEW_BASIC: IncidentView
INCIDENT_VIEW_FULL: IncidentView
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_PENDING: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_DONE: JobState
JOB_STATE_FAILED: JobState

class UploadIncidentRequest(_message.Message):
    __slots__ = ("header", "chunk", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    chunk: Chunk
    trailer: UploadTrailer
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., trailer: _Optional[_Union[UploadTrailer, _Mapping]] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("incident_id", "total_size", "tenant", "traceparent", "content_sha256")
    INCIDENT_ID_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    CONTENT_SHA256_FIELD_NUMBER: _ClassVar[int]
    incident_id: str
    total_size: int
    tenant: str
    traceparent: str
    content_sha256: str
    def __init__(self, incident_id: _Optional[str] = ..., total_size: _Optional[int] = ..., tenant: _Optional[str] = ..., traceparent: _Optional[str] = ..., content_sha256: _Optional[str] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("data", "crc32c")
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    crc32c: int
    def __init__(self, data: _Optional[bytes] = ..., crc32c: _Optional[int] = ...) -> None: ...

class UploadTrailer(_message.Message):
    __slots__ = ("sha256", "crc32c")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    crc32c: int
    def __init__(self, sha256: _Optional[str] = ..., crc32c: _Optional[int] = ...) -> None: ...

class UploadIncidentResponse(_message.Message):
    __slots__ = ("incident_id", "sha256", "size", "created", "crc32c", "content_sha256")
    INCIDENT_ID_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    CONTENT_SHA256_FIELD_NUMBER: _ClassVar[int]
    incident_id: str
    sha256: str
    size: int
    created: bool
    crc32c: int
    content_sha256: str
    def __init__(self, incident_id: _Optional[str] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ..., created: _Optional[bool] = ..., crc32c: _Optional[int] = ..., content_sha256: _Optional[str] = ...) -> None: ...

class Incident(_message.Message):
    __slots__ = ("id", "tenant", "created_at", "received_at", "model_name", "model_fingerprint", "trigger_rule", "trigger_reason", "request_id", "traceparent", "size_bytes", "sha256", "activations", "n_sites", "manifest_json", "anomaly_score", "anomaly_p", "cf_flagged", "failure_p", "content_sha256", "crc32c", "integrity")
    ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_RULE_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_REASON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    N_SITES_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    ANOMALY_SCORE_FIELD_NUMBER: _ClassVar[int]
    ANOMALY_P_FIELD_NUMBER: _ClassVar[int]
    CF_FLAGGED_FIELD_NUMBER: _ClassVar[int]
    FAILURE_P_FIELD_NUMBER: _ClassVar[int]
    CONTENT_SHA256_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    INTEGRITY_FIELD_NUMBER: _ClassVar[int]
    id: str
    tenant: str
    created_at: _timestamp_pb2.Timestamp
    received_at: _timestamp_pb2.Timestamp
    model_name: str
    model_fingerprint: str
    trigger_rule: str
    trigger_reason: str
    request_id: str
    traceparent: str
    size_bytes: int
    sha256: str
    activations: str
    n_sites: int
    manifest_json: str
    anomaly_score: float
    anomaly_p: float
    cf_flagged: bool
    failure_p: float
    content_sha256: str
    crc32c: int
    integrity: str
    def __init__(self, id: _Optional[str] = ..., tenant: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., received_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., model_name: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., trigger_rule: _Optional[str] = ..., trigger_reason: _Optional[str] = ..., request_id: _Optional[str] = ..., traceparent: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., activations: _Optional[str] = ..., n_sites: _Optional[int] = ..., manifest_json: _Optional[str] = ..., anomaly_score: _Optional[float] = ..., anomaly_p: _Optional[float] = ..., cf_flagged: _Optional[bool] = ..., failure_p: _Optional[float] = ..., content_sha256: _Optional[str] = ..., crc32c: _Optional[int] = ..., integrity: _Optional[str] = ...) -> None: ...

class GetIncidentRequest(_message.Message):
    __slots__ = ("incident_id", "view")
    INCIDENT_ID_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    incident_id: str
    view: IncidentView
    def __init__(self, incident_id: _Optional[str] = ..., view: _Optional[_Union[IncidentView, str]] = ...) -> None: ...

class ListIncidentsRequest(_message.Message):
    __slots__ = ("filter", "order_by", "page_size", "page_token", "view")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    ORDER_BY_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    filter: str
    order_by: str
    page_size: int
    page_token: str
    view: IncidentView
    def __init__(self, filter: _Optional[str] = ..., order_by: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., view: _Optional[_Union[IncidentView, str]] = ...) -> None: ...

class ListIncidentsResponse(_message.Message):
    __slots__ = ("incidents", "next_page_token", "total_size")
    INCIDENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    incidents: _containers.RepeatedCompositeFieldContainer[Incident]
    next_page_token: str
    total_size: int
    def __init__(self, incidents: _Optional[_Iterable[_Union[Incident, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total_size: _Optional[int] = ...) -> None: ...

class WatchIncidentsRequest(_message.Message):
    __slots__ = ("filter",)
    FILTER_FIELD_NUMBER: _ClassVar[int]
    filter: str
    def __init__(self, filter: _Optional[str] = ...) -> None: ...

class WatchIncidentsResponse(_message.Message):
    __slots__ = ("incident",)
    INCIDENT_FIELD_NUMBER: _ClassVar[int]
    incident: Incident
    def __init__(self, incident: _Optional[_Union[Incident, _Mapping]] = ...) -> None: ...

class DownloadIncidentRequest(_message.Message):
    __slots__ = ("incident_id",)
    INCIDENT_ID_FIELD_NUMBER: _ClassVar[int]
    incident_id: str
    def __init__(self, incident_id: _Optional[str] = ...) -> None: ...

class DownloadHeader(_message.Message):
    __slots__ = ("incident_id", "total_size", "sha256", "crc32c")
    INCIDENT_ID_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    incident_id: str
    total_size: int
    sha256: str
    crc32c: int
    def __init__(self, incident_id: _Optional[str] = ..., total_size: _Optional[int] = ..., sha256: _Optional[str] = ..., crc32c: _Optional[int] = ...) -> None: ...

class DownloadIncidentResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: DownloadHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[DownloadHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class DeleteIncidentRequest(_message.Message):
    __slots__ = ("incident_id",)
    INCIDENT_ID_FIELD_NUMBER: _ClassVar[int]
    incident_id: str
    def __init__(self, incident_id: _Optional[str] = ...) -> None: ...

class Analysis(_message.Message):
    __slots__ = ("analysis_id", "incident_id", "kind", "state", "attempts", "error", "created_at", "started_at", "finished_at", "params_json", "result_json")
    ANALYSIS_ID_FIELD_NUMBER: _ClassVar[int]
    INCIDENT_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    analysis_id: str
    incident_id: str
    kind: str
    state: JobState
    attempts: int
    error: str
    created_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    params_json: str
    result_json: str
    def __init__(self, analysis_id: _Optional[str] = ..., incident_id: _Optional[str] = ..., kind: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., attempts: _Optional[int] = ..., error: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., params_json: _Optional[str] = ..., result_json: _Optional[str] = ...) -> None: ...

class RunAnalysisRequest(_message.Message):
    __slots__ = ("incident_id", "kind", "params_json", "request_id")
    INCIDENT_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    incident_id: str
    kind: str
    params_json: str
    request_id: str
    def __init__(self, incident_id: _Optional[str] = ..., kind: _Optional[str] = ..., params_json: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class GetAnalysisRequest(_message.Message):
    __slots__ = ("analysis_id",)
    ANALYSIS_ID_FIELD_NUMBER: _ClassVar[int]
    analysis_id: str
    def __init__(self, analysis_id: _Optional[str] = ...) -> None: ...

class ListAnalysesRequest(_message.Message):
    __slots__ = ("incident_id",)
    INCIDENT_ID_FIELD_NUMBER: _ClassVar[int]
    incident_id: str
    def __init__(self, incident_id: _Optional[str] = ...) -> None: ...

class ListAnalysesResponse(_message.Message):
    __slots__ = ("analyses",)
    ANALYSES_FIELD_NUMBER: _ClassVar[int]
    analyses: _containers.RepeatedCompositeFieldContainer[Analysis]
    def __init__(self, analyses: _Optional[_Iterable[_Union[Analysis, _Mapping]]] = ...) -> None: ...
