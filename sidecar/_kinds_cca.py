"""Job kind ``cca``: a verified minimal fix set for a failing incident (DESIGN §8).

Enqueued after CF for incidents that are failures (a flag, or CF flagged them) whose model is
registered in the sidecar config (``models:``). The job replays the incident with the registered
model (fidelity measured and recorded), builds the failure predicate from the incident (its
flag reason, else the recorded top-1 token at the flagged step; ``params.failure`` overrides
with ``{"token": id}`` / ``{"text": "HACKED"}`` / ``{"label": k}``), takes up to
``baselines.cca_benign`` sampled benign incidents of the same model for the ``mean``
intervention's baseline and the side effects, uses the newest CF ranking as a prior, and runs
``analysis.cca.CausalCCA`` with ``modules.cca`` (``max_fix_set_size``, ``search_strategy``,
``early_stop_threshold``). The result (``GetAnalysis`` JSON and the ``cca_results`` /
``cca_interventions`` tables) is the fix set with flip rate + Wilson interval, necessity, side
effects, permutation p-value and forward passes vs exhaustive — or, when nothing within
``max_fix_set_size`` flips the failure, ``status: "no_fix_set"`` with the reason.
``forensics_fix_set_size`` observes the size of every fix set found.

Example::

    runner.submit("inc-1", "cca", tenant="acme", params={"intervention": "zero"})
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Any

from ._jobs import JobContext, JobFailed, register_job_kind
from ._results import benign_candidates, clean_json, latest_cf, record_cca

if TYPE_CHECKING:
    from ._jobs import JobRecord, JobRunner

__all__ = ["cca_job"]

_INTERVENTIONS = ("mean", "zero", "patch", "resample", "scale")


def _prepare_cca(runner: JobRunner, job: JobRecord, params: dict[str, Any]) -> dict[str, Any]:
    """Runner side: benign incidents of the same model, and the newest CF ranking."""
    row = runner.store.get(job.incident_id)
    out = dict(params)
    if row is None:
        return out
    cfg = runner.config
    if "benign_paths" not in out and row.model_fingerprint and cfg.baselines.cca_benign:
        ids = benign_candidates(runner.store.index, row.model_fingerprint,
                                cfg.baselines.sample_rules, limit=cfg.baselines.cca_benign,
                                exclude=row.id)
        out["benign_paths"] = [str(runner.store.path(i)) for i in ids]
    cf = latest_cf(runner.store.index, row.id)
    if cf is not None and cf["status"] == "scored" and "cf_ranked_sites" not in out:
        ranked = runner.store.index.read(
            "SELECT site, score FROM cf_site_scores WHERE job_id = ? ORDER BY rank",
            [cf["job_id"]])
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


def cca_job(ctx: JobContext) -> dict[str, Any]:
    """Job kind ``cca`` (module doc)."""
    from ._kinds import _fidelity_dict, load_registered

    inc = ctx.open_incident()
    ref = inc.manifest.get("model") or {}
    spec = ctx.config.find_model(name=ref.get("name"), fingerprint=ref.get("fingerprint"))
    if spec is None:
        raise JobFailed(f"model not registered: CCA replays incident {inc.id} with its model "
                        f"{ref.get('name')!r}; add it to the sidecar config under `models:`")
    try:
        from analysis.cca import CausalCCA
        from analysis.replay import Replayer
    except ImportError as e:
        raise JobFailed(f"analysis.cca is not available in this install ({e})") from e
    from integrations.errors import AnalysisError
    from integrations.incident import Incident

    model, tokenizer = load_registered(spec)
    session = Replayer(model).load(inc)
    benign = [Incident.open(p) for p in ctx.params.get("benign_paths") or []]
    kind = str(ctx.params.get("intervention") or ("mean" if benign else "zero"))
    if kind not in _INTERVENTIONS:
        raise JobFailed(f"params.intervention {kind!r}: use one of {', '.join(_INTERVENTIONS)}")
    ranked = ctx.params.get("cf_ranked_sites")
    guide = types.SimpleNamespace(ranked_sites=[(str(s), float(v)) for s, v in ranked]) \
        if ranked else None
    cca = CausalCCA(config=ctx.config.modules.cca)
    try:
        fix = cca.search_fix_set(session, guided_by=guide, benign=benign,
                                 failure=_failure(ctx.params.get("failure"), tokenizer),
                                 candidates=ctx.params.get("candidates"), intervention=kind,
                                 tokenizer=tokenizer)
    except AnalysisError as e:
        raise JobFailed(f"CCA could not analyse incident {inc.id}: {e}") from e
    out: dict[str, Any] = {
        "incident_id": inc.id, "status": "found" if fix.flip else "no_fix_set",
        "model": {"name": spec.name, "fingerprint": ref.get("fingerprint")},
        "fidelity": _fidelity_dict(session.fidelity()), "benign_incidents": len(benign),
        "cf_guided": guide is not None, "summary": fix.summary(),
        "fix_set": clean_json(fix.to_dict()),
    }
    if fix.flip:
        out["fix_set_size"] = fix.size   # observed in forensics_fix_set_size
    return out


register_job_kind("cca", cca_job, prepare=_prepare_cca, record=record_cca)
