"""Job kind ``cca``: a verified minimal fix set for a failing incident (DESIGN §8).

Enqueued after CF for incidents that are failures (a flag, or CF flagged them) whose model is
registered in the sidecar config (``models:``). The job replays the incident with the registered
model (fidelity measured and recorded), builds the failure predicate from the incident (its
flag reason, else the recorded top-1 token at the flagged step; ``params.failure`` overrides
with ``{"token": id}`` / ``{"text": "HACKED"}`` / ``{"label": k}``), takes up to
``baselines.cca_benign`` sampled benign incidents of the same model and tenant (or the caller's
own ``params.benign_ids``; never a path) for the ``mean``
intervention's baseline and the side effects, uses the newest CF ranking as a prior, and runs
``analysis.cca.CausalCCA`` with ``modules.cca`` (``max_fix_set_size``, ``search_strategy``,
``early_stop_threshold``; ``params.permutations`` / ``params.variants`` set how many random sets
the p-value and how many perturbed variants the flip rate use, default 99 / 16 — fewer is faster
and coarser). The result (``GetAnalysis`` JSON and the ``cca_results`` /
``cca_interventions`` tables) is the fix set with flip rate + Wilson interval, necessity, side
effects, permutation p-value and forward passes vs exhaustive, and ``outputs``: the recorded
answer (when content was captured) beside the greedy answer replayed with the fix — or, when
nothing within ``max_fix_set_size`` flips the failure, ``status: "no_fix_set"`` with the reason.
``forensics_fix_set_size`` observes the size of every fix set found.

Example::

    runner.submit("inc-1", "cca", tenant="acme", params={"intervention": "zero"})
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Any

from .._observer import histogram
from .._store_index import utcnow
from ._kind import JobContext, JobFailed, JobHost, JobKind
from ._models import fidelity_dict, load_registered, model_ref, require_registered
from ._queries import benign_candidates, clean_json, latest_cf, num

if TYPE_CHECKING:
    from ._queue import JobRecord

__all__ = ["CCA", "FIX_SET_SIZE", "OPTIONS", "cca_job", "record_cca"]

#: Fix sets are small by construction (``max_fix_set_size`` defaults to 8).
FIX_SET_SIZE = histogram(
    "fix_set_size", "Size of minimal fix sets found by CCA.",
    buckets=(0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 12.0, 16.0, 32.0, float("inf")),
    exemplar=True)

_INTERVENTIONS = ("mean", "zero", "patch", "resample", "scale")


#: What a caller may pass (RunAnalysis params); benign incidents are named by id.
OPTIONS = frozenset({"benign_ids", "candidates", "failure", "intervention", "permutations",
                     "variants"})
#: Set by the runner from the caller's tenant only; a value from anywhere else is dropped.
_RESOLVED = ("benign_paths", "cf_ranked_sites")


def _benign_ids(host: JobHost, job: JobRecord, row: Any, ids: Any) -> list[str]:
    """``params.benign_ids`` (each the job tenant's own), else sampled benign incidents of the
    same model and tenant."""
    if ids is not None:
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise JobFailed("params.benign_ids must be a list of incident ids")
        missing = [i for i in ids if host.incident(i) is None]
        if missing:   # another tenant's incident is "not found", exactly like a missing one
            raise JobFailed(f"params.benign_ids: incidents not found: {missing[:10]}; pass "
                            "ids of your own stored incidents")
        return [i for i in ids if i != row.id]
    b = host.config.baselines
    if not row.model_fingerprint or not b.cca_benign:
        return []
    return [i for _, i in benign_candidates(host, row.model_fingerprint, b.sample_rules,
                                            tenants=[job.tenant], limit=b.cca_benign,
                                            exclude=(row.tenant, row.id))]


def _prepare(host: JobHost, job: JobRecord, params: dict[str, Any]) -> dict[str, Any]:
    """Runner side: benign incidents of the same model and tenant, the newest CF ranking."""
    row = host.incident(job.incident_id)
    out = {k: v for k, v in params.items() if k not in _RESOLVED}
    if row is None:
        return out
    ids = _benign_ids(host, job, row, params.get("benign_ids"))
    out["benign_paths"] = [str(host.incident_path(i)) for i in ids]
    cf = latest_cf(host, row.id, tenant=row.tenant)
    if cf is not None and cf["status"] == "scored":
        ranked = host.read("SELECT site, score FROM cf_site_scores WHERE job_id = ? "
                           "ORDER BY rank", [cf["job_id"]])
        out["cf_ranked_sites"] = [[s, v] for s, v in ranked]
    return out


def _failure(spec: Any, tokenizer: Any) -> Any:
    from analysis.cca import Failure

    if spec is None:
        return None
    if not isinstance(spec, dict) or len(spec) != 1:
        raise JobFailed('params.failure must be one of {"token": id}, {"text": "..."}, '
                        '{"label": k}')
    (kind, value), = spec.items()
    if kind == "token":
        return Failure.token(int(value))
    if kind == "text":
        if tokenizer is None:
            raise JobFailed("a text failure needs a tokenizer: register a loader that returns "
                            "(model, tokenizer)")
        return Failure.text_contains(str(value), tokenizer=tokenizer)
    if kind == "label":
        return Failure.label(int(value))
    raise JobFailed(f"unknown failure kind {kind!r}; use token, text or label")


def _search_options(ctx: JobContext) -> dict[str, Any]:
    """``params.permutations`` / ``params.variants`` as CausalCCA options (when given)."""
    out: dict[str, Any] = {}
    for param, option in (("permutations", "n_permutations"), ("variants", "n_variants")):
        value = ctx.params.get(param)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise JobFailed(f"params.{param} must be an integer >= 0, got {value!r}")
        out[option] = value
    return out


def _recorded_output(inc: Any) -> str | None:
    """The answer the model gave, when the incident kept its text (content capture)."""
    content = inc.manifest.get("content") or {}
    text = content.get("output_text") if inc.manifest.get("content_captured") else None
    return text if isinstance(text, str) else None


def _intervention(ctx: JobContext, n_benign: int) -> str:
    kind = str(ctx.params.get("intervention") or ("mean" if n_benign else "zero"))
    if kind not in _INTERVENTIONS:
        raise JobFailed(f"params.intervention {kind!r}: use one of {', '.join(_INTERVENTIONS)}")
    return kind


def cca_job(ctx: JobContext) -> dict[str, Any]:
    """Job kind ``cca`` (module doc)."""
    inc = ctx.open_incident()
    _, fingerprint = model_ref(inc)
    spec = require_registered(ctx.config, inc, job="CCA replays")
    try:
        from analysis.cca import CausalCCA
        from analysis.replay import Replayer
    except ImportError as e:
        raise JobFailed(f"analysis.cca is not available in this install ({e})") from e
    from integrations.errors import AnalysisError

    model, tokenizer = load_registered(spec)
    session = Replayer(model).load(inc)
    benign = [ctx.open_path(p) for p in ctx.params.get("benign_paths") or []]
    kind = _intervention(ctx, len(benign))
    ranked = ctx.params.get("cf_ranked_sites")
    guide = types.SimpleNamespace(ranked_sites=[(str(s), float(v)) for s, v in ranked]) \
        if ranked else None
    try:
        fix = CausalCCA(config=ctx.config.modules.cca, **_search_options(ctx)).search_fix_set(
            session, guided_by=guide, benign=benign,
            failure=_failure(ctx.params.get("failure"), tokenizer),
            candidates=ctx.params.get("candidates"), intervention=kind, tokenizer=tokenizer)
    except AnalysisError as e:
        raise JobFailed(f"CCA could not analyse incident {inc.id}: {e}") from e
    out: dict[str, Any] = {
        "incident_id": inc.id, "status": "found" if fix.flip else "no_fix_set",
        "model": {"name": spec.name, "fingerprint": fingerprint},
        "fidelity": fidelity_dict(session.fidelity()), "benign_incidents": len(benign),
        "cf_guided": guide is not None, "summary": fix.summary(),
        "fix_set": clean_json(fix.to_dict()),
        "outputs": {"recorded": _recorded_output(inc), "with_fix": fix.greedy_output},
    }
    if fix.flip:
        out["fix_set_size"] = fix.size   # observed in forensics_fix_set_size
    return out


def record_cca(con: Any, job: JobRecord, result: dict[str, Any]) -> None:
    """Insert a CCA job's ``cca_results`` row and one ``cca_interventions`` row per element."""
    fix = result.get("fix_set") or {}
    ci = fix.get("flip_rate_ci") or [None, None]
    se = fix.get("side_effects") or {}
    con.execute(
        "INSERT INTO cca_results (job_id, incident_id, tenant, status, flip, size, one_minimal, "
        "flip_rate, flip_rate_lo, flip_rate_hi, p_value, mean_kl, top1_agreement, "
        "forward_passes, exhaustive_forward_passes, strategy, intervention_kind, failure, "
        "reason, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [job.id, job.incident_id, job.tenant, result["status"], bool(fix.get("flip")),
         len(fix.get("interventions") or []), fix.get("one_minimal"),
         num(fix.get("flip_rate")), num(ci[0]), num(ci[1]), num(fix.get("p_value")),
         num(se.get("mean_kl")), num(se.get("top1_agreement")), fix.get("forward_passes"),
         fix.get("exhaustive_forward_passes"), fix.get("strategy"),
         fix.get("intervention_kind"), fix.get("failure"), fix.get("reason"), utcnow()])
    necessity = {n.get("site"): n for n in fix.get("necessity") or []}
    for i, iv in enumerate(fix.get("interventions") or []):
        n = necessity.get(iv.get("site")) or {}
        con.execute(
            "INSERT INTO cca_interventions (job_id, incident_id, idx, site, kind, "
            "metric_without, delta, flips_without) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [job.id, job.incident_id, i, str(iv.get("site")), str(iv.get("kind")),
             num(n.get("metric_without")), num(n.get("delta")), n.get("flips_without")])


def _after(host: JobHost, job: JobRecord, result: dict[str, Any]) -> None:
    """Observe the size of a verified fix set (searches that found none have no size)."""
    size = result.get("fix_set_size")
    if isinstance(size, int) and not isinstance(size, bool):
        host.observe(FIX_SET_SIZE, size)


CCA = JobKind("cca", run=cca_job, prepare=_prepare, record=record_cca, after=_after,
              metrics=(FIX_SET_SIZE,), options=OPTIONS)
