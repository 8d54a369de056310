"""Is the decision layer a property of the failure, or of one prompt? The seed's DBC target:
consistent across failing variants in >= 90 % of them.

Each failing variant with a benign twin among the benign incidents (the same prompt minus the
inserted span) gets its own tail-restoration curve (:func:`~analysis.rca._trace.causal_trace`
without the heatmap, every flip replayed); a variant is *consistent* when its decision layer
is within ``tolerance`` layers (default 1) of the reference (the investigated incident's, else
the most common one). Variants without a twin, or whose failure cannot be bound, are counted
as skipped, with the reason.

Example::

    c = decision_consistency(model, variants, benign, failure_of=f, tokenizer=tok,
                             reference=trace)
    c.rate, c.layers, c.skipped
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from analysis.cca import Failure
from analysis.replay import Replayer
from integrations.errors import ForensicsError
from integrations.incident import Incident

from ._trace import CausalTrace, causal_trace
from ._twins import find_twin

__all__ = ["Consistency", "decision_consistency"]


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

    @property
    def rate(self) -> float | None:
        return self.consistent / self.evaluated if self.evaluated else None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__, rate=self.rate)


def decision_consistency(model: Any, variants: Sequence[Incident], benign: Sequence[Incident],
                         *, failure_of: Callable[[Incident], Failure], tokenizer: Any,
                         reference: CausalTrace | None = None,
                         tolerance: int = 1) -> Consistency:
    """Decision layers over ``variants`` against ``reference`` (module doc)."""
    layers: dict[str, int | None] = {}
    skipped: dict[str, str] = {}
    for v in variants:
        twin = find_twin(v, benign)
        if twin is None:
            skipped[v.id] = "no benign twin among the benign incidents"
            continue
        try:
            s = Replayer(model).load(v)
            bound = failure_of(v).bind(s, tokenizer=tokenizer)
            tr = causal_trace(s, twin_ids=twin, failure=bound, heatmap=False)
        except ForensicsError as e:
            skipped[v.id] = str(e)
            continue
        layers[v.id] = tr.decision_layer
    ref = reference.decision_layer if reference is not None else None
    if ref is None:
        common = Counter(x for x in layers.values() if x is not None).most_common(1)
        ref = common[0][0] if common else None
    found = [x for x in layers.values()]
    ok = sum(1 for x in found if x is not None and ref is not None and abs(x - ref) <= tolerance)
    exact = sum(1 for x in found if x is not None and x == ref)
    return Consistency(reference=ref, layers=layers, tolerance=tolerance, consistent=ok,
                       evaluated=len(found), exact=exact, skipped=skipped)
