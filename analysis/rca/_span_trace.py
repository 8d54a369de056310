"""The decision layer from the injected span's side (DESIGN §14 step 2, in its own words): the
earliest layer after which taking the injected text out of the residual stream no longer
removes the failure.

The tail curve (:mod:`._trace`) restores the twin's states *after* the span and finds where
the failure is read out of it. Meng et al. restore the *subject's* own states instead; here the
subject — the inserted span — has no counterpart in the twin, so its information is removed
rather than restored: at layer ``L`` the residual stream ``blocks.L.resid_post`` of every span
position is replaced by the benign mean of that layer (over every non-BOS prefill position of
the benign incidents; position 0 is the attention sink, orders of magnitude larger), and the
run continues — later layers see the span only through those vectors. Ablated early, the
instruction is gone before anything read it (the failure goes); ablated after the layers that
read it, it no longer matters. The **span curve** is the failure metric at the decision step
for each ``L``, normalised like the tail curve (1 = as failing, 0 = the twin's level).

* ``decision_layer``: the earliest layer from which ablating the span at that layer or any
  later one removes less than ``SPAN_SHARE`` (half) of the failure — by then most of it has
  been read out of the span (``RESULTS_rca.md``: pre-registered on derivation variants, then
  judged once on held-out ones);
* ``settled_layer``: the earliest layer from which no ablation flips the failure any more
  (metric > 0) — after it nothing in the span can prevent it.

The values at the decision layer and the one before it are re-run at batch 1 (the incident's
shapes) and those kept.

Example::

    means = benign_means(benign, load=Replayer(model).load)
    st = span_trace(session, twin_ids=twin, failure=bound, means=means)
    st.decision_layer, st.settled_layer, st.curve[st.decision_layer]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from analysis.cca import BoundFailure
from analysis.interventions import Intervention
from analysis.replay import ReplaySession
from integrations.errors import AnalysisError
from integrations.incident import Incident

from ._trace import _Runner, rerun_around
from ._twins import aligned_tail

__all__ = ["SPAN_SHARE", "SpanTrace", "benign_means", "last_removing", "span_trace"]

#: The share of the failure an ablation of the span must still remove for its layer to come
#: before the decision layer (pre-registered on derivation curves; ``RESULTS_rca.md``).
SPAN_SHARE = 0.5


@dataclass
class SpanTrace:
    """The span curve of one incident and its decision layers (module doc)."""

    span: tuple[int, int]                # [start, end) prompt positions of the inserted span
    layers: list[int]
    curve: list[float]                   # normalised metric with the span ablated at layer L
    decision_layer: int | None
    settled_layer: int | None
    decision_step: int
    metric_failing: float
    metric_twin: float
    runs: int
    rule: str = (f"earliest layer from which ablating the injected span removes less than "
                 f"{SPAN_SHARE:.0%} of the failure")
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__, span=list(self.span))


def last_removing(removes: Sequence[bool]) -> int | None:
    """The index from which no later entry removes (one past the last True); 0 when none
    does, None when the last one still does (no such layer)."""
    if removes and removes[-1]:
        return None
    i = len(removes)
    while i > 0 and not removes[i - 1]:
        i -= 1
    return i


def benign_means(benign: Sequence[Incident], *, load: Callable[[Incident], ReplaySession]
                 ) -> torch.Tensor:
    """``[n_layers, d_model]``: the mean ``blocks.L.resid_post`` over every non-BOS prefill
    position of the ``benign`` incidents (replayed)."""
    if not benign:
        raise AnalysisError("the span trace needs benign incidents for the mean it ablates with")
    sums: torch.Tensor | None = None
    count = 0
    for inc in benign:
        s = load(inc)
        n_layers = len(s.resolve("blocks.*.resid_post"))
        acts = s.run(capture=["blocks.*.resid_post"], last_step=0).activations
        x = torch.stack([acts[f"blocks.{L}.resid_post"][0][0, 1:].double()
                         for L in range(n_layers)])   # [layer, pos - 1, d_model]
        sums = x.sum(1) if sums is None else sums + x.sum(1)
        count += x.shape[1]
    assert sums is not None
    if count == 0:
        raise AnalysisError("the benign incidents have no prompt position after BOS")
    return (sums / count).float()


def span_trace(session: ReplaySession, *, twin_ids: Sequence[int], failure: BoundFailure,
               means: torch.Tensor) -> SpanTrace:
    """The span curve of ``session`` against its twin prompt ``twin_ids`` (module doc)."""
    ids = [int(t) for t in session.plan.steps[0].tensors["input_ids"][0]]
    pre, span_end, _ = aligned_tail(ids, twin_ids)
    if span_end <= pre:
        raise AnalysisError("the incident's prompt has no span the twin lacks; a span trace "
                            "needs a twin that differs by an inserted span")
    layers = list(range(len(session.resolve("blocks.*.resid_post"))))
    if means.shape[0] != len(layers):
        raise AnalysisError(f"benign means for {means.shape[0]} layers, the model has "
                            f"{len(layers)}")

    run = _Runner(session, failure)
    base, twin, scale = run.ends(torch.tensor([list(twin_ids)]))
    sets = [[Intervention(f"blocks.{L}.resid_post[pos={pre}:{span_end}]", "patch",
                          value=means[L])] for L in layers]   # means[L]: [d_model]
    raw = run.batched(sets)
    d, moved = rerun_around(run, sets, raw, lambda values: last_removing(
        [1 - (v - twin) / scale >= SPAN_SHARE for v in values]))
    notes = ["re-running the decision layer's ablations at batch 1 moved it"] if moved else []
    return SpanTrace(span=(pre, span_end), layers=layers,
                     curve=[(v - twin) / scale for v in raw],
                     decision_layer=_at(layers, d),
                     settled_layer=_at(layers, last_removing([v <= 0 for v in raw])),
                     decision_step=failure.step, metric_failing=base, metric_twin=twin,
                     runs=run.runs, notes=notes)


def _at(layers: list[int], i: int | None) -> int | None:
    return None if i is None or i >= len(layers) else layers[i]
