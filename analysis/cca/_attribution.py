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
from typing import TYPE_CHECKING, Any

import torch

from integrations.errors import AnalysisError

from ._failure import BoundFailure

if TYPE_CHECKING:
    from analysis.interventions import Intervention
    from analysis.replay import ReplaySession

__all__ = ["attribution_scores", "blend_ranking", "cf_rank_of"]


def _last_logits(output: Any) -> torch.Tensor | None:
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        return None
    return logits[:, -1, :] if logits.dim() == 3 else logits


def attribution_scores(session: ReplaySession, failure: BoundFailure,
                       interventions: Sequence[Intervention]) -> tuple[list[float], float]:
    """Estimated metric change of each intervention (alone), and the replay's metric.

    One forward (up to the decision step) + one backward, under the session's deterministic
    environment. The model's parameter ``.grad`` are never touched (``torch.autograd.grad``).
    """
    from analysis.interventions import Intervention, localize
    from integrations.sites import BoundSite, attach, resolve_sites

    model = session.model
    plan = session.plan
    bounds = [resolve_sites(model, [iv.site]) for iv in interventions]
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
    session.donors.prepare([[iv for iv in base_ivs.values() if iv.kind not in ("zero",
                                                                                "scale")]])
    leaves: dict[tuple[str, int], torch.Tensor] = {}
    actual: dict[tuple[str, int], torch.Tensor] = {}
    step_now = [0]
    by_module: dict[int, str] = {id(b): base for base, b in base_bound.items()}

    def fn(b: BoundSite, v: torch.Tensor) -> torch.Tensor:
        key = (by_module[id(b)], step_now[0])
        d = torch.zeros_like(v, requires_grad=True)
        leaves[key] = d
        actual[key] = v.detach()
        return v + d

    logits: list[torch.Tensor | None] = []
    last = failure.step if failure.step >= 0 else len(plan.steps) + failure.step
    with session._environment(), torch.enable_grad():
        cache = plan.new_cache(model)
        with attach(model, list(base_bound.values()), fn):
            for call in plan.steps[:last + 1]:
                step_now[0] = call.step
                kw = plan.kwargs(call, repeat=1, cache=cache)
                dev = next(iter(model.parameters())).device
                kw = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
                logits.append(_last_logits(model(**kw)))
        lg = logits[last]
        if lg is None:
            raise AnalysisError("the model produced no logits; attribution needs a metric")
        metric = failure.tensor(lg).max()
        keys = list(leaves)
        grads = torch.autograd.grad(metric, [leaves[k] for k in keys], allow_unused=True)
    session._count(steps=last + 1, rows=last + 1, sets=1)
    # Per (base, step): grad . (donor - actual), full tensor.
    prods: dict[tuple[str, int], torch.Tensor] = {}
    for k, g in zip(keys, grads):
        base, step = k
        a = actual[k]
        if g is None:
            prods[k] = torch.zeros_like(a)
            continue
        iv = base_ivs[base]
        if iv.kind == "zero":
            target = torch.zeros_like(a)
        elif iv.kind == "scale":
            assert iv.factor is not None
            target = a * iv.factor
        else:
            vals, _ = session.donors(iv, base_bound[base], step, tuple(a.shape))
            target = vals.to(a.dtype)
        prods[k] = (g.detach() * (target - a)).float()
    n_steps = len(plan.steps)
    lengths = [c.seq_len for c in plan.steps]
    offsets = [sum(lengths[:k]) for k in range(len(lengths))]
    scores: list[float] = []
    for iv, bs in zip(interventions, bounds):
        steps = None if iv.steps is None else {s if s >= 0 else n_steps + s for s in iv.steps}
        total = 0.0
        for b in bs:
            for (base, step), p in prods.items():
                if base != b.base or (steps is not None and step not in steps):
                    continue
                rest = list(b.index[1:])
                if p.dim() >= 3 and rest:
                    length = int(p.shape[1])
                    loc = localize(rest[0], offsets[step] + max(0, lengths[step] - length),
                                   length)
                    if loc is None:
                        continue
                    rest[0] = loc
                total += float(p[(slice(None), *rest)].sum())
        scores.append(total)
    return scores, float(metric.detach())


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
