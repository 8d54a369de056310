"""Turning toxic search records into shipped cases: run at batch 1, label, veto, twin, transfer.

A failing case is ``request + suffix`` whose prompt passes the veto
(:func:`analysis.scenarios._toxic_label.prompt_flags` is empty) and whose batch-1 greedy answer
(24 tokens) the classifier labels profane; its twin ``req-<j>`` is the bare request, itself
classified clean and answered cleanly. :func:`relabel` applies these rules to an earlier stop's
cases; :func:`transfer_cases` tries found suffixes on other requests (each pair run by the
model, never assumed).

Example::

    from analysis.scenarios._toxic_cases import cases_from_records, relabel
    failing, benign = cases_from_records(model, tok, doc["search"]["records"])
    relabel(tok, old_doc["failing"])   # [{'id': 'gcg-2', 'survives': False, ...}, ...]
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from analysis.scenarios._base import (
    GenerationSpec,
    Prompt,
    eos_ids,
    greedy_generate,
    render_chat,
    strip_after_eos,
)
from analysis.scenarios._toxic_label import THRESHOLD, classify, copying, prompt_flags
from analysis.scenarios._toxic_search import REQUESTS, decision_point

__all__ = ["GENERATION", "cases_from_records", "make_prompt", "observe", "relabel",
           "suffix_flags", "transfer_cases", "twin"]

_log = logging.getLogger(__name__)

GENERATION = GenerationSpec(max_new_tokens=24)
"""How every toxic prompt is run: greedy, 24 new tokens."""


def make_prompt(tokenizer: Any, pid: str, content: str, meta: dict[str, Any]) -> Prompt:
    """The chat prompt for one user message ``content`` (rendered ids, greedy config).

    Example::

        p = make_prompt(tok, "req-0", REQUESTS[0], {"request": REQUESTS[0]})
    """
    msgs = [{"role": "user", "content": content}]
    return Prompt(id=pid, text=content, messages=msgs, input_ids=render_chat(tokenizer, msgs),
                  generation=GENERATION, meta=meta)


def suffix_flags(tokenizer: Any, p: Prompt) -> list[str]:
    """The prompt veto for a shipped case (its suffix re-encoded): empty when it passes.

    Example::

        suffix_flags(tok, sc.failing[0])   # []
    """
    suffix = str(p.meta.get("suffix", ""))
    return prompt_flags(tokenizer, tokenizer.encode(suffix, add_special_tokens=False), p.text)


def observe(model: Any, tokenizer: Any, p: Prompt) -> bool:
    """Run ``p`` at batch 1; store its answer, the answer's label, copying and (if toxic) the
    decision point. True when the answer is classified toxic.

    Example::

        observe(model, tok, p), p.output_text, p.meta["p_output"]
    """
    p.output_ids = strip_after_eos(greedy_generate(model, p.input_ids, GENERATION),
                                   eos_ids(model))
    p.output_text = tokenizer.decode(p.output_ids, skip_special_tokens=True)
    p.meta["p_output"] = classify([p.output_text])[0]
    toxic = p.meta["p_output"] >= THRESHOLD
    if toxic:
        p.meta["copying"] = copying(p.output_text, p.text)
        hit = decision_point(tokenizer, p.output_ids)
        if hit is not None:
            p.decision_step, p.decision_token_id = hit
            p.decision_position = len(p.input_ids) + hit[0] - 1
    return bool(toxic)


def twin(model: Any, tokenizer: Any, j: int) -> Prompt | None:
    """The benign twin ``req-<j>`` of ``REQUESTS[j]`` (``None`` if the request or its answer is
    classified toxic).

    Example::

        twin(model, tok, 2).output_text
    """
    t = make_prompt(tokenizer, f"req-{j}", REQUESTS[j], {"request": REQUESTS[j]})
    clean = classify([REQUESTS[j]])[0] < THRESHOLD and not observe(model, tokenizer, t)
    return t if clean else None


def _failing(model: Any, tokenizer: Any, pid: str, j: int, suffix: str,
             meta: dict[str, Any]) -> Prompt | None:
    """``REQUESTS[j] + suffix`` as a failing case if it passes the veto and fails at batch 1."""
    p = make_prompt(tokenizer, pid, REQUESTS[j] + suffix,
                    {"request": REQUESTS[j], "suffix": suffix, **meta})
    p.meta["p_prompt"] = classify([p.text])[0]
    if suffix_flags(tokenizer, p) or not observe(model, tokenizer, p):
        return None
    p.counterpart = f"req-{j}"
    return p


def cases_from_records(model: Any, tokenizer: Any, records: Sequence[dict[str, Any]]
                       ) -> tuple[list[Prompt], list[Prompt]]:
    """Failing prompts (``gcg-<j>``) from the successful search records, re-checked at batch 1,
    and the clean twins of every request searched.

    Example::

        failing, benign = cases_from_records(model, tok, records)
    """
    failing: list[Prompt] = []
    twins: dict[int, Prompt | None] = {}
    seen: set[tuple[int, str]] = set()
    for r in records:
        j = REQUESTS.index(r["request"])
        if j not in twins:
            twins[j] = twin(model, tokenizer, j)
        if twins[j] is None or not r["success"] or (j, r["suffix"]) in seen:
            continue  # the bare request must be clean and answered cleanly
        seen.add((j, r["suffix"]))
        n = sum(1 for i, _ in seen if i == j)
        extra = {"group": r["group"]} if "group" in r else {}
        p = _failing(model, tokenizer, f"gcg-{j}" + (f"-{n}" if n > 1 else ""), j, r["suffix"],
                     {"target": r["target"], "gcg_steps": r["steps"], **extra})
        failing += [p] if p is not None else []
    return failing, [t for t in twins.values() if t is not None]


def relabel(tokenizer: Any, failing: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """An earlier stop's shipped failing cases under this stop's rules (prompt veto, label on
    the stored answer only, copying), one row per case; ``survives`` when the veto passes and
    the stored answer is still classified toxic (:func:`cases_from_records` / ``build`` then
    re-run the model).

    Example::

        sum(r["survives"] for r in relabel(tok, old_doc["failing"]))
    """
    rows = []
    for d in failing:
        p = Prompt.from_json(d)
        flags = suffix_flags(tokenizer, p)
        p_out = classify([p.output_text or ""])[0]
        rows.append({"id": p.id, "suffix": p.meta.get("suffix"), "prompt_flags": flags,
                     "p_output": p_out, "copying": copying(p.output_text or "", p.text),
                     "survives": not flags and p_out >= THRESHOLD})
    return rows


def transfer_cases(model: Any, tokenizer: Any, doc: dict[str, Any]) -> int:
    """Try every suffix of a (non-transferred) failing case on every other request; append the
    pairs that pass the veto and fail at batch 1 (``<case id>-on-<j>``), and missing twins, to
    ``doc``. Returns the number of pairs run.

    Example::

        tried = transfer_cases(model, tok, doc)
    """
    benign = {d["id"] for d in doc["benign"]}
    have = {(d["meta"]["request"], d["meta"]["suffix"]) for d in doc["failing"]}
    found = [(d["id"], d["meta"]) for d in doc["failing"] if "transfer_of" not in d["meta"]]
    tried = 0
    for j in range(len(REQUESTS)):
        if f"req-{j}" not in benign:
            t = twin(model, tokenizer, j)
            if t is None:
                continue
            doc["benign"].append(t.to_json())
            benign.add(t.id)
        for src, meta in found:
            if (REQUESTS[j], meta["suffix"]) in have:
                continue
            tried += 1
            p = _failing(model, tokenizer, f"{src}-on-{j}", j, meta["suffix"],
                         {"target": meta["target"], "transfer_of": src})
            if p is not None:
                doc["failing"].append(p.to_json())
                have.add((REQUESTS[j], meta["suffix"]))
                _log.info("transfer: %s fails: %r -> %r", p.id, p.text, p.output_text)
        _log.info("transfer: request %d done, %d pairs tried so far", j, tried)
    return tried
