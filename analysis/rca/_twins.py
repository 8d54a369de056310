"""Benign twins: the benign prompt that equals a failing one minus one inserted span (or with a
shorter span in its place).

A failing prompt and its twin share a prefix and a suffix (the chat template's tail); the
failing one has an extra span between them (the injected text). :func:`aligned_tail` measures
that, :func:`find_twin` picks a failing incident's twin among benign incidents.

Example::

    aligned_tail([1, 2, 9, 9, 3, 4], [1, 2, 3, 4])    # (2, 4, 2)
    find_twin(failing_incident, benign_incidents)     # the twin's prompt ids, or None
"""

from __future__ import annotations

from collections.abc import Sequence

from integrations.incident import Incident

__all__ = ["aligned_tail", "find_twin", "prompt_ids"]


def prompt_ids(inc: Incident) -> list[int]:
    """The prompt token ids an incident was served (its step-0 ``input_ids``)."""
    return [int(t) for t in inc.tensor("input_ids", step=0, kind="input").reshape(-1)]


def aligned_tail(ids: Sequence[int], twin: Sequence[int]) -> tuple[int, int, int]:
    """``(prefix, span_end, suffix)``: the shared prefix length, where the extra span of
    ``ids`` ends, and the shared suffix length."""
    n = min(len(ids), len(twin))
    pre = 0
    while pre < n and ids[pre] == twin[pre]:
        pre += 1
    suf = 0
    while suf < n - pre and ids[-1 - suf] == twin[-1 - suf]:
        suf += 1
    return pre, len(ids) - suf, suf


def find_twin(incident: Incident, benign: Sequence[Incident]) -> list[int] | None:
    """The benign prompt that differs from the incident's by one inserted span (the longest
    shared prefix + suffix covering at least half of it), or None.

    When no benign prompt differs by an insertion followed by a shared tail, the candidate
    sharing the most tokens is taken among the rest: a prompt that is a prefix of the
    incident's (an insertion at the end, as before) or one that differs by a *replaced* span —
    a shorter benign text in the same place (e.g. a tool returned a row whose notes say
    "Regular customer." where the failing episode's row carried an instruction), aligned on
    the shared suffix like an insertion — still sharing at least half of the prompt.
    """
    ids = prompt_ids(incident)
    # (insertion with a shared tail, shared), (any other candidate, shared)
    best, best_shared = None, 0
    other_best, other_shared = None, 0
    for b in benign:
        other = prompt_ids(b)
        if len(other) >= len(ids):
            continue
        pre, _, suf = aligned_tail(ids, other)
        inserted = pre + suf == len(other)
        if inserted and suf > 0 and pre + suf > best_shared:
            best, best_shared = other, pre + suf
        elif (inserted or suf > 0) and pre + suf > other_shared:
            other_best, other_shared = other, pre + suf
    if best is None:
        best, best_shared = other_best, other_shared
    return best if best is not None and best_shared * 2 >= len(ids) else None
