"""What a report is made of: one incident's manifest and index facts, and the newest finished
result of each analysis kind — read from a sidecar over gRPC, or from local files.

Example::

    with SidecarClient("127.0.0.1:7431") as c:
        data = data_from_sidecar(c, "inc-1")
    data.result("cf")["anomaly_score"], data.trace_id
    data = data_from_files("inc-1.arrow", results="inc-1.results.json")
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["ReportData", "data_from_files", "data_from_sidecar"]


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclasses.dataclass(frozen=True)
class ReportData:
    """One incident as a report sees it.

    ``results`` maps an analysis kind (``cf``, ``cca``, ``replay``, ``investigate``, ...)
    to the result JSON of its newest finished job; ``jobs`` lists every job (kind, state, error)
    so a report can say what failed or is still running; ``facts`` are the index columns
    (tenant, received_at, size_bytes, sha256, activations, n_sites, failure_p).
    """

    incident_id: str
    manifest: Mapping[str, Any]
    facts: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    results: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    jobs: Sequence[Mapping[str, Any]] = ()
    source: str = ""
    generated_at: str = dataclasses.field(default_factory=_now)
    #: e.g. ``http://jaeger:16686/trace/{trace_id}``: makes the trace id a link
    trace_url: str | None = None

    def result(self, kind: str) -> Mapping[str, Any] | None:
        """The newest finished result of ``kind``, or None."""
        return self.results.get(kind)

    @property
    def traceparent(self) -> str | None:
        """The W3C traceparent of the request that produced the incident, if any."""
        tp = (self.manifest.get("request") or {}).get("traceparent")
        return tp if isinstance(tp, str) and tp else None

    @property
    def trace_id(self) -> str | None:
        """The request's trace id (32 hex digits), if the request carried a valid one."""
        parts = (self.traceparent or "").split("-")
        if len(parts) == 4 and len(parts[1]) == 32 and parts[1] != "0" * 32:
            return parts[1]
        return None


def _job_dict(a: Any) -> dict[str, Any]:
    from sidecar.api import v1

    return {"id": a.analysis_id, "kind": a.kind, "attempts": a.attempts, "error": a.error,
            "state": v1.JobState.Name(a.state).removeprefix("JOB_STATE_").lower(),
            "finished_at": a.finished_at.ToDatetime().isoformat(timespec="seconds")
            if a.HasField("finished_at") else None}


def data_from_sidecar(client: Any, incident_id: str) -> ReportData:
    """The incident and its analyses from a sidecar (a :class:`~sidecar.SidecarClient`)."""
    from sidecar.api import v1

    inc = client.get(incident_id, full=True)
    analyses = client.list_analyses(incident_id)      # newest first
    results: dict[str, Mapping[str, Any]] = {}
    for a in analyses:
        if a.state == v1.JOB_STATE_DONE and a.result_json and a.kind not in results:
            results[a.kind] = json.loads(a.result_json)
    facts = {"tenant": inc.tenant, "size_bytes": inc.size_bytes, "sha256": inc.sha256,
             "activations": inc.activations, "n_sites": inc.n_sites,
             "received_at": inc.received_at.ToDatetime().isoformat(timespec="seconds"),
             "failure_p": inc.failure_p if inc.HasField("failure_p") else None}
    return ReportData(incident_id=inc.id, manifest=json.loads(inc.manifest_json or "{}"),
                      facts=facts, results=results, jobs=[_job_dict(a) for a in analyses],
                      source=f"sidecar {getattr(client, 'address', '')}".strip())


def data_from_files(incident: str | os.PathLike[str],
                    results: str | os.PathLike[str] | None = None) -> ReportData:
    """The incident from its ``.arrow`` file (validated) and, optionally, analysis results from
    a JSON file mapping each kind to its result (``{"cf": {...}, "cca": {...}}``, e.g. what
    ``forensics incidents show --json`` printed under ``analyses``)."""
    from integrations.incident import Incident

    path = Path(incident)
    inc = Incident.open(path)
    found: dict[str, Mapping[str, Any]] = {}
    if results is not None:
        raw = json.loads(Path(results).read_text(encoding="utf-8"))
        found = _results_from_json(raw)
    facts = {"size_bytes": path.stat().st_size, "activations": inc.manifest.get("activations"),
             "n_sites": len(inc.sites("activation"))}
    return ReportData(incident_id=inc.id, manifest=inc.manifest, facts=facts, results=found,
                      source=f"files {path}" + (f" + {results}" if results else ""))


def _results_from_json(raw: Any) -> dict[str, Mapping[str, Any]]:
    """``{"cf": {...}}``, or a ``show --json`` document / list of analyses (newest first)."""
    if isinstance(raw, Mapping) and "analyses" in raw:
        raw = raw["analyses"]
    if isinstance(raw, list):
        out: dict[str, Mapping[str, Any]] = {}
        for a in raw:
            if a.get("state") == "JOB_STATE_DONE" and a.get("result_json"):
                out.setdefault(str(a["kind"]), json.loads(a["result_json"]))
        return out
    if isinstance(raw, Mapping):
        return {str(k): v for k, v in raw.items() if isinstance(v, Mapping)}
    from integrations.errors import ForensicsError

    raise ForensicsError("results JSON must map analysis kinds to results, or be the output "
                         "of `forensics incidents show --json`")
