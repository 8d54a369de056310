"""Job kinds ``cf`` (score an incident against its model's baseline) and ``baseline`` (build one).

``cf`` runs on every new incident when ``modules.cf.enabled`` (see
:meth:`SidecarConfig.ingest_kinds`). It loads the newest baseline of the incident's model
fingerprint for the configured detector (``baselines.detector``: cf | norm | mahalanobis) and
records the report: incident score, flag at ``modules.cf.anomaly_threshold``, every site's
score / p / q (result JSON for ``GetAnalysis`` and the ``cf_results`` / ``cf_site_scores``
tables). Without a baseline the job is done with ``status: "no_baseline"`` and no score — never
a made-up one. Incidents recorded without activations (``activations: "replay"``) are
materialised by deterministic replay first when their model is registered.

``baseline`` builds a baseline from benign incidents: the ``incident_ids`` given, else the
newest sampled benign incidents of ``fingerprint`` (trigger rule in ``baselines.sample_rules``,
not flagged by CF), at most ``modules.cf.baseline_samples``. Files are versioned per model:
``<data_dir>/baselines/<fingerprint, ':' -> '-'>/<detector>-v0001.npz`` (no pickle), one ``baselines`` row
each. After a CF job on a sampled benign incident the sidecar builds the first baseline once
``baselines.min_samples`` exist, and refreshes it every ``baselines.refresh_every`` new ones;
after a build, incidents of that model that had no baseline are scored again.

Example::

    runner.submit("inc-1", "baseline", tenant="acme", params={"fingerprint": fp})
    runner.submit("inc-2", "cf", tenant="acme")      # -> result["anomaly_score"], ["report"]
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._jobs import JobContext, JobFailed, register_job_kind
from ._results import (
    benign_candidates,
    clean_json,
    latest_baseline_row,
    record_baseline,
    record_cf,
)

if TYPE_CHECKING:
    from ._jobs import JobRecord, JobRunner

__all__ = ["DETECTORS", "baseline_job", "baseline_versions", "cf_job", "latest_baseline"]

#: ``baselines.detector`` → class name in ``analysis.cf``.
DETECTORS = {"cf": "CompressionForensics", "norm": "NormDetector",
             "mahalanobis": "MahalanobisDetector"}
_FP = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,199}")   # e.g. "sha256:<hex>"
_CACHE: dict[tuple[str, float], Any] = {}
_CACHE_LOCK = threading.Lock()


def _detector_class(name: str) -> Any:
    if name not in DETECTORS:
        raise JobFailed(f"unknown detector {name!r}; use one of {', '.join(DETECTORS)}")
    try:
        import analysis.cf as cf
    except ImportError as e:
        raise JobFailed(f"analysis.cf is not available in this install ({e}); install "
                        "model-forensics[analysis] on the sidecar") from e
    return getattr(cf, DETECTORS[name])


def _model_dir(data_dir: str | Path, fingerprint: str) -> Path:
    return Path(data_dir) / "baselines" / fingerprint.replace(":", "-")


def baseline_versions(data_dir: str | Path, fingerprint: str, detector: str) -> list[Path]:
    """The stored baseline files of a model for ``detector``, oldest version first."""
    if not _FP.fullmatch(fingerprint):
        return []
    d = _model_dir(data_dir, fingerprint)
    return sorted(d.glob(f"{detector}-v[0-9][0-9][0-9][0-9].npz"))


def latest_baseline(data_dir: str | Path, fingerprint: str, detector: str,
                    ) -> tuple[int, Path, Any] | None:
    """(version, path, CFBaseline) of the newest baseline, or None (cached per file)."""
    files = baseline_versions(data_dir, fingerprint, detector)
    if not files:
        return None
    path = files[-1]
    key = (str(path), path.stat().st_mtime)
    with _CACHE_LOCK:
        base = _CACHE.get(key)
    if base is None:
        from analysis.cf import CFBaseline

        base = CFBaseline.load(path)
        with _CACHE_LOCK:
            _CACHE.clear()   # one model's newest baseline per process is the common case
            _CACHE[key] = base
    return int(path.stem.rsplit("-v", 1)[1]), path, base


def _fingerprint(inc: Any) -> str | None:
    fp = (inc.manifest.get("model") or {}).get("fingerprint")
    return str(fp) if fp else None


def _materialize(ctx: JobContext, inc: Any, sites: list[str]) -> Any:
    """The incident with replayed activations, when its model is registered (else None)."""
    from ._kinds import load_registered_model

    ref = inc.manifest.get("model") or {}
    spec = ctx.config.find_model(name=ref.get("name"), fingerprint=ref.get("fingerprint"))
    if spec is None:
        return None
    from analysis.replay import Replayer

    return Replayer(load_registered_model(spec)).load(inc).materialize(sites=sites)


def cf_job(ctx: JobContext) -> dict[str, Any]:
    """Job kind ``cf`` (module doc)."""
    inc = ctx.open_incident()
    detector = str(ctx.params.get("detector") or ctx.config.baselines.detector)
    cls = _detector_class(detector)
    fp = _fingerprint(inc)
    out: dict[str, Any] = {"incident_id": inc.id, "detector": detector, "model_fingerprint": fp,
                           "anomaly_score": None, "flagged": None,
                           "threshold": ctx.config.modules.cf.anomaly_threshold}
    found = latest_baseline(ctx.config.data_dir, fp, detector) if fp else None
    if found is None:
        how = (f"`forensics baseline build --fingerprint {fp}`" if fp else
               "record incidents with a model fingerprint")
        return {**out, "status": "no_baseline",
                "message": f"no {detector} baseline for model fingerprint {fp!r}: it is built "
                           f"once {ctx.config.baselines.min_samples} sampled benign incidents "
                           f"(trigger rule {'/'.join(ctx.config.baselines.sample_rules)}) of "
                           f"this model are stored, or run {how}; nothing was scored"}
    version, path, base = found
    target = inc
    if not inc.sites("activation"):
        target = _materialize(ctx, inc, list(base.sites))
        if target is None:
            return {**out, "status": "no_activations",
                    "message": "the incident carries no activations (activations: replay) and "
                               "its model is not registered in the sidecar config (models:), so "
                               "they cannot be replayed; nothing was scored"}
    from integrations.errors import AnalysisError

    try:
        report = cls(baseline=base,
                     anomaly_threshold=ctx.config.modules.cf.anomaly_threshold).analyze(target)
    except AnalysisError as e:
        raise JobFailed(f"CF could not score incident {inc.id}: {e}") from e
    rep = clean_json(report.to_dict())
    return {**out, "status": "scored", "anomaly_score": float(report.score),
            "flagged": bool(report.flagged), "top_sites": rep["ranked_sites"][:10],
            "anomaly_p": rep.get("p"),
            "first_flagged": report.first_flagged,
            "root_cause_candidates": report.root_cause_candidates[:10],
            "baseline": {"version": version, "path": str(path.relative_to(ctx.config.data_dir)),
                         "sample_count": base.sample_count, "created_at": base.created_at},
            "report": rep}


def _after_cf(runner: JobRunner, job: JobRecord, result: dict[str, Any]) -> None:
    """Follow-ups of a CF job: build/refresh the baseline from sampled benign traffic; CCA for
    failures of registered models."""
    cfg = runner.config
    row = runner.store.get(job.incident_id)
    fp = result.get("model_fingerprint")
    if row is None:
        return
    detector = str(result.get("detector") or cfg.baselines.detector)
    sampled = row.trigger_rule in cfg.baselines.sample_rules
    if sampled and fp and not result.get("flagged") and _FP.fullmatch(fp):
        _maybe_build(runner, job, fp, detector)
    if cfg.modules.cca.enabled and (not sampled or result.get("flagged")) and \
            cfg.find_model(name=row.model_name, fingerprint=row.model_fingerprint) is not None:
        runner.submit(job.incident_id, "cca", tenant=job.tenant, request_id="after_cf:cca")


def _maybe_build(runner: JobRunner, job: JobRecord, fp: str, detector: str) -> None:
    cfg = runner.config
    index = runner.store.index
    busy = index.read("SELECT count(*) FROM jobs WHERE kind = 'baseline' AND state IN "
                      "('pending', 'running') AND params_json LIKE ?", [f'%"{fp}"%'])[0][0]
    if busy:
        return
    last = latest_baseline_row(index, fp, detector)
    rules = cfg.baselines.sample_rules
    if last is None:
        n = len(benign_candidates(index, fp, rules, limit=cfg.baselines.min_samples))
        due = n >= cfg.baselines.min_samples
    else:
        every = cfg.baselines.refresh_every
        due = every > 0 and len(benign_candidates(index, fp, rules, limit=every,
                                                  since=last["created_at"])) >= every
    if due:
        version = 1 if last is None else int(last["version"]) + 1
        runner.submit(job.incident_id, "baseline", tenant=job.tenant,
                      params={"fingerprint": fp, "detector": detector},
                      request_id=f"auto-baseline:{detector}:v{version}")


def _prepare_baseline(runner: JobRunner, job: JobRecord,
                      params: dict[str, Any]) -> dict[str, Any]:
    """Resolve the benign incidents of a ``baseline`` job to file paths (runner side)."""
    store, cfg = runner.store, runner.config
    ids = params.get("incident_ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise JobFailed("params.incident_ids must be a list of incident ids")
        missing = [i for i in ids if store.get(i, tenant=job.tenant or None) is None]
        if missing:
            raise JobFailed(f"baseline incidents not found: {missing[:10]}; upload them first")
    else:
        fp = params.get("fingerprint")
        if not isinstance(fp, str) or not _FP.fullmatch(fp):
            raise JobFailed("a baseline job needs params.fingerprint (a model fingerprint) or "
                            "params.incident_ids")
        ids = benign_candidates(store.index, fp, cfg.baselines.sample_rules,
                                limit=cfg.modules.cf.baseline_samples)
    return {**params, "incident_paths": [str(store.path(i)) for i in ids]}


def baseline_job(ctx: JobContext) -> dict[str, Any]:
    """Job kind ``baseline`` (module doc)."""
    from integrations.errors import AnalysisError, FingerprintMismatchError
    from integrations.incident import Incident

    detector = str(ctx.params.get("detector") or ctx.config.baselines.detector)
    cls = _detector_class(detector)
    paths = list(ctx.params.get("incident_paths") or [])
    if len(paths) < 2:
        raise JobFailed(f"a baseline needs at least 2 benign incidents, found {len(paths)}; "
                        "sample benign traffic (triggers.Ratio) or pass incident_ids")
    incs = [Incident.open(p) for p in paths]
    try:
        base = cls.build_baseline(incs,
                                  max_samples=ctx.config.modules.cf.baseline_samples)
    except (AnalysisError, FingerprintMismatchError) as e:
        raise JobFailed(f"cannot build the {detector} baseline: {e}") from e
    fp = base.model_fingerprint
    if not isinstance(fp, str) or not _FP.fullmatch(fp):
        raise JobFailed(f"the benign incidents have no usable model fingerprint ({fp!r})")
    existing = baseline_versions(ctx.config.data_dir, fp, detector)
    version = 1 + (int(existing[-1].stem.rsplit("-v", 1)[1]) if existing else 0)
    path = _model_dir(ctx.config.data_dir, fp) / f"{detector}-v{version:04d}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    base.save(path)
    return {"status": "built", "fingerprint": fp, "detector": detector, "version": version,
            "path": str(path.relative_to(ctx.config.data_dir)), "model_name": base.model_name,
            "sample_count": base.sample_count, "sites": list(base.sites),
            "incident_ids": list(base.incident_ids), "created_at": base.created_at}


def _after_baseline(runner: JobRunner, job: JobRecord, result: dict[str, Any]) -> None:
    """Score again the incidents of this model that had no baseline (flagged ones first)."""
    rows = runner.store.index.read(
        "SELECT c.incident_id, any_value(c.tenant) FROM cf_results c JOIN incidents i ON "
        "i.id = c.incident_id WHERE c.model_fingerprint = ? AND c.detector = ? GROUP BY "
        "c.incident_id HAVING bool_and(c.status = 'no_baseline') ORDER BY "
        "min(i.received_at) LIMIT 1000", [result["fingerprint"], result["detector"]])
    for incident_id, tenant in rows:
        runner.submit(incident_id, "cf", tenant=tenant,
                      params={"detector": result["detector"]},
                      request_id=f"rescore:{result['detector']}:v{result['version']}")


register_job_kind("cf", cf_job, record=record_cf, after=_after_cf)
register_job_kind("baseline", baseline_job, prepare=_prepare_baseline, record=record_baseline,
                  after=_after_baseline)
