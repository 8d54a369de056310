"""Multi-prompt GCG (``analysis.scenarios._gcg_multi``) on the tiny random Llama: with one prompt
it is plain GCG step for step, with two it lowers their mean loss, records per prompt the suffix
that ``done`` accepted, honours the veto and stops once every prompt is hit."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from analysis.scenarios._gcg import GCGConfig, gcg_search, prefix_cache, target_losses
from analysis.scenarios._gcg_multi import GCGTask, gcg_search_multi, multi_losses
from tests.unit.analysis._tiny_gcg import POST, PREFIX, START, TARGET, tiny_llama32

OTHER = GCGTask(prefix=[2, 9, 3], post=POST, target=[8, 7])
ALL = torch.ones(32, dtype=torch.bool)


@pytest.fixture(scope="module")
def tiny() -> Any:
    return tiny_llama32()


def test_one_prompt_is_plain_gcg(tiny: Any) -> None:
    cfg = GCGConfig(steps=12, top_k=8, batch=16, seed=3)
    single = gcg_search(tiny, PREFIX, START, POST, TARGET, allowed=ALL, config=cfg)
    multi = gcg_search_multi(tiny, [GCGTask(PREFIX, POST, TARGET)], START, allowed=ALL,
                             config=cfg)
    assert multi.history == pytest.approx(single.history, abs=1e-6)
    assert multi.suffix_ids == single.suffix_ids and multi.steps == single.steps == 12


def test_mean_loss_is_the_mean_of_each_prompts_loss(tiny: Any) -> None:
    tasks = [GCGTask(PREFIX, POST, TARGET), OTHER]
    caches = [prefix_cache(tiny, t.prefix) for t in tasks]
    cands = torch.tensor([START, [7, 1, 30]])
    per = [target_losses(tiny, c, cands, t.post, t.target) for c, t in zip(caches, tasks)]
    got = multi_losses(tiny, caches, tasks, cands)
    assert torch.allclose(got, (per[0] + per[1]) / 2)
    assert not torch.allclose(per[0], per[1])  # the prompts really differ


def test_two_prompts_lower_the_mean_loss_and_respect_the_veto(tiny: Any) -> None:
    tasks = [GCGTask(PREFIX, POST, TARGET), OTHER]
    caches = [prefix_cache(tiny, t.prefix) for t in tasks]
    start = float(multi_losses(tiny, caches, tasks, torch.tensor([START]))[0])
    seen: list[str] = []
    res = gcg_search_multi(tiny, tasks, START, allowed=ALL, keep=lambda s: 9 not in s,
                           config=GCGConfig(steps=15, top_k=8, batch=32, seed=0),
                           progress=seen.append)
    assert res.steps == 15 and len(seen) == 15 and res.hits == {}
    assert res.loss < start and 9 not in res.suffix_ids
    again = float(multi_losses(tiny, caches, tasks, torch.tensor([res.suffix_ids]))[0])
    assert again == pytest.approx(res.loss, abs=1e-5)


def test_hits_are_recorded_per_prompt_and_the_search_stops_when_all_are_hit(tiny: Any) -> None:
    tasks = [GCGTask(PREFIX, POST, TARGET), OTHER]
    res = gcg_search_multi(tiny, tasks, START, allowed=ALL,
                           config=GCGConfig(steps=20, top_k=8, batch=16, seed=1),
                           done=lambda i, s: i == 1 or s != START)
    assert res.hit_steps == {1: 0, 0: 1} and res.steps == 1
    assert res.hits[1] == START and res.hits[0] != START
