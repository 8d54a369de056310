"""Job kind ``baseline``: build a detector baseline of one model from benign incidents.

The incidents are the ``incident_ids`` given (in the job's tenant), else the newest sampled
benign incidents of ``fingerprint`` (trigger rule in ``baselines.sample_rules``, not flagged by
CF), at most ``modules.cf.baseline_samples``. The baseline is saved as a new version (see
:mod:`sidecar.jobs._baselines`) and gets one ``baselines`` row; afterwards, the incidents of
that model that had no baseline are scored again (flagged ones first).

Example::

    runner.submit("inc-1", "baseline", tenant="acme", params={"fingerprint": fp})
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from .._store_index import utcnow
from ._baselines import detector_class, detector_name, next_baseline_path, usable_fingerprint
from ._kind import JobContext, JobFailed, JobHost, JobKind
from ._queries import benign_candidates

if TYPE_CHECKING:
    from ._queue import JobRecord

__all__ = ["BASELINE", "baseline_job", "record_baseline"]


def _prepare(host: JobHost, job: JobRecord, params: dict[str, Any]) -> dict[str, Any]:
    """Resolve the benign incidents of the job to file paths (runner side)."""
    ids = params.get("incident_ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise JobFailed("params.incident_ids must be a list of incident ids")
        missing = [i for i in ids if host.incident(i) is None]
        if missing:
            raise JobFailed(f"baseline incidents not found: {missing[:10]}; upload them first")
    else:
        fp = params.get("fingerprint")
        if not usable_fingerprint(fp):
            raise JobFailed("a baseline job needs params.fingerprint (a model fingerprint) or "
                            "params.incident_ids")
        cfg = host.config
        ids = benign_candidates(host, fp, cfg.baselines.sample_rules,
                                limit=cfg.modules.cf.baseline_samples)
    return {**params, "incident_paths": [str(host.incident_path(i)) for i in ids]}


def baseline_job(ctx: JobContext) -> dict[str, Any]:
    """Job kind ``baseline`` (module doc)."""
    from integrations.errors import AnalysisError, FingerprintMismatchError
    from integrations.incident import Incident

    detector = detector_name(ctx.params, ctx.config)
    cls = detector_class(detector)
    paths = list(ctx.params.get("incident_paths") or [])
    if len(paths) < 2:
        raise JobFailed(f"a baseline needs at least 2 benign incidents, found {len(paths)}; "
                        "sample benign traffic (triggers.Ratio) or pass incident_ids")
    incs = [Incident.open(p) for p in paths]
    try:
        base = cls.build_baseline(incs, max_samples=ctx.config.modules.cf.baseline_samples)
    except (AnalysisError, FingerprintMismatchError) as e:
        raise JobFailed(f"cannot build the {detector} baseline: {e}") from e
    fp = base.model_fingerprint
    if not usable_fingerprint(fp):
        raise JobFailed(f"the benign incidents have no usable model fingerprint ({fp!r})")
    version, path = next_baseline_path(ctx.config.data_dir, fp, detector)
    base.save(path)
    return {"status": "built", "fingerprint": fp, "detector": detector, "version": version,
            "path": str(path.relative_to(ctx.config.data_dir)), "model_name": base.model_name,
            "sample_count": base.sample_count, "sites": list(base.sites),
            "incident_ids": list(base.incident_ids), "created_at": base.created_at}


def record_baseline(con: Any, job: JobRecord, result: dict[str, Any]) -> None:
    """Insert a built baseline's ``baselines`` row."""
    con.execute(
        "INSERT INTO baselines (fingerprint, detector, version, path, model_name, sample_count, "
        "sites_json, incident_ids_json, job_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [result["fingerprint"], result["detector"], result["version"], result["path"],
         result.get("model_name"), result["sample_count"], json.dumps(result["sites"]),
         json.dumps(result["incident_ids"]), job.id, utcnow()])


def _after(host: JobHost, job: JobRecord, result: dict[str, Any]) -> None:
    """Score again the incidents of this model that had no baseline (flagged ones first)."""
    rows = host.read(
        "SELECT c.incident_id, any_value(c.tenant) FROM cf_results c JOIN incidents i ON "
        "i.id = c.incident_id WHERE c.model_fingerprint = ? AND c.detector = ? GROUP BY "
        "c.incident_id HAVING bool_and(c.status = 'no_baseline') ORDER BY "
        "min(i.received_at) LIMIT 1000", [result["fingerprint"], result["detector"]])
    for incident_id, tenant in rows:
        host.submit(incident_id, "cf", tenant=tenant, params={"detector": result["detector"]},
                    request_id=f"rescore:{result['detector']}:v{result['version']}")


BASELINE = JobKind("baseline", run=baseline_job, prepare=_prepare, record=record_baseline,
                   after=_after)
