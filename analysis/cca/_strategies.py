"""The ``beam`` and ``exhaustive`` search strategies (``greedy`` is :mod:`._group_testing`).

``exhaustive`` — the oracle for small candidate sets: every combination of size 1, 2, ... up to
``max_size`` is replayed (batched), size by size; the first size with a flipping set wins (the
lowest-metric flipping set, confirmed at batch 1). It therefore returns a *smallest* fix set.
Its cost is ``sum_k C(N, k)`` replays; above ``max_sets`` it refuses with an error instead of
running for days.

``beam`` — every singleton is replayed; the ``beam_width`` best sets (lowest metric) are extended
by one candidate from the ``expand`` best singletons, level by level, until a set flips
(confirmed at batch 1) or ``max_size`` is reached. Cost about ``N + max_size * beam_width *
expand`` replays; it finds interactions the ranking misses when single effects point the way.

Example::

    red = exhaustive_search(oracle, max_size=2)
    red = beam_search(oracle, max_size=4, beam_width=4)
"""

from __future__ import annotations

import itertools
import math

from integrations.errors import AnalysisError

from ._group_testing import Reduction
from ._oracle import Oracle, flipped

__all__ = ["beam_search", "exhaustive_count", "exhaustive_search"]


def exhaustive_count(n: int, max_size: int) -> int:
    """Replays the exhaustive strategy needs in the worst case: ``sum_{k<=max_size} C(n, k)``."""
    return sum(math.comb(n, k) for k in range(1, min(max_size, n) + 1))


def _first_verified(oracle: Oracle, scored: list[tuple[float, tuple[int, ...]]],
                    trace: list[str], limit: int = 8) -> list[int] | None:
    for m, s in sorted(scored)[:limit]:
        v = oracle.verify(list(s))
        trace.append(f"confirm {list(s)}: batched {m:+.3g}, verified {v:+.3g}")
        if flipped(v):
            return list(s)
    return None


def _confirm_level(oracle: Oracle, scored: list[tuple[float, tuple[int, ...]]], size: int,
                   trace: list[str]) -> Reduction | None:
    """The first of a level's batched flips that a batch-1 replay confirms, as a result."""
    flips = [x for x in scored if flipped(x[0])]
    trace.append(f"size {size}: {len(flips)} of {len(scored)} flip (batched)")
    found = _first_verified(oracle, flips, trace) if flips else None
    return None if found is None else Reduction(found, "", trace)


def exhaustive_search(oracle: Oracle, *, max_size: int, max_sets: int = 200_000,
                      chunk: int = 512) -> Reduction:
    """Smallest flipping combination (module doc)."""
    n = oracle.n
    total = exhaustive_count(n, max_size)
    if total > max_sets:
        raise AnalysisError(
            f"exhaustive search over {n} candidates up to size {max_size} needs {total} replays "
            f"(> max_exhaustive_sets={max_sets}): use search_strategy='greedy' or 'beam', fewer "
            "candidates, a smaller max_fix_set_size, or raise max_exhaustive_sets")
    trace: list[str] = []
    for k in range(1, min(max_size, n) + 1):
        scored: list[tuple[float, tuple[int, ...]]] = []
        combos = itertools.combinations(range(n), k)
        while True:
            batch = list(itertools.islice(combos, chunk))
            if not batch:
                break
            metrics = oracle.evaluate_batch([list(c) for c in batch])
            scored += [(m, c) for m, c in zip(metrics, batch) if flipped(m)]
        trace.append(f"size {k}: {len(scored)} of {math.comb(n, k)} sets flip (batched)")
        if scored:
            found = _first_verified(oracle, scored, trace)
            if found is not None:
                return Reduction(found, "", trace)
    return Reduction(None, f"no combination of at most {max_size} of the {n} candidates flips "
                           "the failure (every one replayed)", trace)


def beam_search(oracle: Oracle, *, max_size: int, beam_width: int = 4,
                expand: int = 16) -> Reduction:
    """Beam search over sets (module doc)."""
    n = oracle.n
    trace: list[str] = []
    singles = oracle.evaluate_batch([[i] for i in range(n)])
    scored: list[tuple[float, tuple[int, ...]]] = [(m, (i,)) for i, m in enumerate(singles)]
    found = _confirm_level(oracle, scored, 1, trace)
    if found is not None:
        return found
    best_single = [s[0] for _, s in sorted(scored)][:max(expand, beam_width)]
    beam: list[tuple[int, ...]] = [s for _, s in sorted(scored)[:beam_width]]
    for k in range(2, min(max_size, n) + 1):
        cand = sorted({tuple(sorted({*s, c})) for s in beam for c in best_single if c not in s})
        if not cand:
            break
        metrics = oracle.evaluate_batch([list(c) for c in cand])
        level = sorted(zip(metrics, cand))
        found = _confirm_level(oracle, level, k, trace)
        if found is not None:
            return found
        beam = [s for _, s in level[:beam_width]]
    return Reduction(None, f"beam search (width {beam_width}, extending with the {expand} best "
                           f"single candidates) found no flipping set of at most {max_size}",
                     trace)
