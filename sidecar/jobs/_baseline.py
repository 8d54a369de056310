"""Job kind ``baseline``: build a detector baseline of one model from benign incidents.

Baselines are per (tenant, model fingerprint) — DESIGN §10 — unless an operator declared a shared
one (``baselines.shared``: a model's baseline built from and used by a named group of tenants).
The job's tenant decides the scope (:meth:`BaselinesConfig.scope`). The incidents are the
``incident_ids`` given (each must be the job tenant's own, all of one model), else the newest
sampled benign incidents of ``fingerprint`` owned by the scope's tenants (trigger rule in
``baselines.sample_rules``, not flagged by CF), at most ``modules.cf.baseline_samples``. The
baseline is saved as a new version of its scope (see :mod:`sidecar.jobs._baselines`) and gets
one ``baselines`` row; afterwards, the scope's incidents of that model that had no baseline are
scored again (flagged ones first). Options: ``incident_ids``, ``fingerprint``, ``detector``.

The version is claimed from the catalog when the job is prepared; the object is written through
the store (:func:`sidecar._artefacts.put_artefact`: durable before ``run`` returns) and the row,
with the object's sha256, is written in the transaction that marks the job done — so a row
always names a complete object. On a shared store the object's name carries the job's id, so
two builds of one scope at once (two sidecars) never overwrite each other: the second row is
refused by the catalog's primary key (that job fails, saying so; its object stays unused). The
kind runs on the sidecar (``uses_data_dir``): it writes with the sidecar's store credentials,
Ray workers only read.

Example::

    runner.submit("inc-1", "baseline", tenant="acme", params={"fingerprint": fp})
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from .._artefacts import put_artefact
from .._config_sections import DETECTORS
from .._store_index import utcnow
from ._baselines import (
    baseline_rel,
    detector_class,
    detector_name,
    next_baseline_version,
    usable_fingerprint,
)
from ._kind import JobContext, JobFailed, JobHost, JobKind
from ._queries import benign_candidates

if TYPE_CHECKING:
    from ._queue import JobRecord

__all__ = ["BASELINE", "baseline_job", "record_baseline"]


def _given_ids(host: JobHost, ids: Any) -> tuple[list[str], str | None]:
    """The caller's ``incident_ids``, each the job tenant's own, and their one fingerprint."""
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise JobFailed("params.incident_ids must be a list of incident ids")
    rows = [host.incident(i) for i in ids]
    missing = [i for i, r in zip(ids, rows) if r is None]
    if missing:   # another tenant's incident is "not found", exactly like a missing one
        raise JobFailed(f"baseline incidents not found: {missing[:10]}; upload them first")
    fps = {r.model_fingerprint for r in rows if r is not None}
    if len(fps) > 1:
        raise JobFailed("params.incident_ids name incidents of several models; a baseline is "
                        "built for one model fingerprint")
    return ids, next(iter(fps), None)


def _prepare(host: JobHost, job: JobRecord, params: dict[str, Any]) -> dict[str, Any]:
    """Resolve the scope and the benign incidents of the job to file paths (runner side)."""
    cfg = host.config
    ids = params.get("incident_ids")
    if ids is not None:
        ids, fp = _given_ids(host, ids)
        scope, _ = cfg.baselines.scope(job.tenant, fp or "")
        keys = [(job.tenant, i) for i in ids]
    else:
        fp = params.get("fingerprint")
        if not usable_fingerprint(fp):
            raise JobFailed("a baseline job needs params.fingerprint (a model fingerprint) or "
                            "params.incident_ids")
        scope, tenants = cfg.baselines.scope(job.tenant, fp)
        keys = benign_candidates(host, fp, cfg.baselines.sample_rules, tenants=tenants,
                                 limit=cfg.modules.cf.baseline_samples)
    detector = detector_name(params, cfg)
    version = next_baseline_version(host, cfg, scope, fp, detector) \
        if usable_fingerprint(fp) and detector in DETECTORS else None
    return {**params, "baseline_scope": scope, "baseline_fingerprint": fp,
            "baseline_version": version,
            "incident_paths": [str(host.incident_path(i, tenant=t)) for t, i in keys]}


def baseline_job(ctx: JobContext) -> dict[str, Any]:
    """Job kind ``baseline`` (module doc)."""
    from integrations.errors import AnalysisError, FingerprintMismatchError

    detector = detector_name(ctx.params, ctx.config)
    cls = detector_class(detector)
    paths = list(ctx.params.get("incident_paths") or [])
    if len(paths) < 2:
        raise JobFailed(f"a baseline needs at least 2 benign incidents, found {len(paths)}; "
                        "sample benign traffic (triggers.Ratio) or pass incident_ids")
    incs = [ctx.open_path(p) for p in paths]
    try:
        base = cls.build_baseline(incs, max_samples=ctx.config.modules.cf.baseline_samples)
    except (AnalysisError, FingerprintMismatchError) as e:
        raise JobFailed(f"cannot build the {detector} baseline: {e}") from e
    fp = base.model_fingerprint
    if not usable_fingerprint(fp):
        raise JobFailed(f"the benign incidents have no usable model fingerprint ({fp!r})")
    scope, version = str(ctx.params["baseline_scope"]), ctx.params.get("baseline_version")
    if fp != ctx.params.get("baseline_fingerprint") or not isinstance(version, int):
        raise JobFailed(f"the benign incidents are of model {fp!r}, not the "
                        f"{ctx.params.get('baseline_fingerprint')!r} the job was prepared for")
    rel = baseline_rel(scope, fp, detector, version,
                       job_id=None if ctx.config.store.is_local else ctx.job_id)
    sha256 = put_artefact(ctx.config, rel, base.to_bytes())
    return {"status": "built", "scope": scope, "fingerprint": fp, "detector": detector,
            "version": version, "path": rel, "sha256": sha256, "model_name": base.model_name,
            "sample_count": base.sample_count, "sites": list(base.sites),
            "incident_ids": list(base.incident_ids), "created_at": base.created_at}


def record_baseline(con: Any, job: JobRecord, result: dict[str, Any]) -> None:
    """Insert a built baseline's ``baselines`` row."""
    con.execute(
        "INSERT INTO baselines (scope, fingerprint, detector, version, path, model_name, "
        "sample_count, sites_json, incident_ids_json, job_id, created_at, sha256) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [result["scope"], result["fingerprint"], result["detector"], result["version"],
         result["path"],
         result.get("model_name"), result["sample_count"], json.dumps(result["sites"]),
         json.dumps(result["incident_ids"]), job.id, utcnow(), result.get("sha256")])


def _after(host: JobHost, job: JobRecord, result: dict[str, Any]) -> None:
    """Score again the scope's incidents of this model that had no baseline (flagged ones
    first)."""
    _, tenants = host.config.baselines.scope(job.tenant, result["fingerprint"])
    owners = ", ".join("?" for _ in tenants)
    rows = host.read(
        "SELECT c.incident_id, c.tenant FROM cf_results c JOIN incidents i ON i.id = "
        "c.incident_id AND i.tenant = c.tenant WHERE c.model_fingerprint = ? AND c.detector = ? "
        f"AND i.tenant IN ({owners}) GROUP BY c.tenant, c.incident_id HAVING "
        "bool_and(c.status = 'no_baseline') ORDER BY min(i.received_at) LIMIT 1000",
        [result["fingerprint"], result["detector"], *tenants])
    for incident_id, tenant in rows:
        host.submit(incident_id, "cf", tenant=tenant, params={"detector": result["detector"]},
                    request_id=f"rescore:{result['detector']}:v{result['version']}")


BASELINE = JobKind("baseline", run=baseline_job, prepare=_prepare, record=record_baseline,
                   after=_after, options=frozenset({"incident_ids", "fingerprint", "detector"}),
                   uses_data_dir=True)
