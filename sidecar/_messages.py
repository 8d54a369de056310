"""API messages from the sidecar's records: an index row → ``forensics.v1.Incident``, a job
record → ``forensics.v1.Analysis`` (optional fields stay absent, never 0, until known).

Example::

    msg = row_to_proto(store.get("inc-1", tenant="acme"), full=True)
    msg.HasField("anomaly_score")      # False until CF scored the incident
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .api import v1

if TYPE_CHECKING:
    from ._store_index import IncidentRow
    from .jobs import JobRecord

__all__ = ["job_to_proto", "row_to_proto"]

_JOB_STATE = {"pending": v1.JOB_STATE_PENDING, "running": v1.JOB_STATE_RUNNING,
              "done": v1.JOB_STATE_DONE, "failed": v1.JOB_STATE_FAILED}


def row_to_proto(row: IncidentRow, *, full: bool = False) -> v1.Incident:
    """The API message for an index row (``full``: with the manifest JSON)."""
    msg = v1.Incident(
        id=row.id, tenant=row.tenant, model_name=row.model_name or "",
        model_fingerprint=row.model_fingerprint or "", trigger_rule=row.trigger_rule or "",
        trigger_reason=row.trigger_reason or "", request_id=row.request_id or "",
        traceparent=row.traceparent or "", size_bytes=row.size_bytes, sha256=row.sha256,
        activations=row.activations or "", n_sites=row.n_sites,
        manifest_json=row.manifest_json if full else "", content_sha256=row.content_sha256,
        integrity=row.integrity)
    if row.crc32c is not None:
        msg.crc32c = row.crc32c
    if row.created_at is not None:
        msg.created_at.FromDatetime(row.created_at)
    msg.received_at.FromDatetime(row.received_at)
    if row.anomaly_score is not None:    # absent (not 0) until CF scored the incident
        msg.anomaly_score = row.anomaly_score
    if row.anomaly_p is not None:
        msg.anomaly_p = row.anomaly_p
    if row.cf_flagged is not None:
        msg.cf_flagged = row.cf_flagged
    if row.failure_p is not None:        # absent until a failure-signature probe scored it
        msg.failure_p = row.failure_p
    return msg


def job_to_proto(job: JobRecord) -> v1.Analysis:
    """The API message for a job record."""
    msg = v1.Analysis(analysis_id=job.id, incident_id=job.incident_id, kind=job.kind,
                      state=_JOB_STATE.get(job.state, v1.JOB_STATE_UNSPECIFIED),
                      attempts=job.attempts, error=job.error or "", params_json=job.params_json,
                      result_json=job.result_json or "")
    msg.created_at.FromDatetime(job.created_at)
    if job.started_at is not None:
        msg.started_at.FromDatetime(job.started_at)
    if job.finished_at is not None:
        msg.finished_at.FromDatetime(job.finished_at)
    return msg
