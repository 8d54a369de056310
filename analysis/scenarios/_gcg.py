"""Greedy Coordinate Gradient (GCG) adversarial-suffix search for a causal language model.

What real jailbreak searches do (Zou et al., 2023): the prompt is ``prefix + suffix + post`` and
the answer should start with ``target``. Each step takes the gradient of the target's
cross-entropy with respect to the one-hot suffix tokens, keeps per suffix position the ``top_k``
tokens whose gradient promises the largest decrease, samples ``batch`` candidates that each swap
one position for one of those tokens, scores every candidate with one batched forward pass and
moves to the best. ``keep`` can veto candidates (e.g. suffixes that would not re-tokenize to the
same ids); ``done`` says when to stop early (e.g. the greedy answer is already classified toxic).
Everything is seeded (``GCGConfig.seed``) and runs on CPU; ``progress`` gets one line per step.

Example::

    from analysis.scenarios._gcg import GCGConfig, allowed_tokens, gcg_search
    res = gcg_search(model, prefix_ids, suffix_ids, post_ids, target_ids,
                     allowed=allowed_tokens(tok), config=GCGConfig(steps=40))
    res.suffix_ids, res.loss, res.success, res.steps
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["GCGConfig", "GCGResult", "allowed_tokens", "best_candidate", "candidate_swaps",
           "gcg_search", "gcg_step", "prefix_cache", "target_losses", "token_gradients"]


@dataclass(frozen=True)
class GCGConfig:
    """Search budget and sampling: ``steps`` at most, ``max_seconds`` wall clock at most,
    ``top_k`` tokens per position, ``batch`` candidates per step, ``seed`` for the sampler.

    Example::

        GCGConfig(steps=50, top_k=64, batch=32, max_seconds=180.0)
    """

    steps: int = 50
    top_k: int = 64
    batch: int = 32
    seed: int = 0
    max_seconds: float = float("inf")


@dataclass
class GCGResult:
    """Outcome of one search: the best suffix found, its target loss, whether ``done`` accepted
    it, the steps and seconds used, and the loss after every step.

    Example::

        res.success, res.loss, res.history[:3]
    """

    suffix_ids: list[int]
    loss: float
    success: bool
    steps: int
    seconds: float
    history: list[float] = field(default_factory=list)


def allowed_tokens(tokenizer: Any) -> torch.Tensor:
    """Mask ``[vocab]`` of tokens a suffix may use: printable ASCII, not special, not empty.

    Example::

        mask = allowed_tokens(tok); int(mask.sum())
    """
    import torch

    special = set(getattr(tokenizer, "all_special_ids", []))
    mask = torch.zeros(len(tokenizer), dtype=torch.bool)  # [vocab]
    for i in range(len(tokenizer)):
        s = tokenizer.decode([i])
        mask[i] = i not in special and bool(s.strip()) and s.isascii() and s.isprintable()
    return mask


def prefix_cache(model: Any, prefix: Sequence[int]) -> Any:
    """The key/value cache of ``prefix`` at batch 1 (computed once per search: the prefix never
    changes, so candidates only run the suffix, post and target positions).

    Example::

        cache = prefix_cache(model, prefix_ids)
    """
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([list(prefix)]), use_cache=True).past_key_values


def _cached(cache: Any, batch: int) -> Any:
    import copy

    c = copy.deepcopy(cache)
    if batch > 1:
        c.batch_repeat_interleave(batch)
    return c


def target_losses(model: Any, cache: Any, suffixes: torch.Tensor, post: Sequence[int],
                  target: Sequence[int]) -> torch.Tensor:
    """Mean cross-entropy of ``target`` after each candidate ``suffixes[b]`` -> ``[batch]``
    (``cache``: :func:`prefix_cache` of the prompt's prefix).

    Example::

        target_losses(model, cache, torch.tensor([suffix]), post, target)   # tensor([2.31])
    """
    import torch
    import torch.nn.functional as F

    b, n = suffixes.shape[0], len(target)
    rest = torch.tensor([*post, *target], dtype=torch.long).expand(b, -1)  # [batch, n_post+n]
    ids = torch.cat([suffixes, rest], dim=1)  # [batch, pos]
    with torch.no_grad():
        logits = model(input_ids=ids, cache=_cached(cache, b),
                       logits_to_keep=n + 1).logits[:, :-1]  # [batch, n, vocab]
    tgt = torch.tensor(list(target), dtype=torch.long).expand(b, -1)  # [batch, n]
    ce = F.cross_entropy(logits.float().transpose(1, 2), tgt, reduction="none")  # [batch, n]
    return ce.mean(dim=1)


def token_gradients(model: Any, cache: Any, suffix: Sequence[int],
                    post: Sequence[int], target: Sequence[int]) -> torch.Tensor:
    """Gradient of the target loss w.r.t. the one-hot suffix tokens -> ``[len(suffix), vocab]``.

    Example::

        g = token_gradients(model, cache, suffix, post, target); (-g).topk(8, dim=1)
    """
    import torch
    import torch.nn.functional as F

    emb = model.get_input_embeddings().weight  # [vocab, d]
    one_hot = torch.zeros(len(suffix), emb.shape[0], dtype=emb.dtype)  # [n_suf, vocab]
    one_hot[torch.arange(len(suffix)), torch.tensor(list(suffix))] = 1.0
    one_hot.requires_grad_(True)
    embed = model.get_input_embeddings()
    with torch.no_grad():
        rest = embed(torch.tensor([[*post, *target]]))  # [1, n_post+n, d]
    x = torch.cat([(one_hot @ emb).unsqueeze(0), rest], dim=1)  # [1, pos, d]
    logits = model(inputs_embeds=x, cache=_cached(cache, 1),
                   logits_to_keep=len(target) + 1).logits[0, :-1]  # [n, vocab]
    loss = F.cross_entropy(logits.float(), torch.tensor(list(target)))
    (grad,) = torch.autograd.grad(loss, one_hot)
    return grad


def candidate_swaps(grad: torch.Tensor, suffix: Sequence[int], allowed: torch.Tensor, *,
                    top_k: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """``batch`` candidate suffixes ``[batch, n_suf]``, each one position swapped for one of that
    position's ``top_k`` most promising allowed tokens (most negative gradient).

    Example::

        cands = candidate_swaps(g, suffix, mask, top_k=64, batch=32, generator=gen)
    """
    import torch

    scores = (-grad).masked_fill(~allowed, float("-inf"))  # [n_suf, vocab]
    top = scores.topk(top_k, dim=1).indices  # [n_suf, top_k]
    n = len(suffix)
    pos = torch.randint(0, n, (batch,), generator=generator)  # [batch]
    pick = torch.randint(0, top_k, (batch,), generator=generator)  # [batch]
    cands = torch.tensor(list(suffix), dtype=torch.long).repeat(batch, 1)  # [batch, n_suf]
    cands[torch.arange(batch), pos] = top[pos, pick]
    return cands


def gcg_step(model: Any, cache: Any, suffix: Sequence[int], post: Sequence[int],
             target: Sequence[int], *, allowed: torch.Tensor, config: GCGConfig,
             generator: torch.Generator,
             keep: Callable[[list[int]], bool] | None = None) -> tuple[list[int], float]:
    """One GCG step: gradient -> top-k swaps -> batched scoring; the best kept candidate and its
    loss (the current suffix and ``inf`` when ``keep`` vetoes every candidate).

    Example::

        suffix, loss = gcg_step(model, cache, suffix, post, target, allowed=mask,
                                config=GCGConfig(), generator=torch.Generator().manual_seed(0))
    """
    grad = token_gradients(model, cache, suffix, post, target)
    cands = candidate_swaps(grad, suffix, allowed, top_k=config.top_k, batch=config.batch,
                            generator=generator)
    return best_candidate(cands, suffix, keep,
                          lambda c: target_losses(model, cache, c, post, target))


def best_candidate(cands: torch.Tensor, suffix: Sequence[int],
                   keep: Callable[[list[int]], bool] | None,
                   score: Callable[[torch.Tensor], torch.Tensor]) -> tuple[list[int], float]:
    """The distinct candidate that ``keep`` accepts with the lowest ``score`` and that score
    (``suffix`` and ``inf`` when every candidate is vetoed).

    Example::

        best_candidate(cands, suffix, None, lambda c: target_losses(model, cache, c, post, tgt))
    """
    import torch

    cands = torch.unique(cands, dim=0)
    if keep is not None:
        ok = [i for i, c in enumerate(cands.tolist()) if keep(c)]
        if not ok:
            return list(suffix), float("inf")
        cands = cands[ok]
    losses = score(cands)  # [n_cands]
    best = int(losses.argmin())
    return [int(t) for t in cands[best]], float(losses[best])


def gcg_search(model: Any, prefix: Sequence[int], suffix: Sequence[int], post: Sequence[int],
               target: Sequence[int], *, allowed: torch.Tensor, config: GCGConfig = GCGConfig(),
               keep: Callable[[list[int]], bool] | None = None,
               done: Callable[[list[int]], bool] | None = None,
               progress: Callable[[str], None] | None = None) -> GCGResult:
    """Run GCG from ``suffix`` until ``done(suffix)`` holds or the budget is spent; returns the
    suffix that succeeded, else the lowest-loss suffix seen.

    Example::

        res = gcg_search(model, prefix, suffix, post, target, allowed=mask,
                         done=lambda s: is_toxic(s), progress=print)
    """
    import torch

    gen = torch.Generator().manual_seed(config.seed)
    t0 = time.perf_counter()
    cur = list(suffix)
    cache = prefix_cache(model, prefix)
    best, best_loss = cur, float(target_losses(model, cache, torch.tensor([cur]), post, target)[0])
    history: list[float] = []
    if done is not None and done(cur):
        return GCGResult(cur, best_loss, True, 0, time.perf_counter() - t0, history)
    for step in range(1, config.steps + 1):
        cur, loss = gcg_step(model, cache, cur, post, target, allowed=allowed, config=config,
                             generator=gen, keep=keep)
        history.append(loss)
        if loss < best_loss:
            best, best_loss = cur, loss
        ok = done is not None and done(cur)
        elapsed = time.perf_counter() - t0
        if progress is not None:
            progress(f"gcg step {step}: loss {loss:.3f} (best {best_loss:.3f}) "
                     f"{elapsed:.0f}s{' SUCCESS' if ok else ''}")
        if ok:
            return GCGResult(cur, loss, True, step, elapsed, history)
        if elapsed > config.max_seconds:
            break
    return GCGResult(best, best_loss, False, len(history), time.perf_counter() - t0, history)
