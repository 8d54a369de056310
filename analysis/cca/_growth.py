"""The fix set on failing variants: which variants fail, the flip rate, growing for the rest.

A fix set is claimed for a failure, not for one input: it is replayed on *variants* of the
incident (:mod:`._variants` makes them) that still fail when replayed clean, and its flip rate
over them is reported. While that rate is below ``early_stop_threshold`` and the set is smaller
than ``max_fix_set_size``, :func:`grow_over_variants` adds what a still-failing variant needs
(the same group testing, on that variant) and then prunes additions whose removal keeps the rate.

Example::

    oracles, tried, dropped_passes = variant_oracles(session, spec, bound, ivs, None, benign,
                                                     None, n_variants=16, seed=0, max_batch=64)
    results = variant_results(oracles, core)
    items, results = grow_over_variants(oracles, order, core, roles, results, fix_set,
                                        threshold=0.9, max_size=8)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from analysis.interventions import Intervention
from analysis.replay import ReplaySession
from integrations.errors import AnalysisError

from ._failure import BoundFailure, Failure, failing
from ._fixset import FixSet, VariantResult
from ._group_testing import progressive_reduce
from ._oracle import SessionOracle, flipped
from ._variants import as_session, prompt_tokens, substitution_variants

__all__ = ["grow_over_variants", "variant_oracles", "variant_results"]


def variant_oracles(session: ReplaySession, spec: Failure, bound: BoundFailure,
                    ivs: list[Intervention], variants: Sequence[Any] | None,
                    benign: list[ReplaySession], tokenizer: Any, *, n_variants: int, seed: int,
                    max_batch: int) -> tuple[list[SessionOracle], int, int]:
    """Oracles of the variants that fail when replayed clean; (oracles, tried, passes of the
    dropped ones). ``variants=None``: ``n_variants`` single-token substitutions."""
    if variants is None:
        pool = prompt_tokens(session)
        for b in benign:
            pool += prompt_tokens(b)
        items: list[Any] = substitution_variants(session, n_variants, seed=seed, pool=pool)
        # a variant's failing token: the incident's (text/recorded predicates re-resolve)
        vspec = spec if spec.kind in ("token", "label", "metric", "text") else \
            Failure.token(int(bound.token_id or 0), step=bound.step)
    else:
        items, vspec = list(variants), spec
        if spec.kind == "recorded":
            vspec = Failure.token(int(bound.token_id or 0))
    out: list[SessionOracle] = []
    dropped = 0
    for i, v in enumerate(items):
        vs = as_session(v, template=session, name=f"variant{i}")
        try:
            vb = vspec.bind(vs, tokenizer=tokenizer, variant=True)
        except AnalysisError:
            continue  # e.g. the text is not in this variant's output: not a failing variant
        o = SessionOracle(vs, vb, ivs, max_batch=max_batch)
        if failing(o.verify([])):
            out.append(o)
        else:
            dropped += o.passes
    return out, len(items), dropped


def variant_results(oracles: list[SessionOracle], items: list[int]) -> list[VariantResult]:
    """The set ``items`` on every variant: clean and fixed metric (batch-1 replays)."""
    res = []
    for o in oracles:
        clean, fixed = o.verify([]), o.verify(items)
        res.append(VariantResult(id=o.session.incident.id, metric_clean=clean,
                                 metric_fixed=fixed, flipped=flipped(fixed)))
    return res


def _rate(results: list[VariantResult]) -> float:
    return sum(r.flipped for r in results) / len(results) if results else 1.0


def grow_over_variants(v_oracles: list[SessionOracle], order: list[int], items: list[int],
                       roles: dict[int, str], results: list[VariantResult], fs: FixSet, *,
                       threshold: float, max_size: int
                       ) -> tuple[list[int], list[VariantResult]]:
    """Add elements still-failing variants need until the flip rate reaches ``threshold`` or
    the set ``max_size``; prune additions that do not help (role ``variants`` in ``roles``)."""
    tried: set[int] = set()
    while _rate(results) < threshold and len(items) < max_size:
        todo = [i for i, r in enumerate(results) if not r.flipped and i not in tried]
        if not todo:
            break
        vi = todo[0]
        tried.add(vi)
        vo = v_oracles[vi]
        pool = [i for i in order if i not in set(items)]
        red = progressive_reduce(vo, pool, base=items, max_size=max_size - len(items))
        fs.trace.extend(f"variant {vo.session.incident.id}: {t}" for t in red.trace)
        if red.items is None:
            fs.notes.append(f"variant {vo.session.incident.id} not fixable within the size "
                            f"bound: {red.reason}")
            continue
        for e in red.items:
            roles[e] = "variants"
        items = items + red.items
        results = variant_results(v_oracles, items)
    # prune growth elements whose removal keeps the flip rate
    for e in [x for x in items if roles.get(x) == "variants"]:
        rest = [x for x in items if x != e]
        rs = variant_results(v_oracles, rest)
        if _rate(rs) >= _rate(results):
            items, results = rest, rs
            roles.pop(e)
    if any(r == "variants" for r in roles.values()):
        fs.notes.append("elements with role 'variants' were added because the core set's "
                        f"flip rate was below early_stop_threshold={threshold}; removing any of "
                        "them lowers it")
    return items, results
