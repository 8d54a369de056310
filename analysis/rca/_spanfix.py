"""Span neutralisation: a fix built from the input spans that cause the failure (DESIGN §14
steps 1 + 4), for failures a few tokens cause wherever they appear — a classifier bypassed by a
suffix.

The attributed spans (:func:`~analysis.rca.attribute_input`, verified by replay) label tokens:
span tokens of failing incidents are positives, every other token (the rest of the failing
prompts, contrast and benign prompts) negatives. At one site (a residual stream position
vector), a :class:`~analysis.interventions.LinearGate` is fitted to recognise span tokens, and
where it fires the token's vector is replaced by the mean ordinary token (``project`` onto the
whole space, ``to="mean"``). Candidates — each site alone, and all sites together — are compared **cross-fitted** with folds by group
(default: the span's text, so one suffix never sits in both folds): flips (the failure metric
of the classifier falls to <= 0) on the other fold's failing prompts, and on its benign prompts
the accuracy change (labels given) and the class-distribution KL, under a budget.

Example::

    res = derive_span_fix(model, failing=F, spans=S, contrast=C, benign=B, labels=y_benign,
                          failing_label=lambda inc: wrong[inc.id])
    res.interventions, res.chosen
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from analysis.interventions import Intervention, LinearGate, Subspace, applied
from integrations.errors import AnalysisError
from integrations.incident import Incident

from ._directions import Candidate, DirectionFix
from ._probes import LinearProbe
from ._twins import prompt_ids

__all__ = ["classify", "derive_span_fix", "span_neutraliser"]

Spans = Sequence[tuple[int, int]]


@torch.no_grad()
def classify(model: Any, prompts: Sequence[Sequence[int]], *, interventions: Sequence[Any] = ()
             ) -> torch.Tensor:
    """Class probabilities ``[n, labels]`` of each prompt at batch 1, with ``interventions``
    installed (``analysis.interventions.applied``) when given."""
    rows = []
    with applied(model, list(interventions)):
        for ids in prompts:
            x = torch.tensor([list(ids)])
            rows.append(F.softmax(model(input_ids=x, attention_mask=torch.ones_like(x))
                                  .logits.float()[0], -1))
    return torch.stack(rows)


@torch.no_grad()
def _tokens(model: Any, site: str, prompts: Sequence[Sequence[int]]) -> list[np.ndarray]:
    from integrations.sites import attach, resolve_sites

    out: list[np.ndarray] = []
    bound = resolve_sites(model, [site])
    for ids in prompts:
        x = torch.tensor([list(ids)])
        with attach(model, bound, lambda b, v: out.append(v[0].float().numpy().copy())):
            model(input_ids=x, attention_mask=torch.ones_like(x))
    return out


def span_neutraliser(site: str, span_tokens: np.ndarray, other_tokens: np.ndarray
                     ) -> list[Intervention]:
    """The gated mean replacement at ``site`` fitted on span vs other token vectors."""
    probe = LinearProbe.fit(np.concatenate([span_tokens, other_tokens]),
                            np.r_[np.ones(len(span_tokens)), np.zeros(len(other_tokens))], c=1.0)
    w, b = probe.raw_direction()
    d = other_tokens.shape[1]
    mean = torch.tensor(other_tokens.mean(0), dtype=torch.float32)
    sub = Subspace(basis=torch.eye(d), to="mean", mean=mean)
    return [Intervention(site, "project", direction=sub,
                         gate=LinearGate(weight=torch.tensor(w, dtype=torch.float32), bias=b))]


def _mask(n: int, spans: Spans) -> np.ndarray:
    m = np.zeros(n, dtype=bool)
    for a, b in spans:
        m[a:b] = True
    return m


def _fit(site_tokens: dict[str, dict[str, list[np.ndarray]]], spans: Sequence[Spans],
         idx: dict[str, Any], sites: Sequence[str],
         contrast_spans: Sequence[Spans] | None = None) -> list[Intervention]:
    ivs: list[Intervention] = []
    for site in sites:
        toks = site_tokens[site]
        span = [x[_mask(len(x), spans[i])] for i, x in enumerate(toks["failing"])
                if i in idx["failing"]]
        other = [x[~_mask(len(x), spans[i])] for i, x in enumerate(toks["failing"])
                 if i in idx["failing"]]
        other += [x[~_mask(len(x), contrast_spans[i] if contrast_spans else ())]
                  for i, x in enumerate(toks["contrast"]) if i in idx["contrast"]]
        other += [x for i, x in enumerate(toks["benign"]) if i in idx["benign"]]
        ivs += span_neutraliser(site, np.concatenate(span), np.concatenate(other))
    return ivs


def _measure(model: Any, toks: dict[str, dict[str, list[np.ndarray]]], spans: Sequence[Spans],
             folds: list[dict[str, set[int]]], option: list[str], *,
             prompts: dict[str, list[list[int]]], failing: Sequence[Incident],
             labels: Sequence[int], failing_label: Callable[[Incident], int],
             contrast_spans: Sequence[Spans] | None, max_accuracy_drop: float,
             budget_kl: float, say: Callable[[str], None]) -> Candidate:
    """One candidate (a set of sites) cross-fitted: fit on each fold, measure on the other
    (flips of failing prompts; accuracy drop and class KL on benign ones)."""
    name = "+".join(option)
    say(f"span fix: candidate {name} (cross-fitted)")
    flips = n = 0
    acc_drop, kls = [], []
    for fit, ev in ((0, 1), (1, 0)):
        ivs = _fit(toks, spans, folds[fit], option, contrast_spans)
        fi = sorted(folds[ev]["failing"])
        probs = classify(model, [prompts["failing"][i] for i in fi], interventions=ivs)
        flips += sum(int(probs[j].argmax()) != failing_label(failing[i])
                     for j, i in enumerate(fi))
        n += len(fi)
        bi = sorted(folds[ev]["benign"])
        p0 = classify(model, [prompts["benign"][i] for i in bi])
        p1 = classify(model, [prompts["benign"][i] for i in bi], interventions=ivs)
        y = torch.tensor([labels[i] for i in bi])
        acc_drop.append(float((p0.argmax(-1) == y).float().mean()
                              - (p1.argmax(-1) == y).float().mean()))
        kls.append(float((p0 * (p0.clamp_min(1e-12).log() - p1.clamp_min(1e-12).log()))
                         .sum(-1).mean()))
    drop, kl = sum(acc_drop) / 2, sum(kls) / 2
    return Candidate(label=f"span neutraliser at {name}", flip_rate=flips / max(1, n),
                     mean_kl=kl, top1_agreement=1.0 - max(0.0, drop), gate_fires_on_benign=None,
                     within_budget=drop <= max_accuracy_drop and kl <= budget_kl)


def derive_span_fix(model: Any, *, failing: Sequence[Incident], spans: Sequence[Spans],
                    contrast: Sequence[Incident], benign: Sequence[Incident],
                    labels: Sequence[int], failing_label: Callable[[Incident], int],
                    sites: Sequence[str] | None = None, groups: Sequence[str] | None = None,
                    contrast_spans: Sequence[Spans] | None = None,
                    max_accuracy_drop: float = 0.01, budget_kl: float = 0.1,
                    progress: Callable[[str], None] | None = None) -> DirectionFix:
    """Search the site of a span neutraliser under the budget (module doc); ``labels``: the
    benign incidents' true classes, ``failing_label``: the wrong class a failing one gets;
    ``contrast_spans``: the inserted spans of the contrast prompts (e.g. where each differs
    from its twin), left out of the negatives — the gate then recognises the inserted text,
    not only the words that happened to fail, and carries over to unseen words."""
    if contrast_spans is not None and len(contrast_spans) != len(contrast):
        raise AnalysisError("contrast_spans needs one span list per contrast incident")
    if len(failing) < 4 or len(benign) < 4 or len(spans) != len(failing):
        raise AnalysisError("a span fix needs >= 4 failing incidents with their spans and >= 4 "
                            "benign incidents")
    say = progress or (lambda _m: None)
    sites = list(sites) if sites else [f"blocks.{i}.resid_post" for i in range(4)]
    prompts = {k: [prompt_ids(i) for i in v] for k, v in
               (("failing", failing), ("contrast", contrast), ("benign", benign))}
    keys = list(groups) if groups else [str(s) for s in spans]
    uniq = sorted(set(keys))
    fold_of = {g: i % 2 for i, g in enumerate(uniq)}
    folds = [{"failing": {i for i, g in enumerate(keys) if fold_of[g] == f},
              "contrast": set(range(f, len(contrast), 2)),
              "benign": set(range(f, len(benign), 2))} for f in (0, 1)]
    toks = {site: {k: _tokens(model, site, v) for k, v in prompts.items()} for site in sites}
    options = [[site] for site in sites] + ([list(sites)] if len(sites) > 1 else [])
    cands = [(_measure(model, toks, spans, folds, option, prompts=prompts, failing=failing,
                       labels=labels, failing_label=failing_label,
                       contrast_spans=contrast_spans, max_accuracy_drop=max_accuracy_drop,
                       budget_kl=budget_kl, say=say), option) for option in options]
    ok = [c for c in cands if c[0].within_budget]
    if not ok:
        return DirectionFix([], None, [c for c, _ in cands], [], budget_kl, 1 - max_accuracy_drop,
                            notes=["no site stayed within the accuracy / KL budget"])
    chosen, option = max(ok, key=lambda c: (c[0].flip_rate, -len(c[1])))
    every = {"failing": set(range(len(failing))), "contrast": set(range(len(contrast))),
             "benign": set(range(len(benign)))}
    return DirectionFix(_fit(toks, spans, every, option, contrast_spans), chosen,
                        [c for c, _ in cands], [], budget_kl, 1 - max_accuracy_drop,
                        notes=["top1_agreement here is 1 - the accuracy drop on benign"])
