"""The report section of an episode (DESIGN §15: an agent loop or a conversation recorded as one
incident): its steps in order — each model call (its forward calls and KV cache use; with an
investigation, the end of its prompt and its output, decoded) and each tool call with its
recorded arguments and result — and which model call was investigated. Every text in it comes
from the served traffic (tool results, model output): untrusted, so it is escaped and cut.

The steps come from the investigation's result (``data.result("investigate")["episode"]``, which
holds the decoded texts) when there is one, else from the manifest alone (``episode`` and
``external_calls``: tool calls with their arguments and results, model calls as forward calls).

Example::

    html = episode(data)       # None for an incident that is not an episode
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ._data import ReportData
from ._html import esc, note, table

__all__ = ["episode"]

#: Characters of one recorded argument / result shown when the manifest is the only source.
TOOL_CHARS = 400


def _cut(text: str, limit: int = TOOL_CHARS) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit} more chars)"


def _from_manifest(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The steps as the manifest alone has them (untrusted: anything malformed is skipped)."""
    raw = manifest.get("episode")
    steps = raw.get("steps") if isinstance(raw, Mapping) else None
    calls = manifest.get("external_calls")
    calls = calls if isinstance(calls, list) else []
    out, k = [], 0
    for s in steps if isinstance(steps, list) else []:
        if not isinstance(s, Mapping):
            continue
        if s.get("kind") == "model":
            fs = s.get("forward_steps")
            out.append({"kind": "model", "index": k, "cache": s.get("cache"),
                        "forward_steps": fs if isinstance(fs, list) and fs else None})
            k += 1
        elif s.get("kind") == "tool":
            i = s.get("call")
            c = calls[i] if isinstance(i, int) and 0 <= i < len(calls) and \
                isinstance(calls[i], Mapping) else {}
            result = c.get("result")
            out.append({"kind": "tool", "call": i, "name": s.get("name"),
                        "args": _cut(json.dumps(c.get("args"), default=str)),
                        "result": _cut(json.dumps(result, default=str)),
                        "destructive": isinstance(result, Mapping)
                        and bool(result.get("destructive"))})
    return out


def _row(s: Mapping[str, Any], failing: int | None) -> list[str]:
    if s.get("kind") == "tool":
        mark = ' <span class="badge bad destructive">marked destructive by the tool</span>' \
            if s.get("destructive") else ""
        return [f"tool {esc(s.get('call'))}", f"<code>{esc(s.get('name'))}</code>{mark}",
                f'<pre class="tokens">{esc(s.get("args"))}</pre>',
                f'<pre class="tokens">{esc(s.get("result"))}</pre>']
    k = s.get("index")
    fs = s.get("forward_steps") or ["?", "?"]
    where = f"forward calls {esc(fs[0])}..{esc(fs[-1])}, cache {esc(s.get('cache'))}"
    if s.get("prompt_tokens") is not None:
        where += f", {esc(s.get('prompt_tokens'))} tokens fed"
    mark = f' <b id="investigated-call">investigated (failing call {esc(k)})</b>' \
        if k is not None and k == failing else ""
    prompt = f'<pre class="tokens">{esc(s.get("prompt_end"))}</pre>' \
        if s.get("prompt_end") is not None else ""
    output = f'<pre class="tokens">{esc(s.get("output"))}</pre>' \
        if s.get("output") is not None else "—"
    return [f"model {esc(k)}", where + mark, prompt or "—", output]


def episode(data: ReportData) -> str | None:
    """The episode's steps in order and the model call investigated (module doc)."""
    if data.manifest.get("episode") is None:
        return None
    inv = data.result("investigate") or {}
    got = inv.get("episode")
    steps = (got.get("steps") if isinstance(got, Mapping) else None) or \
        _from_manifest(data.manifest)
    call = inv.get("episode_call")
    n_models = sum(1 for s in steps if s.get("kind") == "model")
    head = (f"<p>One incident of {n_models} model calls and {len(steps) - n_models} tool "
            "calls, in the order they ran (tool calls with their recorded arguments and "
            "results; long texts cut). " +
            (f"The investigation looked at model call <b>{esc(call)}</b>.</p>"
             if call is not None else "</p>"))
    if not inv:
        head += note("no investigation of this episode yet: model calls are shown by their "
                     "forward calls (the decoded texts come with an investigation)")
    elif got is None:
        head += note("the investigation recorded no episode texts (an older result)")
    return head + table(["step", "what", "input (end of the prompt / arguments)",
                         "output / result"], [_row(s, call) for s in steps],
                        table_id="episode-steps")
