"""GCG suffix search (``analysis.scenarios._gcg``) on a tiny random Llama with a known answer:
the exhaustive minimum of the target loss over every suffix."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from analysis.scenarios._gcg import (
    GCGConfig,
    candidate_swaps,
    gcg_search,
    prefix_cache,
    target_losses,
    token_gradients,
)
from tests.unit.analysis._tiny_gcg import POST, PREFIX, START, TARGET, tiny_llama32


@pytest.fixture(scope="module")
def tiny() -> Any:
    return tiny_llama32()


@pytest.fixture(scope="module")
def all_losses(tiny: Any) -> torch.Tensor:
    """Target loss of every one of the 32**3 suffixes (the oracle)."""
    grid = torch.cartesian_prod(*[torch.arange(32)] * 3)  # [32768, 3]
    cache = prefix_cache(tiny, PREFIX)
    return torch.cat([target_losses(tiny, cache, grid[i:i + 4096], POST, TARGET)
                      for i in range(0, len(grid), 4096)])


def test_cached_losses_equal_a_full_forward(tiny: Any) -> None:
    ids = torch.tensor([PREFIX + START + POST + TARGET])
    logits = tiny(ids).logits[0, -len(TARGET) - 1:-1]
    full = torch.nn.functional.cross_entropy(logits, torch.tensor(TARGET))
    got = target_losses(tiny, prefix_cache(tiny, PREFIX), torch.tensor([START, START]), POST,
                        TARGET)
    assert torch.allclose(got, full.expand(2), atol=1e-5)


def test_gradient_ranks_one_token_swaps_better_than_chance(tiny: Any) -> None:
    cache = prefix_cache(tiny, PREFIX)
    grad = token_gradients(tiny, cache, START, POST, TARGET)
    assert grad.shape == (3, 32)
    # true effect of every single swap at position 0
    cands = torch.tensor([[t, 4, 4] for t in range(32)])
    true = target_losses(tiny, cache, cands, POST, TARGET)
    top = set((-grad[0]).topk(8).indices.tolist())
    bottom = set(grad[0].topk(8).indices.tolist())
    assert true[list(top)].mean() < true[list(bottom)].mean()


def test_candidates_swap_one_position_for_an_allowed_top_k_token(tiny: Any) -> None:
    grad = token_gradients(tiny, prefix_cache(tiny, PREFIX), START, POST, TARGET)
    allowed = torch.ones(32, dtype=torch.bool)
    allowed[:8] = False
    cands = candidate_swaps(grad, START, allowed, top_k=4, batch=64,
                            generator=torch.Generator().manual_seed(0))
    tops = (-grad).masked_fill(~allowed, float("-inf")).topk(4, dim=1).indices
    for c in cands.tolist():
        diff = [i for i in range(3) if c[i] != START[i]]
        assert len(diff) <= 1
        for i in diff:
            assert c[i] >= 8 and c[i] in tops[i].tolist()


def test_search_reaches_the_exhaustive_minimum_region(tiny: Any,
                                                      all_losses: torch.Tensor) -> None:
    start_loss = float(all_losses[4 * 32 * 32 + 4 * 32 + 4])
    seen: list[str] = []
    res = gcg_search(tiny, PREFIX, START, POST, TARGET, allowed=torch.ones(32, dtype=torch.bool),
                     config=GCGConfig(steps=25, top_k=8, batch=32, seed=0), progress=seen.append)
    assert res.steps == 25 and len(seen) == 25 and not res.success
    got = float(target_losses(tiny, prefix_cache(tiny, PREFIX), torch.tensor([res.suffix_ids]),
                              POST, TARGET)[0])
    assert got == pytest.approx(res.loss, abs=1e-5)
    rank = int((all_losses < got - 1e-6).sum())
    assert got < start_loss and rank < 0.001 * len(all_losses), (got, rank, start_loss)


def test_search_stops_when_done_and_keep_vetoes(tiny: Any) -> None:
    res = gcg_search(tiny, PREFIX, START, POST, TARGET, allowed=torch.ones(32, dtype=torch.bool),
                     config=GCGConfig(steps=10, top_k=8, batch=16, seed=1),
                     keep=lambda s: 9 not in s, done=lambda s: s != START)
    assert res.success and res.steps == 1 and 9 not in res.suffix_ids
