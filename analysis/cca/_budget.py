"""A forward-pass budget for the fix-set search: an oracle that refuses to go past a limit.

The search must never cost more than it saves without saying so. :class:`BudgetedOracle` wraps
any :class:`~._oracle.Oracle` and raises :class:`BudgetExhausted` *before* a call would take
its replays past ``limit`` (a memoised batch-1 verification is free and always allowed), so a
search phase can be given a share of the budget and stopped cleanly when it runs out; the
caller then falls back or gives up, and says how many passes were used.

Example::

    capped = BudgetedOracle(oracle, limit=oracle.forward_passes + 100)
    try:
        red = progressive_reduce(capped, order, max_size=8)
    except BudgetExhausted as stop:
        print(stop)          # "... 100 forward passes ..."
"""

from __future__ import annotations

from collections.abc import Sequence

from ._oracle import Oracle

__all__ = ["BudgetExhausted", "BudgetedOracle"]


class BudgetExhausted(Exception):
    """A search phase would have gone past its forward-pass limit (nothing was replayed)."""

    def __init__(self, *, used: int, wanted: int, limit: int) -> None:
        self.used, self.wanted, self.limit = used, wanted, limit
        super().__init__(f"{wanted} more replay(s) would exceed the limit of {limit} forward "
                         f"passes ({used} used)")


class BudgetedOracle:
    """``oracle`` with a hard ``limit`` on its total ``forward_passes`` (module doc).

    Example::

        capped = BudgetedOracle(oracle, limit=64)
        capped.remaining      # 64 - oracle.forward_passes
    """

    def __init__(self, oracle: Oracle, *, limit: int) -> None:
        self.oracle = oracle
        self.limit = int(limit)

    @property
    def n(self) -> int:
        return self.oracle.n

    @property
    def forward_passes(self) -> int:
        return self.oracle.forward_passes

    @property
    def remaining(self) -> int:
        """Replays left before the limit (never negative)."""
        return max(0, self.limit - self.oracle.forward_passes)

    def _charge(self, wanted: int) -> None:
        used = self.oracle.forward_passes
        if used + wanted > self.limit:
            raise BudgetExhausted(used=used, wanted=wanted, limit=self.limit)

    def evaluate_batch(self, sets: Sequence[Sequence[int]]) -> list[float]:
        self._charge(len(sets))
        return self.oracle.evaluate_batch(sets)

    def verify(self, s: Sequence[int]) -> float:
        known = getattr(self.oracle, "verified", None)
        if not (callable(known) and known(s) is not None):
            self._charge(1)
        return self.oracle.verify(s)
