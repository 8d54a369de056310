"""Multi-prompt ("universal") GCG: one adversarial suffix optimised on several prompts at once.

Zou et al. (2023) get suffixes that transfer by optimising one suffix against the summed target
losses of several prompts: each step adds the prompts' token gradients (each normalised per
position, so no prompt dominates), samples one-swap candidates from the summed top-k, keeps the
candidate with the lowest *mean* target loss over the prompts, and records, per prompt, the
first suffix on which ``done(i, suffix)`` held. It stops when every prompt has been hit or the
budget (:class:`~analysis.scenarios._gcg.GCGConfig`) is spent. With one prompt it is plain GCG.

Example::

    from analysis.scenarios._gcg import GCGConfig
    from analysis.scenarios._gcg_multi import GCGTask, gcg_search_multi
    tasks = [GCGTask(prefix_a, post, target_a), GCGTask(prefix_b, post, target_b)]
    res = gcg_search_multi(model, tasks, suffix, allowed=mask, config=GCGConfig(steps=100),
                           done=lambda i, s: is_toxic_answer(i, s))
    res.hits      # {0: [...suffix ids...]} prompts the search broke, with the suffix that did
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from analysis.scenarios._gcg import (
    GCGConfig,
    best_candidate,
    candidate_swaps,
    prefix_cache,
    target_losses,
    token_gradients,
)

if TYPE_CHECKING:
    import torch

__all__ = ["GCGTask", "MultiResult", "gcg_search_multi", "multi_losses", "multi_step"]


@dataclass(frozen=True)
class GCGTask:
    """One prompt of a multi-prompt search: ids before the suffix, after it, and the target.

    Example::

        GCGTask(prefix=[1, 2, 3], post=[5], target=[6, 7])
    """

    prefix: Sequence[int]
    post: Sequence[int]
    target: Sequence[int]


@dataclass
class MultiResult:
    """Outcome of a multi-prompt search: the lowest mean-loss suffix seen and its loss, per
    prompt index the first suffix ``done`` accepted (``hits``) and the step it came at, the
    steps and seconds used and the mean loss after every step.

    Example::

        res.hits, res.hit_steps, res.loss
    """

    suffix_ids: list[int]
    loss: float
    hits: dict[int, list[int]]
    hit_steps: dict[int, int]
    steps: int
    seconds: float
    history: list[float] = field(default_factory=list)


def multi_losses(model: Any, caches: Sequence[Any], tasks: Sequence[GCGTask],
                 suffixes: torch.Tensor) -> torch.Tensor:
    """Mean over the prompts of each candidate's target loss -> ``[batch]``.

    Example::

        multi_losses(model, [prefix_cache(model, t.prefix) for t in tasks], tasks, cands)
    """
    per = [target_losses(model, c, suffixes, t.post, t.target) for c, t in zip(caches, tasks)]
    return sum(per[1:], per[0]) / len(per)


def multi_step(model: Any, caches: Sequence[Any], tasks: Sequence[GCGTask],
               suffix: Sequence[int], *, allowed: torch.Tensor, config: GCGConfig,
               generator: torch.Generator,
               keep: Callable[[list[int]], bool] | None = None) -> tuple[list[int], float]:
    """One multi-prompt GCG step: summed per-position-normalised gradients -> top-k swaps ->
    the kept candidate with the lowest mean loss (the current suffix and ``inf`` when ``keep``
    vetoes every candidate).

    Example::

        suffix, loss = multi_step(model, caches, tasks, suffix, allowed=mask,
                                  config=GCGConfig(), generator=torch.Generator().manual_seed(0))
    """
    grads = [token_gradients(model, c, suffix, t.post, t.target) for c, t in zip(caches, tasks)]
    grad = sum((g / g.norm(dim=1, keepdim=True).clamp_min(1e-12) for g in grads[1:]),
               grads[0] / grads[0].norm(dim=1, keepdim=True).clamp_min(1e-12))
    cands = candidate_swaps(grad, suffix, allowed, top_k=config.top_k, batch=config.batch,
                            generator=generator)
    return best_candidate(cands, suffix, keep,
                          lambda c: multi_losses(model, caches, tasks, c))


def gcg_search_multi(model: Any, tasks: Sequence[GCGTask], suffix: Sequence[int], *,
                     allowed: torch.Tensor, config: GCGConfig | None = None,
                     keep: Callable[[list[int]], bool] | None = None,
                     done: Callable[[int, list[int]], bool] | None = None,
                     progress: Callable[[str], None] | None = None) -> MultiResult:
    """Run multi-prompt GCG from ``suffix`` until ``done`` has held for every prompt (checked
    each step on the prompts not yet hit) or the budget is spent.

    Example::

        res = gcg_search_multi(model, tasks, start, allowed=mask, done=check, progress=print)
    """
    import torch

    config = config or GCGConfig()
    gen = torch.Generator().manual_seed(config.seed)
    t0 = time.perf_counter()
    caches = [prefix_cache(model, t.prefix) for t in tasks]
    cur = list(suffix)
    best = cur
    best_loss = float(multi_losses(model, caches, tasks, torch.tensor([cur]))[0])
    hits: dict[int, list[int]] = {}
    hit_steps: dict[int, int] = {}
    history: list[float] = []
    for step in range(0, config.steps + 1):
        if step:
            cur, loss = multi_step(model, caches, tasks, cur, allowed=allowed, config=config,
                                   generator=gen, keep=keep)
            history.append(loss)
            if loss < best_loss:
                best, best_loss = cur, loss
        for i in range(len(tasks)):
            if done is not None and i not in hits and done(i, cur):
                hits[i], hit_steps[i] = list(cur), step
        elapsed = time.perf_counter() - t0
        if progress is not None and step:
            progress(f"gcg step {step}: mean loss {history[-1]:.3f} (best {best_loss:.3f}) "
                     f"{elapsed:.0f}s hits {sorted(hits)}")
        if len(hits) == len(tasks) or elapsed > config.max_seconds:
            break
    return MultiResult(best, best_loss, hits, hit_steps, len(history),
                       time.perf_counter() - t0, history)
