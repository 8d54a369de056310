"""The progressive investigation of one real failure (DESIGN §14), every step verified by
replay, with progress shown: input spans → causal trace and decision layer (consistency over
failing variants), from the tail (where the failure is read out of the injected span) and from
the span itself (after which layer removing it no longer removes the failure, DESIGN §14's
wording; ``span_trace``, ``span_consistency``) → components → directions (a deployable, gated
fix) → the fix, checked on the incident itself by replay.

Example::

    rep = investigate(session, failure=Failure.text_contains("HACKED", tokenizer=tok),
                      benign=benign_incidents, contrast=control_incidents,
                      variants=other_failing, tokenizer=tok)
    rep.input_spans.text, rep.trace.decision_layer, rep.components, rep.fix
    rep.save("out/")           # report.json, fix.json + fix.safetensors
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analysis.cca import BoundFailure, Failure, FixSet
from analysis.replay import Replayer, ReplaySession
from integrations.errors import AnalysisError, ForensicsError
from integrations.incident import Incident

from ._components import components
from ._directions import DirectionFix, derive_fix
from ._episode_call import CallMarks, EpisodeView, on_failing_call
from ._fix import verified_fix
from ._span_trace import SpanTrace, benign_means, span_trace
from ._spans import InputSpans, attribute_input
from ._trace import CausalTrace, causal_trace
from ._twins import find_twin
from ._variants import Consistency, decision_consistency

__all__ = ["Investigation", "investigate", "load_session", "text_predicate"]

STEPS = ("spans", "trace", "components", "directions")
#: The benign incidents whose residual means the span trace ablates with (the first ones).
MAX_MEAN_BENIGN = 32
FailureOf = Failure | Callable[[Incident], Failure]


@dataclass
class Investigation:
    """What :func:`investigate` found (module doc); ``None`` where a step was skipped or could
    not run (``notes`` says why)."""

    incident_id: str
    failure: str
    input_spans: InputSpans | None = None
    trace: CausalTrace | None = None
    consistency: Consistency | None = None
    span_trace: SpanTrace | None = None
    span_consistency: Consistency | None = None
    components: FixSet | None = None
    directions: DirectionFix | None = None
    fix: FixSet | None = None
    episode_call: int | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        def d(x: Any) -> Any:
            return None if x is None else x.to_dict()

        return {"incident_id": self.incident_id, "failure": self.failure,
                "input_spans": d(self.input_spans), "trace": d(self.trace),
                "consistency": d(self.consistency), "span_trace": d(self.span_trace),
                "span_consistency": d(self.span_consistency), "components": d(self.components),
                "directions": d(self.directions), "fix": d(self.fix),
                "episode_call": self.episode_call,
                "seconds": dict(self.seconds), "notes": list(self.notes)}

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Write ``report.json`` and, when a fix was found, ``fix.json`` (+ safetensors)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"report": out / "report.json"}
        paths["report"].write_text(json.dumps(self.to_dict(), indent=1, default=str))
        if self.fix is not None and self.fix.interventions:
            paths["fix"] = self.fix.save(out / "fix.json")
        return paths


def text_predicate(failure: Failure) -> Callable[[str], bool]:
    """A text check for free generations: the failure's text (case-insensitive) is in it."""
    if failure.kind != "text" or not failure.text:
        raise AnalysisError("free-generation steps need a text failure (Failure.text_contains) "
                            "or failing_text=; got " + failure.describe())
    needle = failure.text.lower()
    return lambda text: needle in text.lower()


class _Run:
    """One investigation's state: timings, progress, notes, and the replay sessions it opened
    (one replayer, so the weights are fingerprinted once; each incident loaded — and its
    fidelity measured — once, however many steps replay it)."""

    def __init__(self, rep: Investigation, progress: Callable[[str], None] | None,
                 session: ReplaySession) -> None:
        self.rep, self.say, self.t0 = rep, progress or (lambda _m: None), time.perf_counter()
        self.replayer = session.replayer
        self.sessions: dict[int, ReplaySession] = {id(session.incident): session}

    def load(self, inc: Incident) -> ReplaySession:
        """The incident's replay session (opened on first use)."""
        got = self.sessions.get(id(inc))
        if got is None:
            got = self.sessions[id(inc)] = self.replayer.load(inc)
        return got

    def step(self, name: str, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        self.say(f"[{time.perf_counter() - self.t0:6.1f}s] {name} …")
        try:
            return fn()
        except (ForensicsError, ValueError) as e:
            self.rep.notes.append(f"{name}: {e}")
            self.say(f"  {name} could not run: {e}")
            return None
        finally:
            self.rep.seconds[name] = round(time.perf_counter() - t, 2)


def _on_episode_call(session: ReplaySession, failing_step: int | CallMarks | None, *,
                     benign: Sequence[Incident], contrast: Sequence[Incident],
                     variants: Sequence[Incident]) -> EpisodeView:
    """The investigation's inputs moved onto the episode's failing model call."""
    if failing_step is None:
        raise AnalysisError(
            f"incident {session.incident.id!r} is an episode of {len(session.plan.starts)} "
            "model calls: pass failing_step= (the failing model call's index, or a predicate "
            "over the recorded external calls flagging where it failed)")
    return on_failing_call(session, failing_step, benign=benign, contrast=contrast,
                           variants=variants)


def investigate(session: ReplaySession, *, failure: FailureOf, tokenizer: Any,
                benign: Sequence[Incident], contrast: Sequence[Incident] = (),
                variants: Sequence[Incident] = (), twin: Sequence[int] | None = None,
                failing_text: Callable[[Incident, str], bool] | None = None,
                budget_kl: float = 0.1, steps: Sequence[str] = STEPS,
                max_variants: int = 20, progress: Callable[[str], None] | None = None,
                failing_step: int | CallMarks | None = None) -> Investigation:
    """Investigate the failing ``session`` (module doc). ``failure``: a Failure, or a function
    giving each incident's (when variants fail with different texts); ``failing_text(inc,
    text)``: whether a free generation still fails (default: the failure's text is in it);
    ``twin``: the benign twin's prompt ids (default: found among ``benign``).

    An episode (DESIGN §15) is investigated at its failing model call: ``failing_step`` is its
    index or a predicate flagging the recorded external call where it failed (see
    :mod:`._episode_call`); judge a fix on the episode with :func:`counterfactual_episode`."""
    episode_call = None
    if failing_step is not None or session.plan.episode:
        v = _on_episode_call(session, failing_step, benign=benign, contrast=contrast,
                             variants=variants)
        session, benign, contrast, variants, episode_call = (v.session, v.benign, v.contrast,
                                                             v.variants, v.call)
    inc = session.incident
    fail_of: Callable[[Incident], Failure] = failure if callable(failure) and \
        not isinstance(failure, Failure) else (lambda _i: failure)  # type: ignore[assignment]
    spec = fail_of(inc)
    check = failing_text or (lambda i, text: text_predicate(fail_of(i))(text))
    bound = spec.bind(session, tokenizer=tokenizer)
    rep = Investigation(incident_id=inc.id, failure=spec.describe(), episode_call=episode_call)
    run = _Run(rep, progress, session)
    twin_ids = list(twin) if twin is not None else find_twin(inc, benign)
    if "spans" in steps:
        rep.input_spans = run.step("input spans", lambda: attribute_input(
            session, failing=lambda text: check(inc, text), tokenizer=tokenizer))
    if "trace" in steps and twin_ids is not None:
        _trace_steps(run, session, twin_ids, bound, benign=benign,
                     variants=variants[:max_variants], failure_of=fail_of, tokenizer=tokenizer)
    elif "trace" in steps:
        rep.notes.append("causal trace: no benign twin (a benign prompt equal to this one "
                         "minus one span) among the benign incidents; pass twin=")
    if "components" in steps and twin_ids is not None:
        rep.components = run.step("components", lambda: components(
            session, failure=spec, twin_ids=twin_ids, trace=rep.trace, benign=benign,
            tokenizer=tokenizer, budget_kl=budget_kl))
    if "directions" in steps:
        failing = [inc, *variants]
        twins = [twin_ids, *(find_twin(v, benign) for v in variants)]
        rep.directions = run.step("directions", lambda: derive_fix(
            session.model, failing=failing, contrast=contrast, benign=benign,
            tokenizer=tokenizer, failing_text=check, twins=twins, budget_kl=budget_kl,
            progress=run.say))
        found = rep.directions
        if found is not None and found.interventions:
            rep.fix = run.step("verify the fix by replay", lambda: verified_fix(
                session, found, failing=failing, benign=benign, failing_text=check,
                tokenizer=tokenizer, bound=bound, load=run.load))
    run.say(f"[{time.perf_counter() - run.t0:6.1f}s] done")
    return rep


def _trace_steps(run: _Run, session: ReplaySession, twin_ids: Sequence[int],
                 bound: BoundFailure, *, benign: Sequence[Incident],
                 variants: Sequence[Incident], failure_of: Callable[[Incident], Failure],
                 tokenizer: Any) -> None:
    """The causal trace and the decision layer, from the tail and from the span, over the
    variants (into ``run.rep``)."""
    rep = run.rep
    rep.trace = run.step("causal trace", lambda: causal_trace(
        session, twin_ids=twin_ids, failure=bound, tokenizer=tokenizer))
    rep.consistency = run.step("decision layer over variants", lambda: decision_consistency(
        session.model, variants, benign, failure_of=failure_of, tokenizer=tokenizer,
        reference=rep.trace, load=run.load))
    rep.span_trace, rep.span_consistency = run.step(
        "decision layer from the span, over variants", lambda: _span_side(
            session, run.load, twin_ids, bound, benign=benign, variants=variants,
            failure_of=failure_of, tokenizer=tokenizer)) or (None, None)


def _span_side(session: ReplaySession, load: Callable[[Incident], ReplaySession],
               twin_ids: Sequence[int], bound: BoundFailure, *, benign: Sequence[Incident],
               variants: Sequence[Incident], failure_of: Callable[[Incident], Failure],
               tokenizer: Any) -> tuple[SpanTrace, Consistency]:
    """The incident's span trace and the span-side decision layers of its variants."""
    means = benign_means(benign[:MAX_MEAN_BENIGN], load=load)
    st = span_trace(session, twin_ids=twin_ids, failure=bound, means=means)
    return st, decision_consistency(session.model, variants, benign, failure_of=failure_of,
                                    tokenizer=tokenizer, reference=st, load=load,
                                    measure="span", means=means)


def load_session(model: Any, path: str | Path) -> ReplaySession:
    """A replay session of the incident file at ``path`` (fingerprint checked)."""
    return Replayer(model).load(Incident.open(path))
