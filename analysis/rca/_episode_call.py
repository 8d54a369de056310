"""The failing step of an episode, as an incident the investigation's steps can work on.

An episode (an agent loop, DESIGN §15) is one incident of several model calls and the tool calls
between them (the manifest's ``episode``). Something irreversible happens at a tool call — e.g.
SQLite executed a ``DELETE`` — and the model call that *emitted* it is the one just before that
tool call. Input attribution, the causal trace, components and directions all reason about one
model call: its prompt (the whole context the agent fed it, the rows the tools returned
included) and what it generated. So :func:`failing_call` finds that model call from the
recorded external calls, and :func:`model_call_incident` cuts the episode to it: the forward
calls of that model call only, renumbered from 0, with the same recorded tensors (inputs,
activations, logits) and the manifest without ``episode`` (its ``episode_call`` says where it
came from; ``external_calls`` are kept so a check can restore the recorded state). Replaying it
is replaying that model call of the episode, bit for bit — a model call that started with a new
KV cache depends on nothing before it. A call that carried the previous turn's cache cannot be
cut out (its prompt is not all in its own forward calls): refused.

A candidate fix is then judged on the whole episode again (:func:`counterfactual_episode`: the
agent re-run forward in the sandbox with the fix applied).

Example::

    k = failing_call(inc, marks=lambda call: bool((call.get("result") or {}).get("destructive")))
    one = model_call_incident(inc, k)          # the model call that wrote the DELETE
    session = Replayer(model).load(one)        # bit-exact, like any single-call incident
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from integrations.errors import AnalysisError
from integrations.incident import Episode, Incident

__all__ = ["CallMarks", "EpisodeView", "episode_of", "failing_call", "model_call_incident",
           "model_calls", "on_failing_call"]

#: A predicate over one recorded external call (``{"name", "args", "result", ...}``): True for
#: the call where the failure happened (e.g. the statement SQLite executed destructively).
CallMarks = Callable[[Mapping[str, Any]], bool]


def episode_of(incident: Incident) -> Episode:
    """The incident's episode (one model call for an incident without ``episode``)."""
    steps = {r.step for r in incident.records(kind="input")}
    return Episode.from_manifest(incident.manifest, forward_steps=len(steps))


def failing_call(incident: Incident, *, marks: CallMarks) -> int:
    """Index (among the episode's model calls) of the model call just before the first external
    call that ``marks`` flags. Raises :class:`~integrations.errors.AnalysisError` when no
    recorded call is flagged or no model call precedes it."""
    calls = incident.manifest.get("external_calls") or []
    model_seen = -1
    for step in episode_of(incident).steps:
        if step.kind == "model":
            model_seen += 1
        elif 0 <= step.call < len(calls) and marks(calls[step.call]):
            if model_seen < 0:
                raise AnalysisError(f"incident {incident.id!r}: external call {step.call} "
                                    f"({step.name}) is flagged but no model call precedes it")
            return model_seen
    raise AnalysisError(f"incident {incident.id!r}: none of its {len(calls)} recorded external "
                        "calls is flagged by marks=; pass the failing model call's index instead")


def model_calls(incident: Incident) -> int:
    """How many model calls the incident holds."""
    return len(episode_of(incident).model_steps())


def model_call_incident(incident: Incident, call: int) -> Incident:
    """Model call ``call`` of an episode as a single-call incident (module doc); an incident
    of one model call is returned unchanged for ``call == 0``."""
    models = episode_of(incident).model_steps()
    if not 0 <= call < len(models):
        raise AnalysisError(f"incident {incident.id!r} has {len(models)} model calls; there is "
                            f"no model call {call}")
    if len(models) == 1:
        return incident
    m = models[call]
    if m.cache == "carried":
        raise AnalysisError(
            f"model call {call} of incident {incident.id!r} continued the previous call's KV "
            "cache: its prompt is not in its own forward calls, so it cannot be investigated "
            "on its own; investigate the whole conversation's first call, or re-serve it "
            "with the cache recomputed")
    records = [dataclasses.replace(r, step=r.step - m.first)
               for r in incident.records(kind=None, copy=True) if m.first <= r.step <= m.last]
    manifest = incident.manifest
    manifest.pop("integrity", None)
    manifest.pop("episode", None)
    manifest["id"] = f"{incident.id}-call{call}"
    manifest["episode_call"] = {"incident": incident.id, "call": call,
                                "forward_steps": [m.first, m.last]}
    return Incident.from_records(manifest, records)


@dataclasses.dataclass(frozen=True)
class EpisodeView:
    """An investigation's inputs cut to model calls (:func:`on_failing_call`): the failing
    call's session, each variant's failing call, each contrast episode's same call, and every
    model call of each benign episode (all of them are benign prompts of the application)."""

    session: Any
    call: int
    benign: list[Incident]
    contrast: list[Incident]
    variants: list[Incident]


def _call_index(inc: Incident, step: int | CallMarks) -> int:
    return step if isinstance(step, int) else failing_call(inc, marks=step)


def on_failing_call(session: Any, step: int | CallMarks, *, benign: Sequence[Incident],
                    contrast: Sequence[Incident], variants: Sequence[Incident]) -> EpisodeView:
    """The investigation of an episode ``session`` moved onto its failing model call
    (``step``: its index, or a :data:`CallMarks` predicate over the recorded external calls)."""
    call = _call_index(session.incident, step)
    one = model_call_incident(session.incident, call)
    return EpisodeView(
        session=session.replayer.load(one), call=call,
        benign=[model_call_incident(b, k) for b in benign for k in range(model_calls(b))],
        contrast=[model_call_incident(c, call) for c in contrast],
        variants=[model_call_incident(v, _call_index(v, step)) for v in variants])
