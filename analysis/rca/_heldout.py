"""Checking a fix on traffic it never saw: flip rate on failing prompts and side effects on
benign ones, with the fix installed on the live model (``fix.apply(model)``) — DESIGN §14.

* **flip rate**: greedy generation with the fix; a prompt flips when the failure predicate no
  longer holds for its output. Reported with a Wilson 95 % interval.
* **side effects**: for each benign prompt, the unfixed model's own greedy continuation is
  teacher-forced through the model with and without the fix; the mean KL(unfixed ‖ fixed) of
  the next-token distributions over the whole continuation (every position that predicts a
  continuation token, and the one after it), and top-1 agreement over the same positions;
  task accuracy with and without the fix where a scorer is given.

Prompts run in left-padded batches (the same batches with and without the fix, so batching
changes both sides alike). Numbers are measured, never estimated.

Example::

    fr = flip_rate(model, tok, failing_ids, fix=fix, failing=lambda t: "HACKED" in t)
    se = side_effects(model, benign_ids, fix=fix)
    fr.rate, fr.ci, se.mean_kl, se.top1_agreement
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["FlipRate", "LiveSideEffects", "flip_rate", "generate", "side_effects", "wilson"]


def wilson(k: int, n: int) -> tuple[float, float]:
    """Wilson 95 % interval of ``k`` successes in ``n`` trials (``(0, 1)`` when ``n`` is 0):
    :func:`analysis.cca._stats.wilson_ci`."""
    from analysis.cca._stats import wilson_ci

    return (0.0, 1.0) if n == 0 else wilson_ci(k, n)


def _batch(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)   # [batch, pos]
    mask = torch.zeros((len(seqs), width), dtype=torch.long)      # [batch, pos]
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


def _pad_id(model: Any) -> int:
    gc = getattr(model, "generation_config", None)
    pad = getattr(gc, "pad_token_id", None) if gc is not None else None
    if pad is None:
        eos = getattr(gc, "eos_token_id", 0) if gc is not None else 0
        pad = eos[0] if isinstance(eos, list) else eos
    return int(pad or 0)


def _installed(model: Any, fix: Any) -> contextlib.AbstractContextManager[Any]:
    return fix.apply(model) if fix is not None else contextlib.nullcontext()


@torch.no_grad()
def generate(model: Any, prompts: Sequence[Sequence[int]], *, fix: Any = None,
             max_new_tokens: int = 16, batch_size: int = 16) -> list[list[int]]:
    """Greedy continuations (new token ids, cut at EOS) of ``prompts``, with ``fix`` installed
    when given."""
    pad = _pad_id(model)
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos_set = set(eos if isinstance(eos, list) else [eos]) - {None}
    out: list[list[int]] = []
    with _installed(model, fix):
        for i in range(0, len(prompts), batch_size):
            ids, mask = _batch(prompts[i:i + batch_size], pad)
            gen = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad,
                                 do_sample=False, max_new_tokens=max_new_tokens)
            for row in gen[:, ids.shape[1]:].tolist():
                cut = next((j for j, t in enumerate(row) if t in eos_set), len(row))
                out.append(row[:cut])
    return out


@dataclass
class FlipRate:
    """Flips of failing prompts under a fix (module doc)."""

    flipped: int
    n: int
    ci: tuple[float, float]
    outputs: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.flipped / self.n if self.n else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"flipped": self.flipped, "n": self.n, "rate": self.rate, "ci": list(self.ci),
                "outputs": self.outputs[:20]}


def flip_rate(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], *, fix: Any,
              failing: Callable[[str, int], bool], max_new_tokens: int = 16) -> FlipRate:
    """How many of ``prompts`` no longer fail with ``fix`` (``failing(text, index)``)."""
    outs = generate(model, prompts, fix=fix, max_new_tokens=max_new_tokens)
    texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
    k = sum(not failing(t, i) for i, t in enumerate(texts))
    return FlipRate(flipped=k, n=len(prompts), ci=wilson(k, len(prompts)), outputs=texts)


@dataclass
class LiveSideEffects:
    """Side effects of a fix on benign prompts (module doc)."""

    mean_kl: float
    top1_agreement: float
    n_prompts: int
    n_tokens: int
    max_prompt_kl: float
    accuracy_before: float | None = None
    accuracy_after: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@torch.no_grad()
def side_effects(model: Any, prompts: Sequence[Sequence[int]], *, fix: Any,
                 max_new_tokens: int = 16, batch_size: int = 16, tokenizer: Any = None,
                 correct: Callable[[str, int], bool] | None = None,
                 continuations: Sequence[Sequence[int]] | None = None) -> LiveSideEffects:
    """KL and top-1 agreement over each prompt's own continuation; accuracy with ``correct``
    (``correct(text, index)``, needs ``tokenizer``) before and after (module doc).
    ``continuations``: the unfixed model's greedy continuations of ``prompts`` when already
    generated (``generate(model, prompts, ...)`` with the same options) — comparing several
    fixes on one benign set generates them once."""
    conts = [list(c) for c in continuations] if continuations is not None else \
        generate(model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    pad = _pad_id(model)
    kls: list[float] = []
    per_prompt: list[float] = []
    agree = 0
    for i in range(0, len(prompts), batch_size):
        chunk = [list(p) + c for p, c in zip(prompts[i:i + batch_size],
                                              conts[i:i + batch_size])]
        ids, mask = _batch(chunk, pad)
        base = model(input_ids=ids, attention_mask=mask).logits.float()  # [batch, pos, vocab]
        with fix.apply(model):
            fixed = model(input_ids=ids, attention_mask=mask).logits.float()
        width = ids.shape[1]
        for b, seq in enumerate(chunk):
            n_prompt = len(prompts[i + b])
            sl = slice(width - len(seq) + n_prompt - 1, width)
            p, q = F.log_softmax(base[b, sl], -1), F.log_softmax(fixed[b, sl], -1)
            kl = (p.exp() * (p - q)).sum(-1)                             # [positions]
            kls.extend(kl.tolist())
            per_prompt.append(float(kl.mean()))
            agree += int((p.argmax(-1) == q.argmax(-1)).sum())
    acc_before = acc_after = None
    if correct is not None and tokenizer is not None:
        fixed_conts = generate(model, prompts, fix=fix, max_new_tokens=max_new_tokens,
                               batch_size=batch_size)
        dec = [tokenizer.decode(c, skip_special_tokens=True) for c in conts]
        dec_fixed = [tokenizer.decode(c, skip_special_tokens=True) for c in fixed_conts]
        acc_before = sum(correct(t, j) for j, t in enumerate(dec)) / len(prompts)
        acc_after = sum(correct(t, j) for j, t in enumerate(dec_fixed)) / len(prompts)
    return LiveSideEffects(mean_kl=sum(kls) / max(1, len(kls)),
                           top1_agreement=agree / max(1, len(kls)), n_prompts=len(prompts),
                           n_tokens=len(kls), max_prompt_kl=max(per_prompt, default=0.0),
                           accuracy_before=acc_before, accuracy_after=acc_after)
