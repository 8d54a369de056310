"""Adaptive group testing on an :class:`~._oracle.Oracle`: find the few candidates that matter.

Every decision below is a real replay (the oracle); nothing is estimated.

:func:`smallest_flipping_prefix`  the growth step: along an order (a ranking), intervene on the
    first ``j`` candidates jointly; gallop ``j = 1, 2, 4, ...`` (batched, a few prefixes per
    forward) until a prefix flips, then binary-search the bracket (batch-1 replays).
:func:`progressive_reduce`  group testing driven by that search. With ``base`` the elements found
    so far, the smallest flipping prefix ``order[:j]`` proves ``order[j-1]`` necessary (``base +
    order[:j-1]`` does not flip) and everything after ``j`` unnecessary; the search recurses into
    ``order[:j-1]`` until ``base`` alone flips. ``k`` causes among ``N`` cost about
    ``k * log2(N)`` replays *whatever the order* — a ranking that puts the cause last (saturated
    gradients) costs ``2 log2 N`` instead of ``1``, never ``N``. Faults that need several
    interventions together (no single one flips) are found the same way: no prefix flips until
    it holds all of them.
:func:`ddmin`  classic delta debugging (Zeller & Hildebrandt 2002): intervene on halves, keep a
    half that flips alone, else drop a chunk whose complement still flips, else split finer.
    Order-free; used when the ranking-driven reduction fails (non-monotone interactions).
:func:`minimise`  the final proof: remove each element in turn (batch-1 replays) until no
    removal still flips — the set is then 1-minimal — and return the metric without each
    element (its necessity).

Example::

    j = smallest_flipping_prefix(oracle, order, [])
    found = progressive_reduce(oracle, order, max_size=8)
    final, without = minimise(oracle, found.items)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ._oracle import Oracle, flipped

__all__ = ["Reduction", "ddmin", "minimise", "progressive_reduce", "smallest_flipping_prefix"]


@dataclass
class Reduction:
    """The outcome of a reduction: ``items`` (candidate indices) or ``None`` with ``reason``;
    ``phase``: which phase of a multi-phase search found ``items`` (:mod:`._greedy`)."""

    items: list[int] | None
    reason: str = ""
    trace: list[str] = field(default_factory=list)
    phase: str = ""


def smallest_flipping_prefix(oracle: Oracle, order: Sequence[int], base: Sequence[int], *,
                             hi_known: int | None = None, gallop_batch: int = 4,
                             trace: list[str] | None = None) -> int | None:
    """Smallest ``j`` such that ``base + order[:j]`` flips, assuming ``base`` alone does not.

    ``hi_known``: a length already known to flip (skips the gallop). None when even the whole
    ``order`` does not flip.
    """
    n = len(order)
    if n == 0:
        return None
    lo, hi = 0, hi_known
    if hi is None:
        lengths: list[int] = []
        L = 1
        while True:
            lengths.append(min(L, n))
            if L >= n:
                break
            L *= 2
        for i in range(0, len(lengths), max(1, gallop_batch)):
            chunk = lengths[i:i + gallop_batch]
            metrics = oracle.evaluate_batch([[*base, *order[:L]] for L in chunk])
            if trace is not None:
                trace.append("gallop " + ", ".join(f"{L}:{m:+.3g}" for L, m in
                                                   zip(chunk, metrics)))
            for L, m in zip(chunk, metrics):
                if flipped(m):
                    hi = L
                    break
                lo = L
            if hi is not None:
                break
        if hi is None:
            return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        m = oracle.verify([*base, *order[:mid]])
        if trace is not None:
            trace.append(f"bisect {lo}<{mid}<{hi}: {m:+.3g}")
        if flipped(m):
            hi = mid
        else:
            lo = mid
    return hi


def progressive_reduce(oracle: Oracle, order: Sequence[int], *, base: Sequence[int] = (),
                       max_size: int, hi_known: int | None = None,
                       gallop_batch: int = 4) -> Reduction:
    """Find elements of ``order`` that, added to ``base``, flip the failure (module doc).

    ``max_size`` bounds the number of elements added. Returns the added elements in the order
    found (most necessary first).
    """
    required = list(base)
    pool = list(order)
    trace: list[str] = []
    hi = hi_known
    while True:
        j = smallest_flipping_prefix(oracle, pool, required, hi_known=hi,
                                     gallop_batch=gallop_batch, trace=trace)
        if j is None:
            what = f"{len(pool)} candidates" if not required else \
                f"{len(required) - len(base)} found elements plus the {len(pool)} remaining"
            return Reduction(None, f"intervening on all {what} at once does not flip the "
                                   "failure", trace)
        required.append(pool[j - 1])
        pool = pool[:j - 1]
        if len(required) - len(base) > max_size:
            return Reduction(None, f"more than max_fix_set_size={max_size} interventions are "
                                   "needed along this order", trace)
        if not pool:
            break
        m = oracle.verify(required)
        trace.append(f"check {len(required) - len(base)} found: {m:+.3g}")
        if flipped(m):
            break
        hi = len(pool)
    return Reduction(required[len(base):], "", trace)


def ddmin(oracle: Oracle, items: Sequence[int], *, base: Sequence[int] = (),
          max_evaluations: int = 10_000) -> Reduction:
    """Delta debugging on a flipping set ``base + items`` (module doc); returns a subset of
    ``items`` that flips with ``base`` (1-minimal when the oracle is monotone)."""
    c = list(items)
    n = 2
    trace: list[str] = []
    used = 0
    while len(c) >= 2 and used < max_evaluations:
        size = -(-len(c) // n)
        chunks = [c[i:i + size] for i in range(0, len(c), size)]
        tests: list[list[int]] = [list(ch) for ch in chunks]
        if len(chunks) > 2:
            tests += [[x for x in c if x not in set(ch)] for ch in chunks]
        metrics = oracle.evaluate_batch([[*base, *t] for t in tests])
        used += len(tests)
        chosen = None
        for t, m in zip(tests, metrics):
            if flipped(m) and flipped(oracle.verify([*base, *t])):
                chosen = t
                break
        if chosen is not None:
            is_chunk = any(chosen == ch for ch in chunks)
            trace.append(f"n={n}: keep {'chunk' if is_chunk else 'complement'} of "
                         f"{len(chosen)}")
            c = chosen
            n = 2 if is_chunk else max(n - 1, 2)
            continue
        if n >= len(c):
            break
        trace.append(f"n={n}: no chunk or complement flips; split finer")
        n = min(len(c), 2 * n)
    return Reduction(c, "", trace)


def minimise(oracle: Oracle, items: Sequence[int], *, base: Sequence[int] = ()
             ) -> tuple[list[int], dict[int, float]]:
    """Make ``base + items`` 1-minimal in ``items`` by verified removals (module doc).

    Returns the kept items and, per kept item, the verified metric without it (all > 0: each
    removal un-flips the failure). Elements are tried last-found first.
    """
    cur = list(items)
    while True:
        without: dict[int, float] = {}
        dropped = False
        for e in reversed(cur):
            rest = [x for x in cur if x != e]
            m = oracle.verify([*base, *rest])
            without[e] = m
            if flipped(m):
                cur = rest
                dropped = True
                break
        if not dropped:
            return cur, {e: without[e] for e in cur}
