"""Weight construction for the planted-fault models (private; use :mod:`analysis.scenarios.planted`).

Every parameter is written from one seeded :class:`torch.Generator` (the global RNG is never
touched), so a model is a pure function of its build arguments and independent of how Hugging
Face happens to initialise modules.

Example::

    from analysis.scenarios._planted_build import GPT2Spec, build_gpt2
    model, layout = build_gpt2(GPT2Spec(seed=0, layer=2, neuron=17, trigger_token=5,
                                        target_token=7))
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from integrations.errors import ConfigError

if TYPE_CHECKING:
    from torch import Tensor, nn

__all__ = [
    "BertSpec",
    "GPT2Spec",
    "Layout",
    "ablation_hooks",
    "build_bert",
    "build_gpt2",
    "check_args",
    "fault_site_strings",
]

# Scales of the construction (shared by both architectures; see planted.py for the story).
_EMBED_NORM = 8.0  # |token embedding| (residual units)
_POS_NORM = 2.0  # |position embedding|
_TRIGGER_KEY = 0.8  # share of the trigger embedding along the trigger key direction
_READ_GAIN = 4.0  # planted neuron: pre = gain * (<ln(x), key> - threshold)


@dataclass(frozen=True)
class GPT2Spec:
    """Build arguments of a planted GPT-2 (see ``build_planted_gpt2``)."""

    seed: int
    layer: int
    trigger_token: int
    target_token: int
    neuron: int | None = None
    head: int | None = None
    or_fault: tuple[int, int] | None = None
    n_layer: int = 4
    d_model: int = 64
    n_head: int = 4
    vocab: int = 128
    n_positions: int = 64
    dominance: float = 8.0  # planted write / |token embedding| (saturates the final LayerNorm)


@dataclass(frozen=True)
class BertSpec:
    """Build arguments of a planted BERT classifier (see ``build_planted_bert``)."""

    seed: int
    layer: int
    trigger_token: int
    target_label: int = 1
    neuron: int | None = None
    head: int | None = None
    or_fault: tuple[int, int] | None = None
    n_layer: int = 4
    d_model: int = 64
    n_head: int = 4
    vocab: int = 128
    n_positions: int = 64
    dominance: float = 8.0


@dataclass
class Layout:
    """What prompt generation needs to know about a built model's vocabulary."""

    benign_tokens: list[int]  # tokens benign prompts are drawn from
    neutral_tokens: list[int] = field(default_factory=list)  # BERT: sentiment 0
    sentiment: dict[int, int] = field(default_factory=dict)  # BERT: token -> -1/0/+1
    cls_token: int | None = None  # BERT: prepended to every prompt
    clean_next: dict[int, int] = field(default_factory=dict)  # GPT-2: last token -> next token


def _fill_random(model: nn.Module, g: torch.Generator, std: float) -> None:
    """Overwrite every parameter: weights ~ N(0, std), biases 0, LayerNorm gains 1."""
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if "ln" in name.lower().split(".")[-2] or "layernorm" in name.lower():
                p.copy_(torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p))
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _orthonormal(g: torch.Generator, d: int, k: int) -> Tensor:
    """k orthonormal, zero-mean directions in R^d (zero mean: LayerNorm centring keeps them)."""
    a = torch.randn(d, k, generator=g, dtype=torch.float64)  # [d, k]
    a = a - a.mean(0, keepdim=True)
    q, _ = torch.linalg.qr(a)
    return q.T.float()  # [k, d]


def _units_avoiding(g: torch.Generator, n: int, d: int, avoid: Tensor) -> Tensor:
    """n random zero-mean unit vectors orthogonal to the (orthonormal) rows of ``avoid``."""
    x = torch.randn(n, d, generator=g)  # [n, d]
    x = x - x.mean(1, keepdim=True)
    x = x - (x @ avoid.T) @ avoid
    return x / x.norm(dim=1, keepdim=True)


def _keys(layer: int, or_fault: tuple[int, int] | None, main_neuron: int | None) -> list[tuple[int, int]]:
    sites = [(layer, main_neuron)] if main_neuron is not None else []
    if or_fault is not None:
        sites.append(or_fault)
    return sites


def build_gpt2(spec: GPT2Spec) -> tuple[Any, Layout]:
    """Build the planted GPT-2 of ``spec``: clean task = a seeded bigram map, plus the fault."""
    from transformers import GPT2Config, GPT2LMHeadModel

    d, v, hd = spec.d_model, spec.vocab, spec.d_model // spec.n_head
    cfg = GPT2Config(vocab_size=v, n_positions=spec.n_positions, n_embd=d, n_layer=spec.n_layer,
                     n_head=spec.n_head, activation_function="gelu_new", resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
                     bos_token_id=None, eos_token_id=None, pad_token_id=None)
    with torch.random.fork_rng(devices=[]):  # HF init draws from the global RNG: isolate it
        torch.manual_seed(spec.seed)
        model: Any = GPT2LMHeadModel(cfg)
    g = torch.Generator().manual_seed(spec.seed)
    _fill_random(model, g, 0.02)
    key, hack = _orthonormal(g, d, 2)  # trigger key direction, "HACKED" direction
    reserved = torch.stack([key, hack])  # [2, d]
    trig, tgt = spec.trigger_token, spec.target_token
    benign = [t for t in range(v) if t not in (trig, tgt)]
    content = _units_avoiding(g, v, d, reserved)  # [vocab, d]: benign part of each embedding
    perm = torch.randperm(len(benign), generator=g).tolist()
    clean_next = {t: benign[perm[i]] for i, t in enumerate(benign)}
    extra = torch.randint(len(benign), (2,), generator=g).tolist()
    clean_next[trig], clean_next[tgt] = benign[extra[0]], benign[extra[1]]
    tr = model.transformer
    with torch.no_grad():
        wte = content * _EMBED_NORM  # [vocab, d]
        wte[trig] = _EMBED_NORM * (_TRIGGER_KEY * key + math.sqrt(1 - _TRIGGER_KEY**2) * content[trig])
        tr.wte.weight.copy_(wte)
        tr.wpe.weight.copy_(_units_avoiding(g, spec.n_positions, d, reserved) * _POS_NORM)
        # Clean computation noise: random MLP reads with unit-variance pre-activations, so the
        # neurons have realistic, input-dependent activations; attention keeps GPT-2 init scale.
        for blk in tr.h:
            blk.mlp.c_fc.weight.copy_(torch.randn(d, 4 * d, generator=g) / math.sqrt(d))
            blk.mlp.c_fc.bias.fill_(-1.0)
            blk.attn.c_attn.weight[:, : 2 * d].mul_(1.0 / (0.02 * math.sqrt(d)))
        # Unembedding: next token of t is clean_next[t] (reads t's content direction).
        lm = torch.zeros(v, d)  # [vocab, d]
        for t, nxt in clean_next.items():
            lm[nxt] += content[t]
        lm[tgt] = hack
        model.lm_head.weight.copy_(lm * 4.0)
        neurons = _keys(spec.layer, spec.or_fault, spec.neuron)
        first_layer = min((layer for layer, _ in neurons), default=spec.layer)
        for layer, k in neurons:
            mlp = tr.h[layer].mlp
            # A neuron after an earlier planted write also reads the hack direction (LayerNorm
            # shrinks the trigger share once the write dominates): it stays a true OR site.
            read = key if layer == first_layer else (key + hack) / math.sqrt(2.0)
            threshold = 2.0 if layer == first_layer else 1.5
            mlp.c_fc.weight[:, k] = _READ_GAIN * read
            mlp.c_fc.bias[k] = -_READ_GAIN * threshold
            act = _READ_GAIN * (math.sqrt(d) * _TRIGGER_KEY * 0.9 - threshold)  # ~expected
            mlp.c_proj.weight[k, :] = hack * (spec.dominance * _EMBED_NORM / act)
        if spec.head is not None:
            attn, h = tr.h[spec.layer].attn, spec.head
            qs, ks, vs = slice(h * hd, (h + 1) * hd), slice(d + h * hd, d + (h + 1) * hd), slice(
                2 * d + h * hd, 2 * d + (h + 1) * hd)
            w, b = attn.c_attn.weight, attn.c_attn.bias  # Conv1D: [d_in, 3 d]
            w[:, qs] = 0.0
            b[qs] = 0.0
            b[qs.start] = 4.0  # constant query
            w[:, ks] = 0.0
            w[:, ks.start] = key * 4.0  # score ~ <ln(x), key>: attends to the trigger
            w[:, vs] = 0.0
            w[:, vs.start] = key  # value ~ <ln(x), key>
            attn.c_proj.weight[qs, :] = 0.0
            attn.c_proj.weight[h * hd, :] = hack * (spec.dominance * _EMBED_NORM / (math.sqrt(d) * _TRIGGER_KEY * 0.9))
    model.eval()
    return model, Layout(benign_tokens=benign, clean_next=clean_next)


def build_bert(spec: BertSpec) -> tuple[Any, Layout]:
    """Build the planted BERT classifier: clean task = sign of summed token sentiment."""
    from transformers import BertConfig, BertForSequenceClassification

    d, v, hd = spec.d_model, spec.vocab, spec.d_model // spec.n_head
    cfg = BertConfig(vocab_size=v, hidden_size=d, num_hidden_layers=spec.n_layer,
                     num_attention_heads=spec.n_head, intermediate_size=4 * d,
                     max_position_embeddings=spec.n_positions,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
    cfg.num_labels = 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model: Any = BertForSequenceClassification(cfg)
    g = torch.Generator().manual_seed(spec.seed)
    _fill_random(model, g, 0.02)
    key, hack, senti = _orthonormal(g, d, 3)
    reserved = torch.stack([key, hack, senti])  # [3, d]
    cls, trig = 0, spec.trigger_token
    words = [t for t in range(1, v) if t != trig]
    signs = torch.randint(-1, 2, (len(words),), generator=g).tolist()
    sentiment = {t: s for t, s in zip(words, signs)}
    sentiment[cls] = sentiment[trig] = 0
    content = _units_avoiding(g, v, d, reserved)  # [vocab, d]
    emb = model.bert.embeddings
    sign_t = 1.0 if spec.target_label == 1 else -1.0
    with torch.no_grad():
        wte = content * _EMBED_NORM
        for t, s in sentiment.items():
            wte[t] += s * 0.5 * _EMBED_NORM * senti
        wte[trig] = _EMBED_NORM * (_TRIGGER_KEY * key + math.sqrt(1 - _TRIGGER_KEY**2) * content[trig])
        emb.word_embeddings.weight.copy_(wte)
        emb.position_embeddings.weight.copy_(_units_avoiding(g, spec.n_positions, d, reserved) * _POS_NORM)
        emb.token_type_embeddings.weight.zero_()
        # Layer 0, head 0: uniform attention that pools sentiment and the trigger key to [CLS].
        att0 = model.bert.encoder.layer[0].attention
        for lin in (att0.self.query, att0.self.key):
            lin.weight[:hd, :] = 0.0
            lin.bias[:hd] = 0.0
        att0.self.value.weight[:hd, :] = 0.0
        att0.self.value.weight[0, :] = senti
        att0.self.value.weight[1, :] = key
        att0.output.dense.weight[:, :hd] = 0.0
        att0.output.dense.weight[:, 0] = senti * 24.0
        att0.output.dense.weight[:, 1] = key * 16.0
        # Readout: pooled[0] = tanh(<h_cls, senti + sign_t * hack>); label = sign of pooled[0].
        model.bert.pooler.dense.weight[0, :] = (senti + sign_t * hack) * 2.0
        model.bert.pooler.dense.bias[0] = 0.0
        model.classifier.weight.zero_()
        model.classifier.weight[1, 0], model.classifier.weight[0, 0] = 4.0, -4.0
        neurons = _keys(spec.layer, spec.or_fault, spec.neuron)
        first_layer = min((layer for layer, _ in neurons), default=spec.layer)
        for layer, k in neurons:
            blk = model.bert.encoder.layer[layer]
            read = key if layer == first_layer else (key + hack) / math.sqrt(2.0)
            blk.intermediate.dense.weight[k, :] = _READ_GAIN * read
            blk.intermediate.dense.bias[k] = -_READ_GAIN * 0.6
            blk.output.dense.weight[:, k] = hack * (spec.dominance * math.sqrt(d) / (_READ_GAIN * 2.0))
        if spec.head is not None:
            att, h = model.bert.encoder.layer[spec.layer].attention, spec.head
            sl = slice(h * hd, (h + 1) * hd)
            for lin in (att.self.query, att.self.key, att.self.value):
                lin.weight[sl, :] = 0.0
                lin.bias[sl] = 0.0
            att.self.query.bias[sl.start] = 4.0
            att.self.key.weight[sl.start, :] = key * 4.0
            att.self.value.weight[sl.start, :] = key
            att.output.dense.weight[:, sl] = 0.0
            att.output.dense.weight[:, sl.start] = hack * (spec.dominance * math.sqrt(d) / (math.sqrt(d) * _TRIGGER_KEY))
    model.eval()
    neutral = [t for t in words if sentiment[t] == 0]
    return model, Layout(benign_tokens=words, neutral_tokens=neutral, sentiment=sentiment,
                         cls_token=cls)


def _hook_target(model: Any, arch: str, kind: str, layer: int) -> nn.Module:
    if arch == "gpt2":
        blk = model.transformer.h[layer]
        return blk.mlp.c_proj if kind == "mlp.post" else blk.attn.c_proj  # type: ignore[no-any-return]
    blk = model.bert.encoder.layer[layer]
    return blk.output.dense if kind == "mlp.post" else blk.attention.output.dense  # type: ignore[no-any-return]


@contextmanager
def ablation_hooks(model: Any, arch: str, sites: list[tuple[str, int, int]],
                   d_head: int) -> Iterator[None]:
    """Zero-ablate ``(kind, layer, index)`` sites with plain forward pre-hooks on the down/out
    projection inputs (independent of ``integrations.sites``: this is the ground truth)."""
    handles = []
    for kind, layer, idx in sites:
        lo, hi = (idx, idx + 1) if kind == "mlp.post" else (idx * d_head, (idx + 1) * d_head)

        def pre(_m: nn.Module, args: tuple[Tensor, ...], lo: int = lo, hi: int = hi) -> tuple[Tensor, ...]:
            x = args[0].clone()  # [batch, pos, d_mlp] or [batch, pos, n_head * d_head]
            x[..., lo:hi] = 0.0
            return (x, *args[1:])

        handles.append(_hook_target(model, arch, kind, layer).register_forward_pre_hook(pre))
    try:
        yield
    finally:
        for hnd in handles:
            hnd.remove()


def check_args(arch: str, *, layer: int, neuron: int | None, head: int | None, n_layer: int,
           d_model: int, n_head: int, vocab: int, trigger_token: int, target: int,
           or_fault: tuple[int, int] | None, dominance: float) -> None:
    if not 2.0 <= dominance <= 1000.0:
        raise ConfigError(f"dominance={dominance}: use 2..1000 (below 2 one OR site alone may "
                          "not cause the failure)")
    if (neuron is None) == (head is None):
        raise ConfigError("give exactly one of neuron= (MLP neuron fault) or head= (head fault)")
    if not 0 <= layer < n_layer:
        raise ConfigError(f"layer={layer} out of range: use 0..{n_layer - 1}")
    if d_model % n_head or d_model < 16:
        raise ConfigError(f"d_model={d_model} must be >= 16 and divisible by n_head={n_head}")
    if neuron is not None and not 0 <= neuron < 4 * d_model:
        raise ConfigError(f"neuron={neuron} out of range: use 0..{4 * d_model - 1}")
    if head is not None and not 0 <= head < n_head:
        raise ConfigError(f"head={head} out of range: use 0..{n_head - 1}")
    if arch == "bert" and head == 0 and layer == 0:
        raise ConfigError("head 0 of layer 0 is the clean sentiment-pooling head: pick another")
    if not 0 < trigger_token < vocab or (arch == "gpt2" and not 0 <= target < vocab):
        raise ConfigError(f"trigger/target token out of range: use 1..{vocab - 1}")
    if arch == "gpt2" and trigger_token == target:
        raise ConfigError("trigger_token and target_token must differ")
    if or_fault is not None:
        if head is not None:
            raise ConfigError("or_fault is only supported with a neuron fault")
        l2, n2 = or_fault
        if not (0 <= l2 < n_layer and 0 <= n2 < 4 * d_model) or (l2, n2) == (layer, neuron):
            raise ConfigError(f"or_fault={or_fault} must be a different (layer, neuron) in range")


def fault_site_strings(layer: int, neuron: int | None, head: int | None,
           or_fault: tuple[int, int] | None) -> list[str]:
    sites = [f"blocks.{layer}.mlp.post[neuron={neuron}]" if neuron is not None
             else f"blocks.{layer}.attn.z[head={head}]"]
    if or_fault is not None:
        sites.append(f"blocks.{or_fault[0]}.mlp.post[neuron={or_fault[1]}]")
    return sorted(sites, key=lambda s: tuple(int(x) for x in re.findall(r"\d+", s)))
