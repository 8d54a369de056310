"""Job kind ``cf``: score an incident against its model's newest detector baseline.

Runs on every new incident when ``modules.cf.enabled`` (see
:meth:`SidecarConfig.ingest_kinds`). It loads the newest baseline of the incident's model
fingerprint for the configured detector (``baselines.detector``: cf | norm | mahalanobis) and
records the report: incident score, flag at ``modules.cf.anomaly_threshold``, every site's
score / p / q (result JSON for ``GetAnalysis`` and the ``cf_results`` / ``cf_site_scores``
tables, written by :func:`record_cf`). Without a baseline the job is done with ``status:
"no_baseline"`` and no score — never a made-up one. Incidents recorded without activations
(``activations: "replay"``) are materialised by deterministic replay first when their model is
registered. The result also maps every scored unit's robust z (``units``: site → [step,
position, z]; the report's heatmaps). The score and p-value are observed in
``forensics_anomaly_score`` / ``forensics_anomaly_p`` (exemplar: the request's trace, else the
job's own).

The baseline is the catalog's newest ``baselines`` row of the job tenant's scope, the model and
the detector, resolved when the job is prepared (runner side, tenant-scoped: DESIGN §10); its
object is read by reference from the store and checked against the row's sha256
(:mod:`sidecar._artefacts`; an altered object fails the job with ``ArtefactError``). So with a
shared store (``store.uri``) and a shared catalog any sidecar — and any Ray worker — scores
against the baseline another sidecar built; with the default local store nothing moved.

Follow-ups: after a CF job on a sampled benign incident the sidecar builds the model's first
baseline once ``baselines.min_samples`` exist and refreshes it every ``baselines.refresh_every``
new ones; failures of registered models get a ``cca`` job; incidents of a (tenant, model) with a
failure-signature probe get a ``probe_score`` job (:mod:`sidecar.jobs._probe`).

Example::

    runner.submit("inc-2", "cf", tenant="acme")      # -> result["anomaly_score"], ["report"]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._artefacts import artefact_ref
from .._observer import histogram
from .._store_index import utcnow
from ._baselines import detector_class, detector_name, load_baseline, usable_fingerprint
from ._kind import JobContext, JobFailed, JobHost, JobKind
from ._models import load_registered, model_ref, registered_spec
from ._queries import benign_candidates, clean_json, latest_baseline_row, latest_probe_row, num
from ._unit_map import unit_z_map

if TYPE_CHECKING:
    from ._queue import JobRecord

__all__ = ["ANOMALY_P", "ANOMALY_SCORE", "CF", "cf_job", "record_cf"]

#: Incident-level anomaly scores are robust z-scores (unbounded; ~0 for benign traffic).
ANOMALY_SCORE = histogram(
    "anomaly_score", "Incident-level anomaly scores (CF robust z); exemplar = trace id.",
    buckets=(-2.0, -1.0, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 20.0,
             50.0, float("inf")), exemplar=True)
#: Incident p-values against the benign baseline: the smallest is 1/(n+1) (n baseline
#: incidents, default up to 1000); 0.05 is the suggested alerting level.
ANOMALY_P = histogram(
    "anomaly_p", "Incident p-values against the model's benign baseline (CF); "
    "exemplar = trace id.", buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0,
                                     float("inf")), exemplar=True)


def _materialize(ctx: JobContext, inc: Any, sites: list[str]) -> Any:
    """The incident with replayed activations, when its model is registered (else None)."""
    spec = registered_spec(ctx.config, inc)
    if spec is None:
        return None
    from analysis.replay import Replayer

    return Replayer(load_registered(spec)[0]).load(inc).materialize(sites=sites)


def _no_baseline(ctx: JobContext, detector: str, fp: str | None) -> dict[str, Any]:
    how = (f"`forensics baseline build --fingerprint {fp}`" if fp else
           "record incidents with a model fingerprint")
    b = ctx.config.baselines
    return {"status": "no_baseline",
            "message": f"no {detector} baseline for model fingerprint {fp!r}: it is built once "
                       f"{b.min_samples} sampled benign incidents (trigger rule "
                       f"{'/'.join(b.sample_rules)}) of this model are stored, or run {how}; "
                       "nothing was scored"}


def _prepare(host: JobHost, job: JobRecord, params: dict[str, Any]) -> dict[str, Any]:
    """Runner side: the newest baseline row of the job tenant's scope for the incident's model
    and the job's detector (``params["baseline"]``: a reference, or None when there is none)."""
    row = host.incident(job.incident_id)
    fp = row.model_fingerprint if row is not None else None
    found = None
    if usable_fingerprint(fp):
        scope = host.config.baselines.scope(job.tenant, fp)[0]
        found = latest_baseline_row(host, scope, fp, detector_name(params, host.config))
    return {**params, "baseline": None if found is None else {
        **artefact_ref(found, what="baseline"), "fingerprint": fp}}


def cf_job(ctx: JobContext) -> dict[str, Any]:
    """Job kind ``cf`` (module doc)."""
    inc = ctx.open_incident()
    detector = detector_name(ctx.params, ctx.config)
    cls = detector_class(detector)
    fp = str(model_ref(inc)[1] or "") or None
    threshold = ctx.config.modules.cf.anomaly_threshold
    out: dict[str, Any] = {"incident_id": inc.id, "detector": detector, "model_fingerprint": fp,
                           "anomaly_score": None, "flagged": None, "threshold": threshold}
    ref = ctx.params.get("baseline")
    if ref is not None and ref.get("fingerprint") != fp:
        raise JobFailed(f"incident {inc.id} is of model {fp!r}, not the "
                        f"{ref.get('fingerprint')!r} its catalog row says; reindex the store")
    if ref is None:
        return {**out, **_no_baseline(ctx, detector, fp)}
    base = load_baseline(ctx.config, ref)
    target = inc
    if not inc.sites("activation"):
        target = _materialize(ctx, inc, list(base.sites))
        if target is None:
            return {**out, "status": "no_activations",
                    "message": "the incident carries no activations (activations: replay) and "
                               "its model is not registered in the sidecar config (models:), so "
                               "they cannot be replayed; nothing was scored"}
    from integrations.errors import AnalysisError

    det = cls(baseline=base, anomaly_threshold=threshold)
    try:
        report = det.analyze(target)
    except AnalysisError as e:
        raise JobFailed(f"CF could not score incident {inc.id}: {e}") from e
    rep = clean_json(report.to_dict())
    return {**out, "status": "scored", "anomaly_score": float(report.score),
            "flagged": bool(report.flagged), "top_sites": rep["ranked_sites"][:10],
            "anomaly_p": rep.get("p"), "first_flagged": report.first_flagged,
            "root_cause_candidates": report.root_cause_candidates[:10],
            "baseline": {"version": int(ref["version"]), "path": ref["path"],
                         "sha256": ref["sha256"], "sample_count": base.sample_count,
                         "created_at": base.created_at},
            "report": rep, "units": unit_z_map(det, target, sites=list(report.sites)),
            "activations": "captured" if target is inc else "replayed"}


def record_cf(con: Any, job: JobRecord, result: dict[str, Any]) -> None:
    """Insert a CF job's ``cf_results`` / ``cf_site_scores`` rows (in the finish transaction)."""
    report = result.get("report") or {}
    base = result.get("baseline") or {}
    ranked = report.get("ranked_sites") or []
    con.execute(
        "INSERT INTO cf_results (job_id, incident_id, tenant, model_fingerprint, detector, "
        "status, score, flagged, threshold, baseline_version, baseline_samples, n_sites, "
        "top_site, created_at, p) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [job.id, job.incident_id, job.tenant, result.get("model_fingerprint"),
         result.get("detector") or "cf", result["status"], num(result.get("anomaly_score")),
         result.get("flagged"), num(result.get("threshold")), base.get("version"),
         base.get("sample_count"), len(ranked) if ranked else None,
         ranked[0][0] if ranked else None, utcnow(), num(result.get("anomaly_p"))])
    sites = report.get("sites") or {}
    for rank, (site, _) in enumerate(ranked, start=1):
        s = sites.get(site) or {}
        worst = s.get("worst") or {}
        con.execute(
            "INSERT INTO cf_site_scores (job_id, incident_id, rank, site, score, stat, p, q, "
            "flagged, significant, n_units, worst_step, worst_position) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [job.id, job.incident_id, rank, site, num(s.get("score")), num(s.get("stat")),
             num(s.get("p")), num(s.get("q")), s.get("flagged"), s.get("significant"),
             s.get("n_units"), worst.get("step"), worst.get("position")])


def _after_cf(host: JobHost, job: JobRecord, result: dict[str, Any]) -> None:
    """Observe the score and p (numbers; absent or None when nothing was scored), then the
    follow-ups: build/refresh the baseline from sampled benign traffic; CCA for failures of
    registered models; the failure-signature score where a probe exists."""
    for metric, key in ((ANOMALY_SCORE, "anomaly_score"), (ANOMALY_P, "anomaly_p")):
        value = num(result.get(key))
        if value is not None:
            host.observe(metric, value)
    row = host.incident(job.incident_id)
    if row is None:
        return
    cfg = host.config
    fp = result.get("model_fingerprint")
    sampled = cfg.baselines.is_sampled(row.trigger_rule)
    if sampled and fp and not result.get("flagged") and usable_fingerprint(fp):
        _maybe_build(host, job, fp, detector_name(result, cfg))
    if cfg.modules.cca.enabled and (not sampled or result.get("flagged")) and \
            cfg.find_model(name=row.model_name, fingerprint=row.model_fingerprint) is not None:
        host.submit(job.incident_id, "cca", request_id="after_cf:cca")
    if usable_fingerprint(row.model_fingerprint) and \
            latest_probe_row(host, row.tenant, row.model_fingerprint) is not None:
        host.submit(job.incident_id, "probe_score", request_id="after_cf:probe_score")


def _maybe_build(host: JobHost, job: JobRecord, fp: str, detector: str) -> None:
    """Submit a ``baseline`` job when the job tenant's baseline scope has enough new sampled
    benign incidents of the model."""
    b = host.config.baselines
    scope, tenants = b.scope(job.tenant, fp)
    owners = ", ".join("?" for _ in tenants)
    busy = host.read("SELECT count(*) FROM jobs WHERE kind = 'baseline' AND state IN "
                     f"('pending', 'running') AND tenant IN ({owners}) AND params_json LIKE ?",
                     [*tenants, f'%"{fp}"%'])[0][0]
    if busy:
        return
    last = latest_baseline_row(host, scope, fp, detector)
    if last is None:
        due = len(benign_candidates(host, fp, b.sample_rules, tenants=tenants,
                                    limit=b.min_samples)) >= b.min_samples
    else:
        due = b.refresh_every > 0 and len(benign_candidates(
            host, fp, b.sample_rules, tenants=tenants, limit=b.refresh_every,
            since=last["created_at"])) >= b.refresh_every
    if due:
        version = 1 if last is None else int(last["version"]) + 1
        host.submit(job.incident_id, "baseline", params={"fingerprint": fp, "detector": detector},
                    request_id=f"auto-baseline:{detector}:v{version}")


CF = JobKind("cf", run=cf_job, prepare=_prepare, record=record_cf, after=_after_cf,
             metrics=(ANOMALY_SCORE, ANOMALY_P), options=frozenset({"detector"}),
             uses_data_dir=True, reads_store_artefacts=True)
