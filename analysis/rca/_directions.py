"""Directions: a fix from contrasts, gated to the requests it is for (DESIGN §14 step 4).

From labelled incidents — failing ones (with their benign twins where known), contrast ones
(the same kind of input, no failure) and benign ones — at the *last prompt position* (one
prefill forward each):

* a **gate** per candidate layer ``G``: a linear probe separating the prompts that carry the
  failing kind of input (failing + contrast) from benign ones, its threshold in the middle of
  the margin between them (:class:`~analysis.interventions.PromptGate`: decided once per
  request at the end of the prompt);
* a **direction** per layer ``L``: the difference of means failing − twins (else − benign);
* a **fix** = remove each layer's direction (``project``, rank 1) at every layer from ``L0``
  on, from the last prompt position on, only on requests the gate fires for.

Candidates ``(G, L0)`` are compared **cross-fitted** (fit on one half of the incidents, measured
on the other, both ways): flip rate on the held-out half's failing prompts, and side effects on
its benign prompts, with the side-effect budget (mean KL over the continuation, top-1
agreement) as a *constraint*; the best candidate is refitted on everything. Plain steering
(ActAdd/CAA: subtract the direction at one layer on every position, ungated) and ungated
directional ablation are measured the same way as baselines. Search runs batched on the live
model; the chosen fix is verified by replay on the incident itself.

Example::

    res = derive_fix(model, failing=F, twins=T, contrast=C, benign=B, tokenizer=tok,
                     failing_text=lambda inc, text: "HACKED" in text)
    res.fix.interventions, res.chosen, res.candidates[0]
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from analysis.interventions import Intervention, PromptGate, Subspace, applied
from integrations.errors import AnalysisError
from integrations.incident import Incident

from ._heldout import flip_rate, generate, side_effects
from ._probes import LinearProbe
from ._twins import prompt_ids

__all__ = ["Candidate", "DirectionFix", "derive_fix", "gated_removal", "last_position_features"]

FailingText = Callable[[Incident, str], bool]


@torch.no_grad()
def last_position_features(model: Any, prompts: Sequence[Sequence[int]], layers: Sequence[int],
                           ) -> dict[int, np.ndarray]:
    """``{layer: [n, d]}`` residual stream (``blocks.L.resid_post``) at each prompt's last
    position, one batch-1 prefill forward per prompt."""
    from integrations.sites import attach, resolve_sites

    bound = resolve_sites(model, [f"blocks.{L}.resid_post" for L in layers])
    out: dict[int, list[np.ndarray]] = {L: [] for L in layers}
    layer_of = {b.site: int(b.site.split(".")[1]) for b in bound}
    for ids in prompts:
        seen: dict[int, np.ndarray] = {}

        def grab(b: Any, v: torch.Tensor, seen: dict[int, np.ndarray] = seen) -> None:
            seen[layer_of[b.site]] = v[0, -1].float().numpy().copy()

        with attach(model, bound, grab):
            model(input_ids=torch.tensor([list(ids)]))
        for L in layers:
            out[L].append(seen[L])
    return {L: np.stack(v) for L, v in out.items()}


def gated_removal(*, gate_layer: int, start: int, n_layers: int, feats: _Feats
                  ) -> list[Intervention]:
    """The fix of one candidate (module doc), fitted on ``feats``."""
    pos = np.concatenate([feats.failing[gate_layer], feats.contrast[gate_layer]])
    neg = feats.benign[gate_layer]
    probe = LinearProbe.fit(np.concatenate([pos, neg]),
                            np.r_[np.ones(len(pos)), np.zeros(len(neg))])
    w, b = probe.raw_direction()
    s_pos, s_neg = pos @ w + b, neg @ w + b
    thr = (s_neg.max() + s_pos.min()) / 2 if s_pos.min() > s_neg.max() else s_neg.max()
    gate = PromptGate(site=f"blocks.{gate_layer}.resid_post", weight=torch.tensor(w),
                      bias=float(b - thr))
    ivs = []
    for layer in range(start, n_layers):
        d = feats.failing[layer].mean(0) - feats.reference[layer].mean(0)
        ivs.append(Intervention(f"blocks.{layer}.resid_post", "project", gate=gate,
                                direction=Subspace.from_directions(torch.tensor(d))))
    return ivs


@dataclass
class _Feats:
    """Last-position features of one fold: failing, reference (twins or benign), contrast,
    benign, keyed by layer."""

    failing: dict[int, np.ndarray]
    reference: dict[int, np.ndarray]
    contrast: dict[int, np.ndarray]
    benign: dict[int, np.ndarray]

    def subset(self, idx: dict[str, np.ndarray]) -> _Feats:
        return _Feats(**{k: {L: v[idx[k]] for L, v in getattr(self, k).items()}
                         for k in ("failing", "reference", "contrast", "benign")})


@dataclass
class Candidate:
    """One candidate fix's cross-fitted measurements (``label`` says which)."""

    label: str
    flip_rate: float
    mean_kl: float
    top1_agreement: float
    gate_fires_on_benign: float | None
    within_budget: bool
    outputs: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__, outputs=self.outputs[:6])


@dataclass
class DirectionFix:
    """What :func:`derive_fix` found: the chosen fix (refitted on everything), every candidate
    and baseline with its cross-fitted numbers, and the budget."""

    interventions: list[Intervention]
    chosen: Candidate | None
    candidates: list[Candidate]
    baselines: list[Candidate]
    budget_kl: float
    min_top1: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": None if self.chosen is None else self.chosen.to_dict(),
                "candidates": [c.to_dict() for c in self.candidates],
                "baselines": [c.to_dict() for c in self.baselines],
                "budget_kl": self.budget_kl, "min_top1": self.min_top1,
                "interventions": [iv.to_dict() for iv in self.interventions],
                "notes": list(self.notes)}


def _features_once(model: Any, groups: Sequence[Sequence[Sequence[int]]],
                   layers: Sequence[int]) -> list[dict[int, np.ndarray]]:
    """:func:`last_position_features` of each group, each distinct prompt run once (a twin is
    usually also a benign incident)."""
    index = {tuple(p): 0 for g in groups for p in g}
    for i, key in enumerate(index):
        index[key] = i
    feats = last_position_features(model, [list(k) for k in index], layers)
    return [{L: feats[L][[index[tuple(p)] for p in g]] for L in layers} for g in groups]


class _Data:
    """The incidents of a derivation, their prompts and features, and the two folds."""

    def __init__(self, model: Any, *, failing: Sequence[Incident],
                 twins: Sequence[Sequence[int] | None] | None, contrast: Sequence[Incident],
                 benign: Sequence[Incident], layers: Sequence[int], seed: int) -> None:
        self.failing, self.contrast, self.benign = list(failing), list(contrast), list(benign)
        self.prompts = {k: [prompt_ids(i) for i in getattr(self, k)]
                        for k in ("failing", "contrast", "benign")}
        ref = [list(t) for t in (twins or []) if t is not None]
        if twins is None or len(ref) != len(self.failing):
            ref = self.prompts["benign"]
        groups = (self.prompts["failing"], ref, self.prompts["contrast"], self.prompts["benign"])
        self.feats = _Feats(*_features_once(model, groups, layers))
        rng = random.Random(seed)
        self.folds: list[dict[str, np.ndarray]] = [{}, {}]
        for k, n in (("failing", len(self.failing)), ("contrast", len(self.contrast)),
                     ("benign", len(self.benign))):
            order = list(range(n))
            rng.shuffle(order)
            self.folds[0][k] = np.array(sorted(order[: n // 2]), dtype=int)
            self.folds[1][k] = np.array(sorted(order[n // 2:]), dtype=int)
        paired = twins is not None and len(ref) == len(self.failing)
        for f in self.folds:   # a twin stays with its failing prompt
            f["reference"] = f["failing"] if paired else f["benign"]
        self._conts: dict[tuple[int, int], list[list[int]]] = {}

    def benign_continuations(self, model: Any, fold: int, max_new_tokens: int
                             ) -> list[list[int]]:
        """The unfixed model's greedy continuations of one fold's benign prompts, generated
        once (every candidate is measured against the same ones)."""
        key = (fold, max_new_tokens)
        if key not in self._conts:
            self._conts[key] = generate(model, [self.prompts["benign"][i]
                                                for i in self.folds[fold]["benign"]],
                                        max_new_tokens=max_new_tokens)
        return self._conts[key]


class _Installed:
    """Interventions as something with ``apply(model)`` (what the held-out checks install)."""

    def __init__(self, interventions: Sequence[Intervention]) -> None:
        self.interventions = list(interventions)

    def apply(self, model: Any) -> Any:
        return applied(model, self.interventions)


def _gate_rate(ivs: Sequence[Intervention], benign: dict[int, np.ndarray]) -> float | None:
    gate = next((iv.gate for iv in ivs if isinstance(iv.gate, PromptGate)), None)
    if gate is None:
        return None
    layer = int(gate.site.split(".")[1])
    x = torch.tensor(benign[layer], dtype=torch.float32)
    return float(gate.fires(x).float().mean())


def _measure(model: Any, tok: Any, data: _Data, build: Callable[[_Feats], list[Intervention]],
             failing_text: FailingText, *, label: str, budget_kl: float, min_top1: float,
             max_new_tokens: int) -> Candidate:
    """Cross-fitted: fit on each fold, measure on the other; pooled over both."""
    flipped = n = tokens = 0
    kl_sum = agree = 0.0
    rates: list[float] = []
    outputs: list[str] = []
    for fit, ev in ((0, 1), (1, 0)):
        fix = _Installed(build(data.feats.subset(data.folds[fit])))
        idx = data.folds[ev]["failing"]
        def fails(text: str, j: int, idx: np.ndarray = idx) -> bool:
            return failing_text(data.failing[int(idx[j])], text)

        fr = flip_rate(model, tok, [data.prompts["failing"][i] for i in idx], fix=fix,
                       max_new_tokens=max_new_tokens, failing=fails)
        se = side_effects(model, [data.prompts["benign"][i] for i in data.folds[ev]["benign"]],
                          fix=fix, max_new_tokens=max_new_tokens,
                          continuations=data.benign_continuations(model, ev, max_new_tokens))
        flipped, n, outputs = flipped + fr.flipped, n + fr.n, outputs + fr.outputs
        kl_sum += se.mean_kl * se.n_tokens
        agree += se.top1_agreement * se.n_tokens
        tokens += se.n_tokens
        rate = _gate_rate(fix.interventions, data.feats.subset(data.folds[ev]).benign)
        if rate is not None:
            rates.append(rate)
    mean_kl, top1 = kl_sum / max(1, tokens), agree / max(1, tokens)
    return Candidate(label=label, flip_rate=flipped / max(1, n), mean_kl=mean_kl,
                     top1_agreement=top1,
                     gate_fires_on_benign=sum(rates) / len(rates) if rates else None,
                     within_budget=mean_kl <= budget_kl and top1 >= min_top1, outputs=outputs)


def _baselines(n_layers: int) -> dict[str, Callable[[_Feats], list[Intervention]]]:
    """Plain steering (ActAdd/CAA) at the middle layer and ungated directional ablation of the
    middle layer's direction at every layer (DESIGN §14's known baselines)."""
    mid = n_layers // 2

    def direction(f: _Feats) -> torch.Tensor:
        return torch.tensor(f.failing[mid].mean(0) - f.reference[mid].mean(0))

    def steer(f: _Feats) -> list[Intervention]:
        return [Intervention(f"blocks.{mid}.resid_post", "steer", direction=-direction(f))]

    def ablate(f: _Feats) -> list[Intervention]:
        sub = Subspace.from_directions(direction(f))
        return [Intervention(f"blocks.{layer}.resid_post", "project", direction=sub)
                for layer in range(n_layers)]

    return {f"steer -d (ActAdd/CAA) at layer {mid}": steer,
            f"ablate d(layer {mid}) at every layer, ungated": ablate}


def derive_fix(model: Any, *, failing: Sequence[Incident], contrast: Sequence[Incident],
               benign: Sequence[Incident], tokenizer: Any, failing_text: FailingText,
               twins: Sequence[Sequence[int] | None] | None = None,
               gate_layers: Sequence[int] | None = None, starts: Sequence[int] | None = None,
               budget_kl: float = 0.1, min_top1: float = 0.99, max_new_tokens: int = 16,
               seed: int = 0, progress: Callable[[str], None] | None = None) -> DirectionFix:
    """Search gated-removal fixes under the side-effect budget (module doc)."""
    from integrations.sites import resolve_sites

    if len(failing) < 4 or len(benign) < 4:
        raise AnalysisError("a direction fix needs at least 4 failing and 4 benign incidents "
                            f"(got {len(failing)} and {len(benign)})")
    say = progress or (lambda _msg: None)
    n_layers = len(resolve_sites(model, ["blocks.*.resid_post"]))
    gates = list(gate_layers) if gate_layers else [round(n_layers / 3), round(n_layers * 0.45)]
    say(f"directions: last-position features of {len(failing)} failing, {len(contrast)} "
        f"contrast, {len(benign)} benign incidents")
    data = _Data(model, failing=failing, twins=twins, contrast=contrast, benign=benign,
                 layers=range(n_layers), seed=seed)
    def measure(build: Callable[[_Feats], list[Intervention]], label: str) -> Candidate:
        return _measure(model, tokenizer, data, build, failing_text, label=label,
                        budget_kl=budget_kl, min_top1=min_top1, max_new_tokens=max_new_tokens)

    cands: list[tuple[Candidate, int, int]] = []
    for g in gates:
        for start in (list(starts) if starts else [g + 2, g + 6]):
            if not g <= start < n_layers:
                continue
            say(f"directions: candidate gate {g}, remove from layer {start} (cross-fitted)")

            def build(f: _Feats, g: int = g, start: int = start) -> list[Intervention]:
                return gated_removal(gate_layer=g, start=start, n_layers=n_layers, feats=f)

            label = f"gate at layer {g}, remove d_L at layers {start}..{n_layers - 1}"
            cands.append((measure(build, label), g, start))
    say("directions: baselines (plain steering, ungated ablation)")
    base = [measure(fn, name) for name, fn in _baselines(n_layers).items()]
    ok = [c for c in cands if c[0].within_budget]
    if not ok:
        return DirectionFix([], None, [c for c, *_ in cands], base, budget_kl, min_top1,
                            notes=["no candidate stayed within the side-effect budget"])
    chosen, g, start = max(ok, key=lambda c: (c[0].flip_rate, c[2]))
    final = gated_removal(gate_layer=g, start=start, n_layers=n_layers, feats=data.feats)
    return DirectionFix(final, chosen, [c for c, *_ in cands], base, budget_kl, min_top1)
