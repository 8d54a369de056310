"""Pure-function oracles standing in for the model, to test the search algorithms' logic and
pass counts exactly (the :class:`analysis.cca._oracle.Oracle` protocol).

Example::

    oracle = BooleanOracle(1024, [{3, 900}])      # two causes needed together
    oracle.verify([3, 900]), oracle.passes        # (-1.0, 1)
"""

from __future__ import annotations

from collections.abc import Sequence


class BooleanOracle:
    """Candidates ``0..n-1``; the failure is fixed when the set covers any clause of a DNF
    (each clause a set of candidates that must all be intervened) or, with ``bulk``, when it
    holds at least ``bulk`` candidates (a fix that only "works" by breaking the model: no small
    set exists). Every call counts its sets as replays; nothing is memoised."""

    def __init__(self, n: int, clauses: list[set[int]], *, bulk: int | None = None) -> None:
        self._n, self.clauses, self.bulk, self.passes = n, clauses, bulk, 0

    @property
    def n(self) -> int:
        return self._n

    @property
    def forward_passes(self) -> int:
        return self.passes

    def _metric(self, s: Sequence[int]) -> float:
        items = set(s)
        hit = any(c <= items for c in self.clauses)
        return -1.0 if hit or (self.bulk is not None and len(items) >= self.bulk) else 1.0

    def evaluate_batch(self, sets: Sequence[Sequence[int]]) -> list[float]:
        self.passes += len(sets)
        return [self._metric(s) for s in sets]

    def verify(self, s: Sequence[int]) -> float:
        self.passes += 1
        return self._metric(s)
