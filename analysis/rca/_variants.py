"""Is the decision layer a property of the failure, or of one prompt? The seed's DBC target:
consistent across failing variants in >= 90 % of them.

Each failing variant with a benign twin among the benign incidents (the same prompt minus the
inserted span) gets its own tail-restoration curve (:func:`~analysis.rca._trace.causal_trace`
without the heatmap; the decision layer's restorations re-run at batch 1) and its decision
layer (the steepest drop of that curve). A variant is *consistent* when its decision layer is
within ``tolerance`` layers (default 1) of the reference: ``reference_layer`` when given (e.g.
the consensus of a derivation set, so that the set judged did not choose it), else the median
(lower median) of the investigated incident's and the variants' decision layers — the
failure's consensus, not one prompt's. Variants without a twin, or whose failure cannot be
bound, are counted as skipped, with the reason. ``flip_layers`` keeps each variant's layer by
the earlier rule (:func:`~analysis.rca._trace.flip_layer`) for comparison, ``curves`` each
tail curve.

``measure="span"`` judges the decision layer from the span's side instead
(:mod:`~analysis.rca._span_trace`, DESIGN §14's wording: the earliest layer from which removing
the injected span no longer removes most of the failure); ``means`` are the benign means it
ablates with. ``flip_layers`` then keeps each variant's ``settled_layer``, ``curves`` its span
curve, ``shares`` the share of the failure the ablation still removes at the decision layer.

Example::

    c = decision_consistency(model, variants, benign, failure_of=f, tokenizer=tok,
                             reference=trace)
    c.rate, c.ci, c.reference, c.layers, c.skipped
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from analysis.cca import BoundFailure, Failure
from analysis.replay import Replayer, ReplaySession
from integrations.errors import ForensicsError
from integrations.incident import Incident

from ._heldout import wilson
from ._span_trace import SpanTrace, benign_means, span_trace
from ._trace import CausalTrace, causal_trace
from ._twins import find_twin

__all__ = ["Consistency", "consensus_layer", "decision_consistency"]

Loader = Callable[[Incident], ReplaySession]
T = TypeVar("T")


def consensus_layer(layers: Sequence[int | None]) -> int | None:
    """The lower median of the layers that were found (None when none was)."""
    found = [x for x in layers if x is not None]
    return int(statistics.median_low(found)) if found else None


@dataclass
class Consistency:
    """Decision layers of the failing variants and how many agree (module doc)."""

    reference: int | None
    layers: dict[str, int | None]
    tolerance: int
    consistent: int
    evaluated: int
    exact: int
    skipped: dict[str, str] = field(default_factory=dict)
    reference_from: str = ""
    measure: str = "tail"
    rule: str = ""
    incident_layer: int | None = None
    shares: dict[str, float | None] = field(default_factory=dict)
    flip_layers: dict[str, int | None] = field(default_factory=dict)
    curves: dict[str, list[float]] = field(default_factory=dict)

    @property
    def rate(self) -> float | None:
        return self.consistent / self.evaluated if self.evaluated else None

    @property
    def ci(self) -> tuple[float, float]:
        """Wilson 95 % interval of :attr:`rate`."""
        return wilson(self.consistent, self.evaluated)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__, rate=self.rate, ci=list(self.ci))


def variant_traces(variants: Sequence[Incident], benign: Sequence[Incident], *,
                   failure_of: Callable[[Incident], Failure], tokenizer: Any, load: Loader,
                   trace: Callable[[ReplaySession, list[int], BoundFailure], T]
                   ) -> tuple[dict[str, T], dict[str, str]]:
    """``trace(session, twin_ids, bound)`` of each variant against its twin, and the skipped
    ones (no twin among ``benign``, or a failure that cannot be bound or traced)."""
    traces: dict[str, T] = {}
    skipped: dict[str, str] = {}
    for v in variants:
        twin = find_twin(v, benign)
        if twin is None:
            skipped[v.id] = "no benign twin among the benign incidents"
            continue
        try:
            s = load(v)
            traces[v.id] = trace(s, twin, failure_of(v).bind(s, tokenizer=tokenizer))
        except ForensicsError as e:
            skipped[v.id] = str(e)
    return traces, skipped


def decision_consistency(model: Any, variants: Sequence[Incident], benign: Sequence[Incident],
                         *, failure_of: Callable[[Incident], Failure], tokenizer: Any,
                         reference: CausalTrace | SpanTrace | None = None,
                         reference_layer: int | None = None, tolerance: int = 1,
                         load: Loader | None = None, measure: str = "tail",
                         means: torch.Tensor | None = None) -> Consistency:
    """Decision layers over ``variants`` against the reference (module doc). ``load``: how to
    open a variant's replay session (default: one :class:`Replayer` for all of them)."""
    opener = load if load is not None else Replayer(model).load
    if measure == "span":
        if means is None:
            means = benign_means(benign, load=opener)
        span_means = means
        spans, skipped = variant_traces(
            variants, benign, failure_of=failure_of, tokenizer=tokenizer, load=opener,
            trace=lambda s, twin, bound: span_trace(s, twin_ids=twin, failure=bound,
                                                    means=span_means))
        return _judged(spans, skipped, reference, reference_layer, tolerance, measure="span",
                       rule=SpanTrace.rule,
                       shares={k: _removed(t) for k, t in spans.items()},
                       flips={k: t.settled_layer for k, t in spans.items()},
                       curves={k: t.curve for k, t in spans.items()})
    if measure != "tail":
        raise ValueError(f"measure must be 'tail' or 'span', not {measure!r}")
    traces, skipped = variant_traces(
        variants, benign, failure_of=failure_of, tokenizer=tokenizer, load=opener,
        trace=lambda s, twin, bound: causal_trace(s, twin_ids=twin, failure=bound,
                                                  heatmap=False, verify_flips=False))
    return _judged(traces, skipped, reference, reference_layer, tolerance, measure="tail",
                   rule=CausalTrace.rule,
                   shares={k: t.decision_share for k, t in traces.items()},
                   flips={k: t.flip_layer for k, t in traces.items()},
                   curves={k: t.tail_curve for k, t in traces.items()})


def _removed(t: SpanTrace) -> float | None:
    """The share of the failure the span's ablation still removes at the decision layer."""
    if t.decision_layer is None:
        return None
    return max(0.0, min(1.0, 1.0 - t.curve[t.layers.index(t.decision_layer)]))


def _judged(traces: Mapping[str, CausalTrace | SpanTrace], skipped: dict[str, str],
            reference: CausalTrace | SpanTrace | None, reference_layer: int | None,
            tolerance: int, *, measure: str, rule: str, shares: dict[str, float | None],
            flips: dict[str, int | None], curves: dict[str, list[float]]) -> Consistency:
    layers = {k: t.decision_layer for k, t in traces.items()}
    own = reference.decision_layer if reference is not None else None
    ref: int | None
    if reference_layer is not None:
        ref, origin = reference_layer, "given"
    else:
        ref = consensus_layer([own, *layers.values()])
        origin = ("median of the incident's and the variants' decision layers"
                  if own is not None else "median of the variants' decision layers")
    ok = sum(1 for x in layers.values()
             if x is not None and ref is not None and abs(x - ref) <= tolerance)
    exact = sum(1 for x in layers.values() if x is not None and x == ref)
    return Consistency(reference=ref, layers=layers, tolerance=tolerance, consistent=ok,
                       evaluated=len(layers), exact=exact, skipped=skipped,
                       reference_from=origin, incident_layer=own, measure=measure, rule=rule,
                       shares=shares, flip_layers=flips,
                       curves={k: [round(v, 4) for v in c] for k, c in curves.items()})
