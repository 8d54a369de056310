"""Cheap candidate ranking: attribution patching (one forward + one backward), blended with CF.

For an intervention that moves a site's value from ``a`` (what the model computed) to ``a'`` (the
donor: baseline mean, zero, a patch donor's value, ...), the first-order estimate of the metric's
change is ``grad(metric, a) . (a' - a)`` (Nanda 2023; Syed et al. 2023). One replay with
gradients enabled gives it for every candidate at once: the value of each *base* site is
replaced by ``a + delta`` with ``delta`` a zero leaf, so ``d metric / d delta`` is the total
gradient through every downstream path. Candidates are ranked by the estimate, most negative
(most failure-reducing) first.

This is only a prior: when a component saturates the final LayerNorm (a planted neuron writing
8x the residual norm) the gradient of the normalised logits with respect to it is ~0 and the
true cause can be ranked *last* — the group testing that follows does not depend on the ranking
being right (:mod:`._group_testing`).

``guided_by`` (a CF report with ``ranked_sites``) blends in CF's anomaly ranks: the final order
is by the mean of the attribution rank and the CF rank of the candidate's site (its base, or the
nearest enclosing site CF scored; unscored candidates get CF's worst rank).

Example::

    est = attribution_scores(session, bound_failure, interventions)   # [N] estimated deltas
    order = blend_ranking(est, sites, guided_by=cf_report)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from analysis.interventions import DonorCache, Intervention, localize
from analysis.replay import ReplaySession
from integrations.errors import AnalysisError
from integrations.sites import BoundSite, resolve_sites

from ._failure import BoundFailure

__all__ = ["attribution_scores", "blend_ranking", "cf_rank_of"]

#: (base site, step) -> a tensor of that site's full shape at that step
_PerStep = dict[tuple[str, int], torch.Tensor]


def attribution_scores(session: ReplaySession, failure: BoundFailure,
                       interventions: Sequence[Intervention]) -> tuple[list[float], float]:
    """Estimated metric change of each intervention (alone), and the replay's metric.

    One forward (up to the decision step) + one backward, under the session's deterministic
    environment. The model's parameter ``.grad`` are never touched (``torch.autograd.grad``).
    """
    bounds = [resolve_sites(session.model, [iv.site]) for iv in interventions]
    base_ivs, base_bound = _per_base(session.model, interventions, bounds)
    donors = DonorCache.of(session)
    donors.prepare([[iv for iv in base_ivs.values() if iv.kind not in ("zero", "scale")]])
    grads, actual, metric = _gradients(session, failure, base_bound)
    # Per (base, step): grad . (donor - actual), full tensor.
    prods: _PerStep = {}
    for (base, step), g in grads.items():
        a = actual[(base, step)]
        prods[(base, step)] = torch.zeros_like(a) if g is None else (g.detach() * (
            _target(base_ivs[base], base_bound[base], step, a, donors) - a)).float()
    lengths = [c.seq_len for c in session.plan.steps]
    return [_score(iv, bs, prods, lengths) for iv, bs in zip(interventions, bounds)], metric


def _per_base(model: torch.nn.Module, interventions: Sequence[Intervention],
              bounds: list[list[BoundSite]]
              ) -> tuple[dict[str, Intervention], dict[str, BoundSite]]:
    """One intervention of each candidate's kind and donor per base site (its full tensor),
    and the base sites resolved: the replay hooks each base site once."""
    base_ivs: dict[str, Intervention] = {}
    base_bound: dict[str, BoundSite] = {}
    for iv, bs in zip(interventions, bounds):
        for b in bs:
            if b.base in base_bound:
                continue
            base_bound[b.base] = resolve_sites(model, [b.base])[0]
            if iv.kind in ("zero", "scale"):
                base_ivs[b.base] = iv
            else:
                base_ivs[b.base] = Intervention(b.base, iv.kind, donor=iv.donor,
                                                value=iv.value, seed=iv.seed)
    return base_ivs, base_bound


def _gradients(session: ReplaySession, failure: BoundFailure, base_bound: dict[str, BoundSite]
               ) -> tuple[dict[tuple[str, int], torch.Tensor | None], _PerStep, float]:
    """d metric / d delta for every (base site, step), the values the replay computed there,
    and the metric: the value of each base site is replaced by ``a + delta``, ``delta`` a zero
    leaf, in one replay (an edit) up to the decision step; the backward runs in its
    environment."""
    leaves: _PerStep = {}
    actual: _PerStep = {}
    base_of = {id(b): base for base, b in base_bound.items()}

    def edit(site: BoundSite, v: torch.Tensor, *, step: int) -> torch.Tensor:
        key = (base_of[id(site)], step)
        d = torch.zeros_like(v, requires_grad=True)
        leaves[key] = d
        actual[key] = v.detach()
        return v + d

    last = failure.step if failure.step >= 0 else session.steps + failure.step
    with session.environment(), torch.enable_grad():
        run = session.run_edited(edit, sites=list(base_bound.values()), last_step=last,
                                 grad=True, evaluations=1)
        lg = run.logits[last]
        if lg is None:
            raise AnalysisError("the model produced no logits; attribution needs a metric")
        metric = failure.tensor(lg).max()
        keys = list(leaves)
        grads = torch.autograd.grad(metric, [leaves[k] for k in keys], allow_unused=True)
    return dict(zip(keys, grads)), actual, float(metric.detach())


def _target(iv: Intervention, b: BoundSite, step: int, a: torch.Tensor,
            donors: DonorCache) -> torch.Tensor:
    """The value ``iv`` would give the full site tensor ``a`` (at ``step``)."""
    if iv.kind == "zero":
        return torch.zeros_like(a)
    if iv.kind == "scale":
        assert iv.factor is not None
        return a * iv.factor
    vals, _ = donors(iv, b, step, tuple(a.shape))
    return vals.to(a.dtype)


def _score(iv: Intervention, bounds: list[BoundSite], prods: _PerStep,
           lengths: list[int]) -> float:
    """The estimate of one candidate: the products summed over its selected entries and steps
    (positions are absolute, localised to each forward call as the plan does)."""
    n_steps = len(lengths)
    offsets = [sum(lengths[:k]) for k in range(n_steps)]
    steps = None if iv.steps is None else {s if s >= 0 else n_steps + s for s in iv.steps}
    total = 0.0
    for b in bounds:
        for (base, step), p in prods.items():
            if base != b.base or (steps is not None and step not in steps):
                continue
            rest = list(b.index[1:])
            if p.dim() >= 3 and rest:
                length = int(p.shape[1])
                loc = localize(rest[0], offsets[step] + max(0, lengths[step] - length), length)
                if loc is None:
                    continue
                rest[0] = loc
            total += float(p[(slice(None), *rest)].sum())
    return total


def cf_rank_of(site: str, cf_ranks: dict[str, int]) -> int | None:
    """CF rank of a candidate: its own site, its base, or the nearest enclosing scored site."""
    if site in cf_ranks:
        return cf_ranks[site]
    base = site.split("[", 1)[0]
    parts = base.split(".")
    while parts:
        name = ".".join(parts)
        if name in cf_ranks:
            return cf_ranks[name]
        parts.pop()
    return None


def blend_ranking(estimates: Sequence[float], sites: Sequence[str], *,
                  guided_by: Any = None, cf_weight: float = 0.5) -> list[int]:
    """Candidate indices, best first: by estimated change (most negative first), blended with
    the CF report's ranks when ``guided_by`` is given (module doc)."""
    n = len(estimates)
    by_attr = sorted(range(n), key=lambda i: (estimates[i], i))
    if guided_by is None:
        return by_attr
    ranked = getattr(guided_by, "ranked_sites", None)
    if ranked is None:
        raise AnalysisError(f"guided_by= takes a CF report with ranked_sites, got "
                            f"{type(guided_by).__name__}")
    cf_ranks = {str(s): r for r, (s, _) in enumerate(ranked)}
    worst = len(cf_ranks)
    attr_rank = {i: r for r, i in enumerate(by_attr)}
    w = min(max(float(cf_weight), 0.0), 1.0)
    scale = max(n - 1, 1) / max(worst, 1)

    def key(i: int) -> tuple[float, int]:
        cr = cf_rank_of(sites[i], cf_ranks)
        cfr = (worst if cr is None else cr) * scale
        return ((1 - w) * attr_rank[i] + w * cfr, attr_rank[i])

    return sorted(range(n), key=key)
