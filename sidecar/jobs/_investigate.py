"""Job kind ``investigate``: the progressive investigation of one failing incident (DESIGN §14,
:func:`analysis.rca.investigate`) on the registered model — input spans, causal trace and
decision layer (consistency over failing variants), components, directions and the verified,
portable fix. ``forensics investigate`` (:mod:`sidecar._cli_investigate`) runs the same on files.

Params (incidents are ids of the caller's tenant, never paths): ``benign`` (default: up to
``max_benign``, 32, sampled incidents of the same model, newest first, except those named as
contrast or variants — a causal trace needs the incident's *benign twin*, the same prompt minus
the injected span, among them),
``contrast`` (same kind of input, no failure), ``variants`` (other failing incidents: the
decision layer's consistency, and the direction fix is fitted on them), ``failure_text`` (the
text of the failing output, e.g. "HACKED"; default from the flag reason), ``steps`` (subset of
spans, trace, components, directions), ``budget_kl`` (0.1 nats), ``max_variants`` (20),
``failing_call`` (an episode's failing model call, from 0; default: the one before the tool call
its tool marked destructive, :mod:`._episode`).

The result (``GetAnalysis`` JSON) is ``Investigation.to_dict()`` plus what a report needs:
the prompt's tokens (decoded), the greedy output replayed, the inputs used, the progress lines,
``fix_found``, ``episode`` (an episode's ordered steps, the call investigated marked) and
``fix_file``: the fix (``FixSet.save``: JSON + safetensors, no pickle) in the
job's results area ``<data_dir>/results/<incident id>/<job id>/`` beside ``report.json``.
``forensics_investigations_total{outcome}`` counts finished investigations (fix | no_fix).

Example::

    runner.submit("inc-1", "investigate", tenant="acme",
                  params={"benign": ["b-1", "b-2"], "variants": ["f-2", "f-3"],
                          "failure_text": "HACKED"})
    FixSet.load(data_dir / job.result["fix_file"])
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from integrations.errors import AnalysisError, ModelError

from .._observer import counter
from ._kind import JobContext, JobFailed, JobHost, JobKind
from ._models import fidelity_dict, load_registered, require_registered
from ._queries import clean_json

if TYPE_CHECKING:
    from analysis.rca import Investigation
    from analysis.replay import ReplaySession
    from integrations.incident import Incident

    from ._queue import JobRecord

__all__ = ["INVESTIGATE", "INVESTIGATIONS", "STEPS", "FailureTextError",
           "ModelNotRegisteredError", "NoBenignIncidentsError", "NoTwinError",
           "default_failure_text", "failure_for",
           "investigate_job", "investigation_result", "results_dir", "run_investigation"]

#: The steps of an investigation (``analysis.rca.investigate``), in order.
STEPS = ("spans", "trace", "components", "directions")
INVESTIGATIONS = counter("investigations", "Investigations finished, by outcome: a verified "
                         "fix within the side-effect budget, or none.", labels=("outcome",),
                         values={"outcome": ("fix", "no_fix")})
_INPUTS = ("benign", "contrast", "variants")


class NoBenignIncidentsError(AnalysisError):
    """An investigation without benign incidents (the twin, the side-effect budget)."""


class NoTwinError(AnalysisError):
    """No benign twin of the incident among the benign incidents (trace, components)."""


class FailureTextError(AnalysisError):
    """The failure cannot be stated as a text of the output."""


class ModelNotRegisteredError(ModelError):
    """The incident's model is not registered where the investigation looks for it."""


def failure_for(inc: Incident, tokenizer: Any, text: str | None) -> Any:
    """``Failure.text_contains(text)``, else the flag reason's text (e.g. prompt_injection →
    "HACKED") when the recorded output contains it; :class:`FailureTextError` otherwise."""
    from analysis.cca import Failure

    if text:
        return Failure.text_contains(text, tokenizer=tokenizer)
    found = Failure.from_incident(inc, tokenizer=tokenizer)
    if found.kind != "text":
        reason = (inc.manifest.get("trigger") or {}).get("reason")
        raise FailureTextError(
            f"cannot tell from the flag reason {reason!r} which text of the output is the "
            "failure: give it (--failure-text TEXT, or params.failure_text), e.g. HACKED")
    return found


def run_investigation(session: ReplaySession, tokenizer: Any, *, benign: Sequence[Incident],
                      contrast: Sequence[Incident] = (), variants: Sequence[Incident] = (),
                      failure_text: str | None = None, steps: Sequence[str] = STEPS,
                      budget_kl: float = 0.1, max_variants: int = 20,
                      progress: Callable[[str], None] | None = None,
                      failing_call: int | None = None) -> Investigation:
    """Check the inputs (typed errors that say what to do), then investigate. An episode is
    investigated at its failing model call (``failing_call``, else the default of
    :func:`._episode.failing_target`); ``rep.episode_call`` says which."""
    from analysis.rca import investigate
    from analysis.rca._twins import find_twin  # not exported by analysis.rca (yet)

    from ._episode import failing_target

    bad = [s for s in steps if s not in STEPS]
    if bad or not steps:
        raise AnalysisError(f"unknown investigation steps {bad}; use some of {list(STEPS)}")
    if tokenizer is None:
        raise ModelNotRegisteredError("an investigation decodes text: the model's loader must "
                                      "return (model, tokenizer)")
    if not benign:
        raise NoBenignIncidentsError(
            "an investigation needs benign incidents: the benign twin (the same prompt without "
            "the injected text) for the causal trace, and normal traffic for the side-effect "
            "budget; record them (e.g. triggers.Ratio sampling, or the scenario's benign set) "
            "and pass them (--benign DIR, or params.benign)")
    target = failing_target(session.incident, failing_call=failing_call, tokenizer=tokenizer)
    episode = session.incident
    call = None
    if target is not None:
        from analysis.rca._episode_call import on_failing_call

        view = on_failing_call(session, target, benign=benign, contrast=contrast,
                               variants=variants)
        session, benign, contrast, variants, call = (view.session, view.benign, view.contrast,
                                                     view.variants, view.call)
        if progress is not None:
            progress(f"episode: investigating model call {call} ({len(benign)} benign model "
                     f"calls, {len(variants)} variants at their failing call)")
    named = None if failure_text else \
        default_failure_text(episode, target, session, tokenizer)
    if named:
        failure_text = named
        if progress is not None:
            progress(f"failure: {named!r} in the call's output (named by the destructive tool "
                     "call; --failure-text overrides)")
    failure = failure_for(session.incident, tokenizer, failure_text)
    if {"trace", "components"} & set(steps) and find_twin(session.incident, benign) is None:
        raise NoTwinError(
            f"none of the {len(benign)} benign incidents is this incident's benign twin (its "
            "prompt minus one inserted span): record the same request without the injected "
            "text among the benign incidents, or leave out the steps that need it "
            "(--steps spans,directions)")
    rep = investigate(session, failure=failure, tokenizer=tokenizer, benign=list(benign),
                      contrast=list(contrast), variants=list(variants), steps=list(steps),
                      budget_kl=budget_kl, max_variants=max_variants, progress=progress)
    rep.episode_call = call
    return rep


def default_failure_text(episode: Incident, target: Any, call: ReplaySession, tokenizer: Any
                         ) -> str | None:
    """The failure text of an episode investigated at the call before its destructive tool
    call (``target`` is the destructive mark): what that tool call's result names (agent-db:
    ``DELETE``), when the tokens the investigated ``call`` generated contain it; else None."""
    from analysis.cca._failure import generated_tokens

    from ._episode import destructive_mark, destructive_text

    named = destructive_text(episode) if target is destructive_mark else None
    if not named:
        return None
    said = _text(tokenizer, [t for _, t in generated_tokens(call)])
    return named if named in said else None


def _text(tokenizer: Any, ids: list[int]) -> str:
    return str(tokenizer.decode(ids, skip_special_tokens=True))


def investigation_result(rep: Investigation, session: ReplaySession, tokenizer: Any,
                         **extra: Any) -> dict[str, Any]:
    """The result JSON: ``rep.to_dict()`` and the prompt's tokens, the output, ``fix_found``;
    for an episode, those of the model call investigated and ``episode`` (its ordered steps,
    :func:`._episode.episode_steps`)."""
    from ._episode import episode_steps, is_episode

    episode = None
    if is_episode(session.incident):
        from analysis.rca._episode_call import model_call_incident

        episode = episode_steps(session.incident, tokenizer, call=rep.episode_call)
        if rep.episode_call is not None:
            session = session.replayer.load(model_call_incident(session.incident,
                                                                rep.episode_call))
    inc = session.incident
    ids = [int(t) for t in inc.tensor("input_ids", step=0, kind="input").reshape(-1)]
    greedy = session.run(greedy=True)
    out_ids = [int(lg[0].argmax()) for lg in greedy.logits if lg is not None]
    content = inc.manifest.get("content") or {}
    recorded = content.get("output_text") if inc.manifest.get("content_captured") else None
    if episode is not None:      # the call's own output, not the whole episode's text
        recorded = next((s["output"] for s in episode["steps"] if s.get("investigated")),
                        recorded)
    d = rep.to_dict()
    d.update(prompt_tokens=[str(tokenizer.decode([t])) for t in ids],
             output={"recorded": recorded, "replayed": _text(tokenizer, out_ids)},
             fix_found=bool(rep.fix is not None and rep.fix.flip and rep.fix.interventions),
             model={k: (inc.manifest.get("model") or {}).get(k) for k in ("name", "fingerprint")},
             episode=episode, **extra)
    return dict(clean_json(json.loads(json.dumps(d, default=str))))


def save_outputs(rep: Investigation, result: dict[str, Any], out: Path) -> dict[str, Path]:
    """``report.json`` (the result) and, when a fix was found, ``fix.json`` + safetensors."""
    from integrations.incident import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    if result.get("fix_found") and rep.fix is not None:
        paths["fix"] = rep.fix.save(out / "fix.json")
    paths["report"] = out / "report.json"
    atomic_write(paths["report"], json.dumps(result, indent=1, allow_nan=False).encode())
    return paths


def results_dir(data_dir: str | Path, incident_id: str, job_id: str) -> Path:
    """The job's results area."""
    return Path(data_dir) / "results" / incident_id / job_id


def _prepare(host: JobHost, job: JobRecord, params: dict[str, Any]) -> dict[str, Any]:
    """Runner side: incident ids (the caller's tenant only) to files; caller paths dropped."""
    out = {k: v for k, v in params.items() if not k.endswith("_paths")}
    for key in _INPUTS:
        ids = params.get(key)
        if ids is None:
            continue
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise JobFailed(f"params.{key} must be a list of incident ids")
        missing = [i for i in ids if host.incident(i) is None]
        if missing:
            raise JobFailed(f"params.{key}: no incident {missing[:10]} in this tenant; pass ids "
                            "of your own stored incidents (upload them first)")
        out[f"{key}_paths"] = [str(host.incident_path(i)) for i in ids if i != job.incident_id]
    row = host.incident(job.incident_id)
    if "benign" not in params and row is not None and row.model_fingerprint:
        limit = params.get("max_benign", 32)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise JobFailed(f"params.max_benign must be an integer >= 1, got {limit!r}")
        out.update(_default_benign(host, job, row, limit, params))
    return out


def _default_benign(host: JobHost, job: JobRecord, row: Any, limit: int,
                    params: dict[str, Any]) -> dict[str, Any]:
    """The newest sampled incidents of the model, except those the caller named as contrast
    or variants (an injected prompt that did not fail is no benign traffic)."""
    rules = list(host.config.baselines.sample_rules) or ["ratio"]
    skip = [row.id, *sorted({i for k in ("contrast", "variants") for i in params.get(k) or []})]
    ids = [r[0] for r in host.read(
        "SELECT id FROM incidents WHERE tenant = ? AND model_fingerprint = ? "
        f"AND trigger_rule IN ({', '.join('?' for _ in rules)}) "
        f"AND id NOT IN ({', '.join('?' for _ in skip)}) "
        "ORDER BY received_at DESC, id LIMIT ?",
        [job.tenant, row.model_fingerprint, *rules, *skip, limit])]
    return {"benign_paths": [str(host.incident_path(i)) for i in ids],
            "benign_source": f"the {len(ids)} newest sampled incidents of the model"
                             + (" not named as contrast or variants" if len(skip) > 1 else "")}


def _options(p: dict[str, Any]) -> dict[str, Any]:
    steps = p.get("steps", list(STEPS))
    if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
        raise JobFailed(f"params.steps must be a list of step names ({', '.join(STEPS)})")
    kl, mv, text = p.get("budget_kl", 0.1), p.get("max_variants", 20), p.get("failure_text")
    if isinstance(kl, bool) or not isinstance(kl, int | float) or kl <= 0:
        raise JobFailed(f"params.budget_kl must be a number > 0 (nats), got {kl!r}")
    if isinstance(mv, bool) or not isinstance(mv, int) or mv < 0:
        raise JobFailed(f"params.max_variants must be an integer >= 0, got {mv!r}")
    if text is not None and not isinstance(text, str):
        raise JobFailed("params.failure_text must be a string")
    call = p.get("failing_call")
    if call is not None and (isinstance(call, bool) or not isinstance(call, int) or call < 0):
        raise JobFailed("params.failing_call must be an integer >= 0 (the episode's failing "
                        f"model call, counted from 0), got {call!r}")
    return {"steps": steps, "budget_kl": float(kl), "max_variants": mv, "failure_text": text,
            "failing_call": call}


def _model_lock() -> contextlib.AbstractContextManager[Any]:
    """The replay lock of ``analysis.replay``: held for the whole investigation, so no other
    job's replay runs while its search has hooks installed on the shared model."""
    from analysis.replay import _session

    lock = getattr(_session, "_REPLAY_LOCK", None)
    return lock if lock is not None else contextlib.nullcontext()


def investigate_job(ctx: JobContext) -> dict[str, Any]:
    """Job kind ``investigate`` (module doc)."""
    from analysis.replay import Replayer
    from integrations.incident import Incident

    inc = ctx.open_incident()
    spec = require_registered(ctx.config, inc, job="investigating replays")
    opts = _options(dict(ctx.params))
    model, tokenizer = load_registered(spec)
    given = {k: [Incident.open(p) for p in ctx.params.get(f"{k}_paths") or []] for k in _INPUTS}
    lines: list[str] = []
    with _model_lock():
        session = Replayer(model).load(inc)
        try:
            rep = run_investigation(session, tokenizer, benign=given["benign"],
                                    contrast=given["contrast"], variants=given["variants"],
                                    progress=lines.append, **opts)
        except AnalysisError as e:
            raise JobFailed(f"investigate {inc.id}: {e}") from e
        result = investigation_result(
            rep, session, tokenizer, fidelity=fidelity_dict(session.fidelity()),
            inputs={k: len(v) for k, v in given.items()}, progress=lines,
            benign_source=ctx.params.get("benign_source") or "params.benign")
    out = results_dir(ctx.config.data_dir, inc.id, ctx.job_id)
    paths = save_outputs(rep, result, out)
    rel = {k: str(v.relative_to(ctx.config.data_dir)) for k, v in paths.items()}
    return {**result, "fix_file": rel.get("fix"), "report_file": rel["report"]}


def _after(host: JobHost, job: JobRecord, result: dict[str, Any]) -> None:
    host.observe(INVESTIGATIONS, labels={"outcome": "fix" if result.get("fix_found")
                                         else "no_fix"})


INVESTIGATE = JobKind("investigate", run=investigate_job, prepare=_prepare, after=_after,
                      metrics=(INVESTIGATIONS,),
                      options=frozenset({*_INPUTS, "budget_kl", "failing_call", "failure_text",
                                         "max_benign", "max_variants", "steps"}),
                      uses_data_dir=True)
