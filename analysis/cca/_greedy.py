"""The ``greedy`` search strategy: ranked group testing, unguided fallbacks, one pass budget.

A ranking (attribution patching, blended with a detector report when the search is guided) is
only a prior: it may reorder the candidates, never remove one, and a wrong one must not sink
the search. So the strategy runs in phases, each a real-replay reduction on the same candidate
set, each stopped by its share of the forward-pass budget (:mod:`._budget`):

1. ``ranked``: adaptive group testing along the ranking
   (:func:`~._group_testing.progressive_reduce`) — about k·log2 N replays for k causes among N
   when the failure is monotone, whatever the ranking says;
2. ``unguided``: the same group testing along the candidates' own order, when phase 1 failed
   (more than ``max_size`` elements along the ranking, a non-monotone interplay, or its share
   of the budget spent) and that order differs from the ranking;
3. ``ddmin``: order-free delta debugging on every candidate, with what is left.

Each phase but the last to run gets half of the budget left when it starts. If intervening on every
candidate at once does not flip the failure, delta debugging (which starts from the whole set)
cannot help and is skipped, but the unguided phase still runs: when the failure is not monotone
(mean-ablating everything breaks the model into the failing output), a prefix in another order
can flip where the whole set does not — so a prior never loses a fix the unguided search finds.
When every phase fails the result says so: each phase's reason and the passes used.

Example::

    red = greedy_search(oracle, ranked=order, unguided=list(range(oracle.n)), max_size=8,
                        limit=1024)
    red.items, red.phase, red.reason
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ._budget import BudgetedOracle, BudgetExhausted
from ._group_testing import Reduction, ddmin, progressive_reduce
from ._oracle import Oracle, flipped

__all__ = ["greedy_search"]

_Run = Callable[[BudgetedOracle], Reduction]


def greedy_search(oracle: Oracle, *, ranked: Sequence[int], unguided: Sequence[int],
                  max_size: int, limit: int) -> Reduction:
    """Phases 1-3 of the module doc within ``limit`` total forward passes of ``oracle``.

    ``ranked`` and ``unguided`` are two orders of the same candidates. Returns the first
    phase's flipping set (``phase`` names it) or ``items=None`` with every phase's reason.
    """
    if sorted(ranked) != sorted(unguided):
        raise ValueError("the ranked and unguided orders must hold the same candidates")
    phases: list[tuple[str, _Run]] = [
        ("ranked", lambda o: progressive_reduce(o, ranked, max_size=max_size))]
    if list(unguided) != list(ranked):
        phases.append(("unguided", lambda o: progressive_reduce(o, unguided, max_size=max_size)))
    phases.append(("ddmin", lambda o: _ddmin_within(o, unguided, max_size=max_size)))
    trace: list[str] = []
    failures: list[str] = []
    nothing_flips = False
    for i, (name, run) in enumerate(phases):
        if nothing_flips and name == "ddmin":
            trace.append("ddmin: skipped (the whole set does not flip)")
            break
        used = oracle.forward_passes
        last = i == len(phases) - 1 or (nothing_flips and phases[i + 1][0] == "ddmin")
        share = limit - used if last else (limit - used) // 2
        capped = BudgetedOracle(oracle, limit=used + max(share, 0))
        try:
            red = run(capped)
        except BudgetExhausted as stop:
            red = Reduction(None, f"stopped at its share of the budget ({stop})")
        trace += [f"{name}: {t}" for t in red.trace]
        if red.items is not None:
            trace.append(f"{name}: found {len(red.items)} element(s) after "
                         f"{oracle.forward_passes} forward passes")
            return Reduction(red.items, "", trace, phase=name)
        failures.append(f"{name} phase: {red.reason}")
        trace.append(f"{name}: failed ({red.reason})")
        if i == 0:
            nothing_flips = _all_flip(oracle, unguided, limit) is False
    if nothing_flips and len(failures) == 1:
        return Reduction(None, failures[0].split(": ", 1)[1], trace)
    return Reduction(None, "; ".join(failures) + f" ({oracle.forward_passes} forward passes "
                     f"used of a budget of {limit})", trace)


def _all_flip(oracle: Oracle, items: Sequence[int], limit: int) -> bool | None:
    """Whether intervening on every candidate flips (one batch-1 replay); None when the budget
    has no room for it."""
    try:
        return flipped(BudgetedOracle(oracle, limit=limit).verify(list(items)))
    except BudgetExhausted:
        return None


def _ddmin_within(oracle: BudgetedOracle, items: Sequence[int], *, max_size: int) -> Reduction:
    """Delta debugging on all ``items`` (they flip together), within the oracle's budget; a set
    larger than ``max_size`` is refused."""
    dd = ddmin(oracle, items, max_evaluations=oracle.remaining)
    if dd.items is not None and len(dd.items) > max_size:
        return Reduction(None, f"delta debugging's smallest set has {len(dd.items)} "
                               f"interventions, more than max_fix_set_size={max_size}", dd.trace)
    return dd
