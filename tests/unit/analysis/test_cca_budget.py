"""The greedy search under a misleading prior: a ranking reorders, never excludes; a pass budget
(default: the exhaustive single-candidate count) caps every phase; a failed ranked phase falls
back to unguided group testing, then delta debugging; giving up says why, with the passes used.

The algorithms run on pure-function oracles here (exact pass counts); the same behaviour on a
planted model guided by a real detector report is in ``test_cca_planted.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import SimpleNamespace

import pytest

from analysis.cca import CausalCCA
from analysis.cca._attribution import blend_ranking
from analysis.cca._budget import BudgetedOracle, BudgetExhausted
from analysis.cca._greedy import greedy_search
from analysis.cca._group_testing import ddmin
from integrations.errors import ConfigError
from tests.unit.analysis._oracles import BooleanOracle

N = 1024
DECOYS = set(range(900, 912))  # a 12-element way to flip it: more than max_fix_set_size=8


def test_a_ranking_that_leads_astray_falls_back_to_unguided_group_testing() -> None:
    oracle = BooleanOracle(N, [{7}, DECOYS])
    ranked = sorted(DECOYS) + [i for i in range(N) if i not in DECOYS and i != 7] + [7]
    red = greedy_search(oracle, ranked=ranked, unguided=list(range(N)), max_size=8, limit=N)
    assert red.items == [7] and red.phase == "unguided"
    assert any(t.startswith("ranked: failed (more than max_fix_set_size=8") for t in red.trace)
    assert oracle.passes <= N


def test_a_fix_that_needs_bulk_is_refused_within_the_budget_and_says_why() -> None:
    # Any 600 interventions "fix" it (by breaking the model): delta debugging alone, with no
    # budget, spends thousands of replays to prove it; the capped search stops at N.
    uncapped = BooleanOracle(N, [], bulk=600)
    ddmin(uncapped, list(range(N)))
    assert uncapped.passes > N
    oracle = BooleanOracle(N, [], bulk=600)
    red = greedy_search(oracle, ranked=list(range(N))[::-1], unguided=list(range(N)),
                        max_size=8, limit=N)
    assert red.items is None and oracle.passes <= N
    for phase in ("ranked phase", "unguided phase", "ddmin phase", "budget of 1024"):
        assert phase in red.reason


def test_nothing_flips_skips_delta_debugging() -> None:
    # the whole set does not flip: ddmin cannot help; the other order is tried (one gallop)
    oracle = BooleanOracle(64, [])
    red = greedy_search(oracle, ranked=list(range(64))[::-1], unguided=list(range(64)),
                        max_size=8, limit=64)
    assert red.items is None and "does not flip" in red.reason
    assert "ddmin: skipped (the whole set does not flip)" in red.trace
    assert oracle.passes <= 2 * (math.log2(64) + 1) + 1  # two gallops + the whole set once


class BreakingOracle(BooleanOracle):
    """Not monotone: the clauses fix the failure, but intervening on ``breaks`` or more
    candidates breaks the model back into the failing output (mean-ablating everything)."""

    def __init__(self, n: int, clauses: list[set[int]], *, breaks: int) -> None:
        super().__init__(n, clauses)
        self.breaks = breaks

    def _metric(self, s: Sequence[int]) -> float:
        return 1.0 if len(set(s)) >= self.breaks else super()._metric(s)


def test_a_prior_cannot_lose_a_fix_when_the_whole_set_does_not_flip() -> None:
    # Measured on planted BERT (benchmarks/cca_guides.py, mean on neurons + heads): a guide
    # ranking the cause last saw no prefix flip, the whole set did not either, and the search
    # stopped with "no fix" while the unguided order found one in ~30 passes.
    unguided = BreakingOracle(N, [{5}], breaks=512)
    assert greedy_search(unguided, ranked=list(range(N)), unguided=list(range(N)), max_size=8,
                         limit=N).items == [5]
    oracle = BreakingOracle(N, [{5}], breaks=512)
    red = greedy_search(oracle, ranked=list(range(N))[::-1], unguided=list(range(N)),
                        max_size=8, limit=N)
    assert red.items == [5] and red.phase == "unguided" and oracle.passes <= N


def test_the_orders_must_hold_the_same_candidates() -> None:
    with pytest.raises(ValueError, match="same candidates"):
        greedy_search(BooleanOracle(4, [{1}]), ranked=[0, 1], unguided=[0, 1, 2], max_size=2,
                      limit=4)


def test_budgeted_oracle_refuses_before_replaying() -> None:
    inner = BooleanOracle(8, [{1}])
    capped = BudgetedOracle(inner, limit=3)
    assert capped.evaluate_batch([[0], [1]]) == [1.0, -1.0] and capped.remaining == 1
    with pytest.raises(BudgetExhausted, match="limit of 3"):
        capped.evaluate_batch([[2], [3]])
    assert inner.passes == 2  # the refused batch was not replayed
    assert capped.verify([1]) == -1.0 and capped.remaining == 0


def test_guidance_reorders_and_never_excludes() -> None:
    sites = [f"blocks.{i // 4}.mlp.post[neuron={i % 4}]" for i in range(16)]
    est = [float(i) for i in range(16)]
    for ranked in ([], [("blocks.3.mlp.post", 5.0)], [("blocks.9.attn", 1.0)],
                   [(f"blocks.{i}.mlp", float(i)) for i in range(4)]):
        order = blend_ranking(est, sites, guided_by=SimpleNamespace(ranked_sites=ranked),
                              cf_weight=1.0)
        assert sorted(order) == list(range(16))
    order = blend_ranking(est, sites, guided_by=SimpleNamespace(
        ranked_sites=[("blocks.3.mlp.post", 5.0)]), cf_weight=1.0)
    assert set(order[:4]) == {12, 13, 14, 15}  # the guided site first, the rest all kept


def test_budget_and_ranking_options_are_validated() -> None:
    assert CausalCCA(max_fix_set_size=2).max_forward_passes is None  # N, set per search
    assert CausalCCA(max_fix_set_size=2, max_forward_passes=50).max_forward_passes == 50
    for bad in (0, -3, True):
        with pytest.raises(ConfigError, match="max_forward_passes"):
            CausalCCA(max_fix_set_size=2, max_forward_passes=bad)
    with pytest.raises(ConfigError, match="rank_by"):
        CausalCCA(max_fix_set_size=2, rank_by="cf")


def test_a_budget_too_small_for_the_fault_gives_up_within_it() -> None:
    oracle = BooleanOracle(N, [{3, 900}])  # two causes: ~40 replays needed
    red = greedy_search(oracle, ranked=list(range(N))[::-1], unguided=list(range(N)),
                        max_size=8, limit=12)
    assert red.items is None and oracle.passes <= 12
    assert "stopped at its share of the budget" in red.reason and "budget of 12" in red.reason
    roomy = BooleanOracle(N, [{3, 900}])
    found = greedy_search(roomy, ranked=list(range(N))[::-1], unguided=list(range(N)),
                          max_size=8, limit=N)
    assert found.items is not None and set(found.items) == {3, 900} and found.phase == "ranked"
