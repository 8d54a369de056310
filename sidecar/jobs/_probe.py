"""Job kinds ``probe`` and ``probe_score``: failure signatures per (tenant, model) — DESIGN §14
step 5, with :func:`analysis.rca.cross_validate` and :class:`analysis.rca.LinearProbe`.

``probe`` (submitted on any incident: it names the tenant and the model fingerprint) trains a
linear probe that reads "this request failed" off the residual stream at the last prompt
position (:mod:`sidecar.jobs._probe_features`):

* **labels** from the serving flag, as the index has them — positive: flagged incidents
  (trigger rule ``flag``; ``params.reason`` keeps one flag reason), negative: sampled traffic
  (trigger rule in ``baselines.sample_rules``); the job's tenant and model only, newest first,
  at most ``params.max_per_class`` (default 500) each;
* **sites**: ``params.sites`` (default every ``blocks.*.resid_post``), each cross-validated
  (``params.folds`` stratified folds, default 5): out-of-fold AUROC with a bootstrap 95 %
  interval and TPR at 1 % FPR per site — the decodability curve over layers. The probe kept
  reads the best site (by AUROC: its AUROC is optimistic by that choice, which the result
  says); it is refitted on every labelled incident and saved as a new version through the
  store (:mod:`sidecar.jobs._probe_files`, JSON, no pickle) with a ``probes`` row carrying its
  sha256 (written once the object is durable);
* **scores**: every incident of the tenant and model it read gets ``failure_p`` in the index —
  labelled ones their out-of-fold probability (never one from a probe fitted on them), the
  others (``params.max_unlabelled``, default 1000) the kept probe's. Historic scores are not
  observed as metrics (the histogram is about new traffic).

Fewer than ``params.min_per_class`` (default 8) readable incidents in either class: ``status:
"insufficient_labels"``; nothing stored, nothing scored. ``probe_score`` scores one incident with
the newest probe of its (tenant, model): ``failure_p`` in the index and the
``forensics_failure_p`` histogram (label ``serving_flag``: flagged | unflagged; exemplar = the
request's trace). It follows CF on every new incident whose (tenant, model) has a probe
(``sidecar.jobs._cf``); with CF disabled, list it in ``jobs.on_ingest`` (``status: "no_probe"``
while there is none). The newest probe is the catalog's newest ``probes`` row of the job's
tenant and model, resolved when the job is prepared; its object is read by reference and checked
against the row's sha256 (:mod:`sidecar._artefacts`), so with a shared store (``store.uri``)
``probe_score`` runs on any executor and any sidecar of the fleet. ``probe`` writes, so it stays
on the sidecar.

Example::

    runner.submit("inc-1", "probe", tenant="acme")           # -> result["quality"]["auroc"]
    runner.submit("inc-9", "probe_score", tenant="acme")     # -> result["failure_p"]
    index.read("SELECT id, failure_p FROM incidents ORDER BY failure_p DESC NULLS LAST")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._artefacts import artefact_ref
from .._observer import histogram
from .._store_index import utcnow
from ._baselines import usable_fingerprint
from ._kind import JobContext, JobFailed, JobHost, JobKind
from ._models import load_registered, model_ref, registered_spec
from ._probe_features import DEFAULT_SITES, NoFeaturesError, incident_features
from ._probe_files import load_probe, next_probe_version
from ._probe_train import train_probe
from ._queries import latest_probe_row, num

if TYPE_CHECKING:
    from ._queue import JobRecord

__all__ = ["FAILURE_P", "PROBE", "PROBE_SCORE", "probe_job", "probe_score_job"]

#: Probabilities of failure a probe gives new incidents; 0.9 is the example alert's level.
FAILURE_P = histogram(
    "failure_p", "Failure-signature probe scores of new incidents (probability of failure), by "
    "whether the serving flag fired; exemplar = trace id.",
    buckets=(0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0, float("inf")),
    labels=("serving_flag",), values={"serving_flag": ("flagged", "unflagged")}, exemplar=True)


def _count(params: dict[str, Any], name: str, default: int, low: int) -> int:
    value = params.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise JobFailed(f"params.{name} must be an integer >= {low}, got {value!r}")
    return value


def _prepare_train(host: JobHost, job: JobRecord, params: dict[str, Any]) -> dict[str, Any]:
    """Runner side: the tenant's incidents of the model, labelled by the serving flag."""
    row = host.incident(job.incident_id)
    if row is None:
        return params
    fp = row.model_fingerprint
    if not usable_fingerprint(fp):
        raise JobFailed(f"incident {row.id} has no usable model fingerprint ({fp!r}): a probe is "
                        "per model; record incidents with their model reference")
    cap = _count(params, "max_per_class", 500, 1)
    cap_other = _count(params, "max_unlabelled", 1000, 0)
    reason = params.get("reason")
    rules = tuple(host.config.baselines.sample_rules)
    rows = host.read("SELECT id, trigger_rule, trigger_reason FROM incidents WHERE tenant = ? "
                     "AND model_fingerprint = ? ORDER BY received_at DESC, id",
                     [job.tenant, fp])
    picked: dict[int | None, list[str]] = {1: [], 0: [], None: []}
    for iid, rule, why in rows:
        label = 1 if rule == "flag" and (reason is None or why == reason) else \
            0 if rule in rules else None
        if len(picked[label]) < (cap if label is not None else cap_other):
            picked[label].append(iid)
    flag = "trigger_rule = flag" + (f" AND trigger_reason = {reason!r}" if reason else "")
    return {**params, "tenant": job.tenant, "fingerprint": fp, "model_name": row.model_name,
            "probe_version": next_probe_version(host, job.tenant, fp),
            "labels": {"positive": flag, "negative": f"trigger_rule in {list(rules)}"},
            "incidents": [[i, str(host.incident_path(i)), label]
                          for label, ids in picked.items() for i in ids]}


class _Model:
    """The job's registered model, loaded on first need (None when not registered)."""

    def __init__(self, ctx: JobContext, inc: Any) -> None:
        self.spec = registered_spec(ctx.config, inc)
        self._model: Any = None

    def get(self) -> Any:
        if self.spec is not None and self._model is None:
            self._model = load_registered(self.spec)[0]
        return self._model


def features(inc: Any, sites: list[str], model: _Model) -> tuple[dict[str, Any], str]:
    """Recorded features if the incident has them, else replayed with the registered model."""
    try:
        return incident_features(inc, sites, model=None)
    except NoFeaturesError:
        if model.spec is None:
            raise
        return incident_features(inc, sites, model=model.get())


def probe_job(ctx: JobContext) -> dict[str, Any]:
    """Job kind ``probe`` (module doc)."""
    from integrations.incident import Incident

    p = dict(ctx.params)
    if "incidents" not in p:
        raise JobFailed("the probe job was not prepared (no incident list); submit it through "
                        "the sidecar (RunAnalysis)")
    anchor = ctx.open_incident()
    model = _Model(ctx, anchor)
    patterns = p.get("sites") or list(DEFAULT_SITES)
    if not isinstance(patterns, list) or not all(isinstance(s, str) for s in patterns):
        raise JobFailed('params.sites must be a list of site names, e.g. ["blocks.*.resid_post"]')
    return train_probe(
        ctx, items=[(str(i), Incident.open(path) if path else None, lab)
                    for i, path, lab in p["incidents"]],
        anchor=anchor, patterns=patterns, model=model, folds=_count(p, "folds", 5, 2),
        min_per_class=_count(p, "min_per_class", 8, 2), features=features)


def record_probe(con: Any, job: JobRecord, result: dict[str, Any]) -> None:
    """The ``probes`` row of a trained probe and every scored incident's ``failure_p``."""
    if result.get("status") != "trained":
        return
    q = result["quality"]
    ci = q.get("auroc_ci") or [None, None]
    con.execute(
        "INSERT INTO probes (tenant, fingerprint, version, site, path, auroc, auroc_lo, "
        "auroc_hi, tpr_at_1pct_fpr, n_pos, n_neg, folds, job_id, created_at, sha256) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [result["tenant"], result["model_fingerprint"], result["version"], result["site"],
         result["path"], num(q.get("auroc")), num(ci[0]), num(ci[1]),
         num(q.get("tpr_at_1pct_fpr")), q["n_pos"], q["n_neg"], q.get("folds"), job.id,
         utcnow(), result.get("sha256")])
    rows = [[num(v), iid, job.tenant] for iid, v in (result.get("scores") or {}).items()]
    if rows:
        con.executemany("UPDATE incidents SET failure_p = ? WHERE id = ? AND tenant = ?", rows)


# -- probe_score -------------------------------------------------------------------------------


def _prepare_score(host: JobHost, job: JobRecord, params: dict[str, Any]) -> dict[str, Any]:
    row = host.incident(job.incident_id)
    flagged = row is not None and row.trigger_rule == "flag"
    fp = row.model_fingerprint if row is not None else None
    found = latest_probe_row(host, job.tenant, fp) if usable_fingerprint(fp) else None
    return {**params, "tenant": job.tenant,
            "serving_flag": "flagged" if flagged else "unflagged",
            "probe": None if found is None else {**artefact_ref(found, what="probe"),
                                                 "fingerprint": fp}}


def probe_score_job(ctx: JobContext) -> dict[str, Any]:
    """Job kind ``probe_score`` (module doc)."""
    from analysis.rca import LinearProbe

    inc = ctx.open_incident()
    name, fp = model_ref(inc)
    out: dict[str, Any] = {"incident_id": inc.id, "model_fingerprint": fp,
                           "serving_flag": ctx.params.get("serving_flag"), "failure_p": None}
    ref = ctx.params.get("probe")
    if ref is not None and ref.get("fingerprint") != fp:
        raise JobFailed(f"incident {inc.id} is of model {fp!r}, not the {ref.get('fingerprint')!r} "
                        "its catalog row says; reindex the store")
    if ref is None:
        return {**out, "status": "no_probe",
                "message": f"no failure-signature probe for this tenant and model {name!r}: "
                           "train one with a `probe` job (forensics incidents analyze <id> "
                           "--kind probe) once flagged and sampled incidents are stored"}
    version, doc = int(ref["version"]), load_probe(ctx.config, ref)
    site = doc["site"]
    try:
        x, how = features(inc, [site], _Model(ctx, inc))
    except NoFeaturesError as e:
        return {**out, "status": "no_features", "message": str(e)}
    try:
        score = float(LinearProbe.from_dict(doc["probe"]).score(x[site][None, :])[0])
    except ValueError as e:
        raise JobFailed(f"probe v{version} ({ref['path']}) cannot score incident {inc.id}: "
                        f"{e}; train a new probe") from e
    q = doc.get("quality") or {}
    return {**out, "status": "scored", "failure_p": score, "features": how,
            "probe": {"version": version, "site": site, "auroc": q.get("auroc"),
                      "auroc_ci": q.get("auroc_ci"),
                      "tpr_at_1pct_fpr": q.get("tpr_at_1pct_fpr"),
                      "threshold_at_1pct_fpr": doc.get("threshold_at_1pct_fpr"),
                      "path": ref["path"], "sha256": ref["sha256"]}}


def record_probe_score(con: Any, job: JobRecord, result: dict[str, Any]) -> None:
    """The incident's ``failure_p`` (only when scored: never a made-up value)."""
    value = num(result.get("failure_p"))
    if result.get("status") == "scored" and value is not None:
        con.execute("UPDATE incidents SET failure_p = ? WHERE id = ? AND tenant = ?",
                    [value, job.incident_id, job.tenant])


def _after_score(host: JobHost, job: JobRecord, result: dict[str, Any]) -> None:
    value = num(result.get("failure_p"))
    if result.get("status") == "scored" and value is not None:
        host.observe(FAILURE_P, value,
                     labels={"serving_flag": str(result.get("serving_flag") or "unflagged")})


PROBE = JobKind("probe", run=probe_job, prepare=_prepare_train, record=record_probe,
                options=frozenset({"folds", "max_per_class", "max_unlabelled", "min_per_class",
                                   "reason", "sites"}), uses_data_dir=True)
#: Submitted by the sidecar after CF (its params are the sidecar's); a caller passes none.
PROBE_SCORE = JobKind("probe_score", run=probe_score_job, prepare=_prepare_score,
                      record=record_probe_score, after=_after_score, metrics=(FAILURE_P,),
                      options=frozenset(), uses_data_dir=True, reads_store_artefacts=True)
