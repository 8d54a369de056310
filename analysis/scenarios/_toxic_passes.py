"""The passes of the toxic search: which requests GCG runs on, from which start, in what budget.

A *request pass* (:func:`run_requests`) runs single-prompt GCG on ``REQUESTS[j]`` for ``j`` in an
order until a wall-clock budget is spent: progressive (each request starts from the previous
one's final suffix), fresh (each from ``" !" * 10``) or resumed (each from the suffix its
latest unsuccessful record ended on, :func:`resume_points`: an earlier search continued). A
*group pass* (:func:`run_groups`) runs multi-prompt GCG on groups of requests, one suffix per
group. Both return the search records (one per request) and the minutes used; every step is
logged (the progress display of a long run).

Example::

    from analysis.scenarios._toxic_passes import run_groups, run_requests
    recs, minutes = run_requests(model, tok, [5, 38], seed=0, budget_min=10,
                                 per_request_s=360, steps=150, fresh=True)
    recs, minutes = run_groups(model, tok, [[18, 21, 23]], seed=0, budget_min=10,
                               per_group_s=600, steps=150)
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from typing import Any

from analysis.scenarios._toxic_search import (
    REQUESTS,
    TARGETS,
    search_group,
    search_request,
    suffix_mask,
)

__all__ = ["resume_points", "run_groups", "run_requests"]

_log = logging.getLogger(__name__)


def _report(j: int, r: dict[str, Any]) -> None:
    _log.info("request %d: success=%s after %d steps, %.0fs: %r -> %r %s", j, r["success"],
              r["steps"], r["seconds"], r["suffix"], r["output"], r["copying"])


def resume_points(records: Sequence[dict[str, Any]], order: Sequence[int]
                  ) -> dict[int, list[int]]:
    """Per request in ``order`` not yet broken, the suffix its latest record ended on.

    Example::

        resume_points(doc["search"]["records"], [5, 38])   # {5: [...], 38: [...]}
    """
    points: dict[int, list[int]] = {}
    broken: set[int] = set()
    for r in records:
        j = REQUESTS.index(r["request"])
        if j in order:
            points[j] = list(r["suffix_ids"])
            if r["success"]:
                broken.add(j)
    return {j: s for j, s in points.items() if j not in broken}


def run_requests(model: Any, tokenizer: Any, order: Sequence[int], *, seed: int,
                 budget_min: float, per_request_s: float, steps: int, fresh: bool,
                 resume: dict[int, list[int]] | None = None
                 ) -> tuple[list[dict[str, Any]], float]:
    """Single-prompt GCG over ``REQUESTS[j]`` for ``j`` in ``order`` until the budget is spent,
    each from the previous request's final suffix (progressive) or, if ``fresh``, from
    ``" !" * 10``, or, where ``resume`` has ``j``, from that suffix; records and minutes.

    Example::

        recs, minutes = run_requests(model, tok, [5], seed=0, budget_min=5,
                                     per_request_s=300, steps=150, fresh=True)
    """
    allowed = suffix_mask(tokenizer)
    t0 = time.perf_counter()
    records: list[dict[str, Any]] = []
    init: list[int] | None = None
    for j in order:
        if time.perf_counter() - t0 > budget_min * 60:
            break
        start = (resume or {}).get(j, init)
        r = search_request(model, tokenizer, REQUESTS[j], TARGETS[j],
                           allowed=allowed, seed=seed + j, init_suffix=start, steps=steps,
                           max_seconds=per_request_s,
                           progress=functools.partial(_log.info, "request %d: %s", j))
        _report(j, r)
        records.append(r)
        init = None if fresh else r["suffix_ids"]  # progressive: the next one continues
    return records, (time.perf_counter() - t0) / 60


def run_groups(model: Any, tokenizer: Any, groups: Sequence[Sequence[int]], *, seed: int,
               budget_min: float, per_group_s: float, steps: int,
               init: Sequence[int] | None = None) -> tuple[list[dict[str, Any]], float]:
    """Multi-prompt GCG on each group of request indices in turn (each from ``init``, default
    ``" !" * 10``) until the budget is spent; one record per request, and the minutes used.

    Example::

        recs, minutes = run_groups(model, tok, [[18, 21], [0, 3]], seed=0, budget_min=20,
                                   per_group_s=600, steps=150)
    """
    allowed = suffix_mask(tokenizer)
    t0 = time.perf_counter()
    records: list[dict[str, Any]] = []
    for js in groups:
        if time.perf_counter() - t0 > budget_min * 60:
            break
        recs = search_group(model, tokenizer, js, allowed=allowed, seed=seed + js[0],
                            init_suffix=init, steps=steps, max_seconds=per_group_s,
                            progress=functools.partial(_log.info, "group %s: %s", list(js)))
        for j, r in zip(js, recs):
            _report(j, r)
        records += recs
    return records, (time.perf_counter() - t0) / 60
