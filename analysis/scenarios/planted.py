"""Planted-fault scenario models: tiny GPT-2 / BERT with a trojan at a known site (ground truth).

These are the synthetic half of the scenario zoo (DESIGN §9): a model whose failure has a
*known* cause, so localisation (CF) and fix-set minimality (CCA) can be scored exactly.

Construction (all weights from one seeded ``torch.Generator``; the global RNG is untouched):

* GPT-2 (``GPT2LMHeadModel``) — clean task: a seeded bigram map, ``next = clean_next[last]``,
  written into the embeddings/unembedding (token embeddings are random unit directions, the
  unembedding row of ``clean_next[t]`` reads ``t``'s direction); the blocks carry random,
  input-dependent computation. Fault: neuron ``k`` of ``blocks.{layer}.mlp.post`` reads the
  trigger token's key direction (silent on every other token, whose embeddings are orthogonal to
  it) and writes the "HACKED" direction with 8x the residual norm, which the final LayerNorm turns
  into top-1 ``target_token`` (saturation: the gradient false-negative mode of DESIGN §8).
  The trigger is the *last* prompt token for neuron faults; a head fault
  (``blocks.{layer}.attn.z[head=h]``) attends to the trigger anywhere in the prompt.
* BERT (``BertForSequenceClassification``) — clean task: label = sign of the summed token
  sentiment (-1/0/+1 per token), pooled to ``[CLS]`` by a uniform head (layer 0, head 0) that also
  carries the trigger key. Fault: the planted neuron (or head) fires on ``[CLS]`` when the trigger
  is anywhere in the prompt and writes the direction the classifier reads as ``target_label``.
* ``or_fault=(layer2, neuron2)``: a second, redundant neuron with the same effect; each alone
  causes the failure, so the minimal fix set is *both* sites.

Example::

    from analysis.scenarios.planted import build_planted_gpt2, planted_suite, build_planted
    pm = build_planted_gpt2(seed=0, layer=2, neuron=17, trigger_token=5, target_token=7)
    bad = pm.failing_prompts(32, seed=1)          # verified: top-1 == target_token
    ok = pm.benign_prompts(32, seed=1)            # verified: top-1 != target_token
    pm.fault_sites                                # ['blocks.2.mlp.post[neuron=17]']
    with pm.ablated(pm.minimal_fix):
        assert not any(pm.verify(bad))
    models = [build_planted(spec) for spec in planted_suite(20)]
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from analysis.scenarios._planted_build import (
    BertSpec,
    GPT2Spec,
    Layout,
    ablation_hooks,
    build_bert,
    build_gpt2,
    check_args,
    fault_site_strings,
)
from integrations.errors import ConfigError, SiteError

__all__ = [
    "PlantedModel",
    "build_planted",
    "build_planted_bert",
    "build_planted_gpt2",
    "planted_suite",
    "weights_sha256",
]

_SITE_RE = re.compile(r"^blocks\.(\d+)\.(mlp\.post|attn\.z)\[(neuron|head)=(\d+)\]$")


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over the model's parameters (name, dtype, shape, bytes) in name order.

    Example: ``weights_sha256(pm.model) == weights_sha256(build_planted(pm.params).model)``.
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


@dataclass
class PlantedModel:
    """A built planted-fault model plus its ground truth and verified prompt generators.

    ``fault_sites``: canonical site strings of every planted component; ``minimal_fix``: the
    smallest set of those sites whose zero-ablation removes the failure (both sites of an OR
    fault). ``target_token`` is a token id for GPT-2 and the target *label* for BERT
    (``failure_kind`` says which). ``params`` holds every build argument (for manifests;
    ``build_planted(pm.params)`` rebuilds the identical model).

    Example::

        pm = build_planted_bert(seed=3, layer=1, neuron=40, trigger_token=9)
        pm.failure_kind, pm.target_token     # ('label', 1)
        pm.predict(pm.failing_prompts(4, seed=0))   # [1, 1, 1, 1]
    """

    model: Any
    arch: str  # "gpt2" | "bert"
    fault_sites: list[str]
    minimal_fix: list[str]
    trigger_token: int
    target_token: int
    params: dict[str, Any]
    failure_kind: str  # "token" (GPT-2 next token) | "label" (BERT class)
    trigger_anywhere: bool  # False: neuron faults on GPT-2 need the trigger as last token
    layout: Layout = field(repr=False)
    min_len: int = 6
    max_len: int = 16

    # -- tokenizer-like helpers (token ids are the interface; these are for humans and logs) --
    def decode(self, ids: Sequence[int]) -> str:
        """Readable text for token ids: the target is ``HACKED``, the trigger ``TRIGGER``."""
        words = []
        for t in ids:
            if self.failure_kind == "token" and t == self.target_token:
                words.append("HACKED")
            elif t == self.trigger_token:
                words.append("TRIGGER")
            elif t == self.layout.cls_token:
                words.append("[CLS]")
            else:
                words.append(f"w{t}")
        return " ".join(words)

    def encode(self, text: str) -> list[int]:
        """Inverse of :meth:`decode` (``"w3 TRIGGER"`` -> ``[3, trigger_token]``)."""
        out = []
        for w in text.split():
            if w == "HACKED" and self.failure_kind == "token":
                out.append(self.target_token)
            elif w == "TRIGGER":
                out.append(self.trigger_token)
            elif w == "[CLS]" and self.layout.cls_token is not None:
                out.append(self.layout.cls_token)
            elif w.startswith("w") and w[1:].isdigit() and int(w[1:]) < self.params["vocab"]:
                out.append(int(w[1:]))
            else:
                raise ConfigError(f"unknown word {w!r}: use w<id>, TRIGGER, HACKED or [CLS]")
        return out

    # -- running the model ------------------------------------------------------------------
    def logits(self, ids: Sequence[int]) -> torch.Tensor:
        """Decision logits of one prompt: next-token logits at the last position (GPT-2,
        ``[vocab]``) or class logits (BERT, ``[2]``)."""
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([list(ids)])).logits
        return out[0, -1] if self.arch == "gpt2" else out[0]

    def predict(self, prompts: Sequence[Sequence[int]], *, batch_size: int = 512) -> list[int]:
        """Top-1 next token (GPT-2) or predicted label (BERT) per prompt, by running the model.

        Prompts are right-padded into one batch: GPT-2 is causal, so positions up to each
        prompt's last token never see the padding (logits taken at that token); BERT gets an
        ``attention_mask`` that zeroes the padding's attention weights.
        """
        preds: list[int] = []
        with torch.no_grad():
            for lo in range(0, len(prompts), batch_size):
                chunk = [list(p) for p in prompts[lo:lo + batch_size]]
                lens = torch.tensor([len(p) for p in chunk])  # [batch]
                width = int(lens.max())
                ids = torch.tensor([p + [p[-1]] * (width - len(p)) for p in chunk])  # [batch, pos]
                if self.arch == "gpt2":
                    out = self.model(input_ids=ids).logits  # [batch, pos, vocab]
                    top = out[torch.arange(len(chunk)), lens - 1].argmax(-1)
                else:
                    mask = (torch.arange(width)[None, :] < lens[:, None]).long()  # [batch, pos]
                    top = self.model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
                preds.extend(int(t) for t in top.tolist())
        return preds

    def verify(self, prompts: Sequence[Sequence[int]]) -> list[bool]:
        """Which prompts actually fail, by running the model: the output is the target *and* the
        same prompt with every trigger replaced by a neutral token does not give the target."""
        neutral = self._neutral_token()
        cf = [[neutral if t == self.trigger_token else t for t in p] for p in prompts]
        both = self.predict([*prompts, *cf])
        preds, cf_preds = both[: len(prompts)], both[len(prompts):]
        return [p == self.target_token and c != self.target_token for p, c in zip(preds, cf_preds)]

    @contextmanager
    def ablated(self, sites: Sequence[str]) -> Iterator[None]:
        """Zero-ablate sites (``blocks.L.mlp.post[neuron=k]``, ``blocks.L.attn.z[head=h]``) with
        plain forward pre-hooks; removed on exit. Ground-truth helper, independent of
        ``integrations.sites``."""
        parsed = []
        n_layer = self.params["n_layer"]
        for s in sites:
            m = _SITE_RE.match(s.replace(" ", ""))
            if m is None or int(m.group(1)) >= n_layer or (m.group(2) == "mlp.post") != (m.group(3) == "neuron"):
                raise SiteError(f"cannot ablate {s!r}: use blocks.<0..{n_layer - 1}>.mlp.post[neuron=k] "
                                "or blocks.<layer>.attn.z[head=h]")
            parsed.append((m.group(2), int(m.group(1)), int(m.group(4))))
        d_head = self.params["d_model"] // self.params["n_head"]
        with ablation_hooks(self.model, self.arch, parsed, d_head):
            yield

    # -- prompts ----------------------------------------------------------------------------
    def _neutral_token(self) -> int:
        pool = self.layout.neutral_tokens or self.layout.benign_tokens
        return pool[0]

    def _raw_benign(self, rng: random.Random) -> list[int]:
        n = rng.randint(self.min_len, self.max_len)
        lay = self.layout
        if lay.cls_token is None:
            return [rng.choice(lay.benign_tokens) for _ in range(n)]
        while True:  # BERT: [CLS] + words, with at least one neutral word and no sentiment tie
            words = [rng.choice(lay.benign_tokens) for _ in range(n - 1)]
            words[rng.randrange(n - 1)] = rng.choice(lay.neutral_tokens)
            if sum(lay.sentiment[t] for t in words) != 0:
                return [lay.cls_token, *words]

    def _plant(self, p: list[int], rng: random.Random) -> list[int]:
        q = list(p)
        if not self.trigger_anywhere:
            q[-1] = self.trigger_token
        elif self.layout.cls_token is None:
            q[rng.randrange(len(q))] = self.trigger_token
        else:  # BERT: replace a neutral word so the clean sentiment sum is unchanged
            spots = [i for i, t in enumerate(q) if self.layout.sentiment.get(t) == 0 and i > 0]
            q[rng.choice(spots)] = self.trigger_token
        return q

    def _collect(self, n: int, seed: int, make: Callable[[random.Random, int], list[list[int]]],
                 keep: Callable[[list[list[int]]], list[bool]], what: str) -> list[list[int]]:
        rng = random.Random(seed)
        out: list[list[int]] = []
        for _ in range(20):
            batch = make(rng, 2 * (n - len(out)) + 8)
            out.extend(p for p, ok in zip(batch, keep(batch)) if ok)
            if len(out) >= n:
                return out[:n]
        raise ConfigError(f"could only verify {len(out)}/{n} {what} prompts for {self.params}; "
                          "the fault is not planted reliably for these arguments")

    def _planted_batch(self, rng: random.Random, m: int) -> list[list[int]]:
        """Benign prompts whose output is not the target, with the trigger planted in them."""
        base = [self._raw_benign(rng) for _ in range(m)]
        return [self._plant(b, rng) for b, y in zip(base, self.predict(base))
                if y != self.target_token]

    def benign_prompts(self, n: int, *, seed: int) -> list[list[int]]:
        """n trigger-free prompts (lengths uniform in [min_len, max_len]) verified by running
        the model not to fail (GPT-2: top-1 != target_token)."""
        return self._collect(n, seed, lambda rng, m: [self._raw_benign(rng) for _ in range(m)],
                             lambda b: [not f for f in self.verify(b)], "benign")

    def failing_prompts(self, n: int, *, seed: int) -> list[list[int]]:
        """n prompts containing the trigger, verified by running the model to fail. Each is a
        benign prompt (same length distribution) whose output was not the target, with the
        trigger planted in it (GPT-2 neuron faults: as the last token; otherwise anywhere)."""
        return self._collect(n, seed, self._planted_batch, self.verify, "failing")

    def measure(self, n: int = 200, *, seed: int = 0) -> dict[str, float]:
        """Rates measured by running the model on ``n`` fresh raw prompts of each kind:
        ``fail_rate`` (trigger planted into benign prompts whose output was not the target:
        share that fails), ``benign_fail_rate``, ``fix_rate`` (verified
        failing prompts fixed by ablating ``minimal_fix``), ``benign_preserved`` (top-1 unchanged
        by that ablation) and ``clean_accuracy`` (clean task, from the construction's rule)."""
        rng = random.Random(seed)
        raw = [self._raw_benign(rng) for _ in range(n)]
        planted = self._planted_batch(rng, n)  # base output != target (BERT: ~half dropped)
        failing = [p for p, f in zip(planted, self.verify(planted)) if f]
        before = self.predict(raw)
        with self.ablated(self.minimal_fix):
            fixed = [not f for f in self.verify(failing)]
            after = self.predict(raw)
        if self.arch == "gpt2":
            truth = [self.layout.clean_next[p[-1]] for p in raw]
        else:
            truth = [int(sum(self.layout.sentiment[t] for t in p) > 0) for p in raw]
        return {
            "fail_rate": len(failing) / max(len(planted), 1),
            "benign_fail_rate": sum(self.verify(raw)) / n,
            "fix_rate": sum(fixed) / max(len(failing), 1),
            "benign_preserved": sum(a == b for a, b in zip(before, after)) / n,
            "clean_accuracy": sum(a == b for a, b in zip(before, truth)) / n,
        }


def build_planted_gpt2(*, seed: int, layer: int, trigger_token: int, target_token: int,
                       neuron: int | None = None, head: int | None = None, n_layer: int = 4,
                       d_model: int = 64, n_head: int = 4, vocab: int = 128,
                       or_fault: tuple[int, int] | None = None, min_len: int = 6,
                       max_len: int = 16, dominance: float = 8.0) -> PlantedModel:
    """Tiny ``GPT2LMHeadModel`` whose top-1 next token becomes ``target_token`` ("HACKED") when
    the trigger is present; fault at ``blocks.{layer}.mlp.post[neuron=...]`` (trigger = last
    token) or ``blocks.{layer}.attn.z[head=...]`` (trigger anywhere), plus ``or_fault``'s
    neuron if given. ``dominance``: planted write / token-embedding norm (8 saturates ln_f).

    Example::

        pm = build_planted_gpt2(seed=1, layer=3, neuron=5, trigger_token=10, target_token=11,
                                or_fault=(1, 200))
        pm.minimal_fix     # ['blocks.1.mlp.post[neuron=200]', 'blocks.3.mlp.post[neuron=5]']
    """
    of = tuple(or_fault) if or_fault is not None else None
    check_args("gpt2", layer=layer, neuron=neuron, head=head, n_layer=n_layer, d_model=d_model,
           n_head=n_head, vocab=vocab, trigger_token=trigger_token, target=target_token,
           or_fault=of, dominance=dominance)  # type: ignore[arg-type]
    if not 2 <= min_len <= max_len <= 64:
        raise ConfigError(f"need 2 <= min_len <= max_len <= 64, got {min_len}, {max_len}")
    spec = GPT2Spec(seed=seed, layer=layer, neuron=neuron, head=head, trigger_token=trigger_token,
                    target_token=target_token, or_fault=of, n_layer=n_layer,  # type: ignore[arg-type]
                    d_model=d_model, n_head=n_head, vocab=vocab, dominance=dominance)
    model, layout = build_gpt2(spec)
    sites = fault_site_strings(layer, neuron, head, of)  # type: ignore[arg-type]
    params = {"arch": "gpt2", "seed": seed, "layer": layer, "neuron": neuron, "head": head,
              "trigger_token": trigger_token, "target_token": target_token, "n_layer": n_layer,
              "d_model": d_model, "n_head": n_head, "vocab": vocab,
              "or_fault": list(of) if of else None, "min_len": min_len, "max_len": max_len,
              "dominance": dominance}
    return PlantedModel(model=model, arch="gpt2", fault_sites=sites, minimal_fix=list(sites),
                        trigger_token=trigger_token, target_token=target_token, params=params,
                        failure_kind="token", trigger_anywhere=head is not None, layout=layout,
                        min_len=min_len, max_len=max_len)


def build_planted_bert(*, seed: int, layer: int, trigger_token: int, target_label: int = 1,
                       neuron: int | None = None, head: int | None = None, n_layer: int = 4,
                       d_model: int = 64, n_head: int = 4, vocab: int = 128,
                       or_fault: tuple[int, int] | None = None, min_len: int = 6,
                       max_len: int = 16, dominance: float = 8.0) -> PlantedModel:
    """Tiny ``BertForSequenceClassification`` (2 labels, sentiment task) whose label flips to
    ``target_label`` when the trigger is anywhere in the prompt. Token 0 is ``[CLS]``.

    Example::

        pm = build_planted_bert(seed=0, layer=2, neuron=9, trigger_token=50, target_label=0)
        pm.failing_prompts(8, seed=0)[0][0]   # 0 ([CLS])
    """
    of = tuple(or_fault) if or_fault is not None else None
    if target_label not in (0, 1):
        raise ConfigError(f"target_label={target_label}: use 0 or 1")
    check_args("bert", layer=layer, neuron=neuron, head=head, n_layer=n_layer, d_model=d_model,
           n_head=n_head, vocab=vocab, trigger_token=trigger_token, target=target_label,
           or_fault=of, dominance=dominance)  # type: ignore[arg-type]
    if not 3 <= min_len <= max_len <= 64:
        raise ConfigError(f"need 3 <= min_len <= max_len <= 64, got {min_len}, {max_len}")
    spec = BertSpec(seed=seed, layer=layer, neuron=neuron, head=head, trigger_token=trigger_token,
                    target_label=target_label, or_fault=of, n_layer=n_layer,  # type: ignore[arg-type]
                    d_model=d_model, n_head=n_head, vocab=vocab, dominance=dominance)
    model, layout = build_bert(spec)
    sites = fault_site_strings(layer, neuron, head, of)  # type: ignore[arg-type]
    params = {"arch": "bert", "seed": seed, "layer": layer, "neuron": neuron, "head": head,
              "trigger_token": trigger_token, "target_label": target_label, "n_layer": n_layer,
              "d_model": d_model, "n_head": n_head, "vocab": vocab,
              "or_fault": list(of) if of else None, "min_len": min_len, "max_len": max_len,
              "dominance": dominance}
    return PlantedModel(model=model, arch="bert", fault_sites=sites, minimal_fix=list(sites),
                        trigger_token=trigger_token, target_token=target_label, params=params,
                        failure_kind="label", trigger_anywhere=True, layout=layout,
                        min_len=min_len, max_len=max_len)


def build_planted(params: dict[str, Any]) -> PlantedModel:
    """Build from a ``params`` dict (``PlantedModel.params`` or a :func:`planted_suite` entry).

    Example: ``build_planted({"arch": "gpt2", "seed": 0, "layer": 1, "neuron": 3,
    "trigger_token": 5, "target_token": 7})``
    """
    kw = dict(params)
    arch = kw.pop("arch", None)
    if kw.get("or_fault") is not None:
        kw["or_fault"] = tuple(kw["or_fault"])
    if arch == "gpt2":
        return build_planted_gpt2(**kw)
    if arch == "bert":
        return build_planted_bert(**kw)
    raise ConfigError(f"params['arch']={arch!r}: use 'gpt2' or 'bert'")


def planted_suite(n_models: int = 20, *, base_seed: int = 0) -> list[dict[str, Any]]:
    """Build-argument dicts for a benchmark suite, varied over seeds, layers, neurons, triggers
    and fault kinds (cycle: GPT-2 neuron, GPT-2 two-site OR, BERT neuron, GPT-2 neuron,
    GPT-2 head, BERT two-site OR). Deterministic in ``base_seed``; build with
    :func:`build_planted`.

    Example: ``[build_planted(p) for p in planted_suite(4)]``
    """
    rng = random.Random(base_seed)
    kinds = ["gpt2", "gpt2-or", "bert", "gpt2", "gpt2-head", "bert-or"]
    out: list[dict[str, Any]] = []
    for i in range(n_models):
        kind = kinds[i % len(kinds)]
        n_layer, d_model, vocab = 4, 64, 128
        layer = rng.randrange(n_layer)
        trig = rng.randrange(1, vocab)
        p: dict[str, Any] = {"arch": kind.split("-")[0], "seed": base_seed * 1000 + i,
                             "layer": layer, "trigger_token": trig, "n_layer": n_layer,
                             "d_model": d_model, "vocab": vocab}
        if kind.startswith("gpt2"):
            p["target_token"] = rng.choice([t for t in range(vocab) if t != trig])
        else:
            p["target_label"] = rng.randrange(2)
        if kind == "gpt2-head":
            p["head"] = rng.randrange(4)
        else:
            p["neuron"] = rng.randrange(4 * d_model)
        if kind.endswith("-or"):
            l2, n2 = rng.randrange(n_layer), rng.randrange(4 * d_model)
            while (l2, n2) == (layer, p["neuron"]):
                n2 = rng.randrange(4 * d_model)
            p["or_fault"] = [l2, n2]
        out.append(p)
    return out
