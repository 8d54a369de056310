"""Which model call of an episode an investigation looks at, and the episode's steps as a report
shows them (DESIGN §15; ``forensics investigate --failing-call K``, the ``investigate`` job's
``failing_call``).

An episode (an agent loop: model calls and the recorded tool calls between them) is investigated
at one model call (:func:`analysis.rca.investigate`'s ``failing_step``). :func:`failing_target`
picks it: the index the caller gave; else the only model call; else the call just before the
first recorded tool call whose result the tool itself marked destructive (a true or non-empty
``destructive``, as the shipped agents' tools report it — agent-db's ``run_sql`` records
``{"rows": [], "destructive": ["DELETE"]}`` — so each failing variant gets its own); else :class:`FailingCallError`, listing the episode's model calls and
saying to pass the index. An incident that is not an episode gives None (investigated as always).
Found by that mark, the failure text defaults to what the mark names (:func:`destructive_text`:
``DELETE``) when the investigated call's output contains it.

:func:`episode_steps` is the episode in order for the report: every model call (its forward
calls, how its KV cache was served, the end of its prompt and its output, decoded) and every
tool call (name, recorded arguments and result), each text cut to a readable length.

Example::

    target = failing_target(inc, failing_call=None, tokenizer=tok)   # 1, or a mark predicate
    episode_steps(inc, tok, call=1)["steps"][2]  # {"kind": "model", "index": 1, "output": ...}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from integrations.errors import AnalysisError

if TYPE_CHECKING:
    from analysis.rca._episode_call import CallMarks
    from integrations.incident import EpisodeStep, Incident

__all__ = ["FailingCallError", "destructive_mark", "destructive_text", "episode_steps",
           "failing_target", "is_episode"]

#: Characters of a tool argument / result, a model output and a prompt's end kept for a report.
TEXT_CHARS = {"tool": 400, "output": 600, "prompt": 300}


class FailingCallError(AnalysisError):
    """Which model call of an episode failed cannot be told (or the index given is not one)."""


def destructive_mark(call: Mapping[str, Any]) -> bool:
    """True for a recorded tool call whose result the tool marked destructive: a true or
    non-empty ``destructive`` (``{"destructive": true}``, agent-db's ``["DELETE"]``)."""
    result = call.get("result")
    return isinstance(result, Mapping) and bool(result.get("destructive"))


def destructive_text(incident: Incident) -> str | None:
    """The text the first destructive tool call's result names (agent-db's ``run_sql`` records
    ``"destructive": ["DELETE"]``: ``"DELETE"``); None when the marks are only ``true``. An
    investigation at that call's model call uses it as the failure text (the statement the
    model wrote) when none was given."""
    for call in incident.manifest.get("external_calls") or []:
        if isinstance(call, Mapping) and destructive_mark(call):
            named = call["result"]["destructive"]
            if isinstance(named, list) and named and isinstance(named[0], str) and named[0]:
                return named[0]
            return None
    return None


def is_episode(incident: Incident) -> bool:
    """Whether the incident is an episode (its manifest orders model and tool calls)."""
    return incident.manifest.get("episode") is not None


def _model_steps(incident: Incident) -> list[EpisodeStep]:
    from analysis.rca._episode_call import episode_of

    return episode_of(incident).model_steps()


def failing_target(incident: Incident, *, failing_call: int | None,
                   tokenizer: Any) -> int | CallMarks | None:
    """The model call to investigate (module doc): an index, a mark predicate, or None for an
    incident that is not an episode (``failing_call`` must then be None or 0)."""
    models = _model_steps(incident)
    if failing_call is not None:
        if isinstance(failing_call, bool) or not 0 <= failing_call < len(models):
            raise FailingCallError(
                f"incident {incident.id!r} has no model call {failing_call!r}; "
                + _listing(incident, tokenizer))
        return failing_call if is_episode(incident) else None
    if not is_episode(incident):
        return None
    if len(models) == 1:
        return 0
    calls = incident.manifest.get("external_calls") or []
    if any(destructive_mark(c) for c in calls if isinstance(c, Mapping)):
        return destructive_mark
    raise FailingCallError(
        f"incident {incident.id!r} is an episode of {len(models)} model calls and none of its "
        f"{len(calls)} recorded tool calls is marked destructive, so which call failed cannot "
        "be told: pass its index (--failing-call K, or params.failing_call); "
        + _listing(incident, tokenizer))


def _listing(incident: Incident, tokenizer: Any) -> str:
    """``model calls: 0 (forward calls 0..7) -> 'output' ...``."""
    parts = []
    for k, m in enumerate(_model_steps(incident)):
        out = _cut(_decode(tokenizer, _output_ids(incident, m)), 80) if tokenizer is not None \
            else f"{m.last - m.first + 1} tokens"
        parts.append(f"{k} (forward calls {m.first}..{m.last}) -> {out!r}")
    return "its model calls: " + "; ".join(parts)


def _ids(incident: Incident, step: int) -> list[int]:
    return [int(t) for t in incident.tensor("input_ids", step=step, kind="input").reshape(-1)]


def _output_ids(incident: Incident, m: EpisodeStep) -> list[int]:
    """What model call ``m`` generated: the token fed at each of its decode calls, then the
    top-1 of the recorded logits of its last forward call (when logits were recorded)."""
    out = [t for s in range(m.first + 1, m.last + 1) for t in _ids(incident, s)]
    if m.last in incident.steps("logits", kind="logits"):
        logits = incident.tensor("logits", step=m.last, kind="logits")
        out.append(int(logits.reshape(-1, logits.shape[-1])[-1].argmax()))
    return out


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return str(tokenizer.decode(ids, skip_special_tokens=True))


def _cut(text: str, limit: int, *, tail: bool = False) -> str:
    if len(text) <= limit:
        return text
    n = len(text) - limit
    return f"({n} earlier chars) …{text[-limit:]}" if tail else f"{text[:limit]}… ({n} more chars)"


def _json_text(value: Any) -> str:
    return _cut(json.dumps(value, default=str, ensure_ascii=False), TEXT_CHARS["tool"])


def episode_steps(incident: Incident, tokenizer: Any, *, call: int | None) -> dict[str, Any]:
    """The episode in order for a report (module doc); ``call``: the model call investigated."""
    from analysis.rca._episode_call import episode_of

    calls = incident.manifest.get("external_calls") or []
    steps: list[dict[str, Any]] = []
    k = 0
    for s in episode_of(incident).steps:
        if s.kind == "tool":
            c = calls[s.call] if 0 <= s.call < len(calls) else {}
            steps.append({"kind": "tool", "call": s.call, "name": s.name,
                          "args": _json_text([*(c.get("args") or []), *(
                              [c["kwargs"]] if c.get("kwargs") else [])]),
                          "result": _json_text(c.get("result")),
                          "destructive": destructive_mark(c)})
            continue
        prompt = _ids(incident, s.first)
        steps.append({"kind": "model", "index": k, "forward_steps": [s.first, s.last],
                      "cache": s.cache, "prompt_tokens": len(prompt),
                      "prompt_end": _cut(_decode(tokenizer, prompt), TEXT_CHARS["prompt"],
                                         tail=True),
                      "output": _cut(_decode(tokenizer, _output_ids(incident, s)),
                                     TEXT_CHARS["output"]),
                      "investigated": k == call})
        k += 1
    return {"call": call, "model_calls": k, "steps": steps}
