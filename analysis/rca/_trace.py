"""Causal trace and decision layer (the seed's DBC; DESIGN §14 step 2), measured by replay.

The failing prompt and its benign twin share a prefix (identical states: attention is causal)
and a suffix (the chat template's tail); the failing one has an extra span in between (the
injected text). Positions after that span — the prompt's tail and every decode position —
are *aligned* with the twin's (from the end at prefill, 1:1 at decode steps, the twin
teacher-forced on the incident's decode tokens). A restoration replays the incident with the
twin's residual stream (``blocks.L.resid_post``) patched in at aligned positions:

* the **heatmap** restores one (layer, position) at a time;
* the **tail curve** restores every aligned position at once at one layer.

Values are the failure metric at the decision step, normalised: 1 = as failing, 0 = the
twin's level. The **decision layer** is the earliest layer from which restoring the tail —
at that layer or any later one — removes the failure (metric <= 0): before it, the later
layers still read the decision from the injected span; from it on, the decision lives in the
positions after the span. (Equivalently, in DESIGN §14's words, the earliest layer after
which restoring the rest of the stream can no longer stop the model reading the failure from
the span.) ``None`` when restoring the tail never removes it. Every value is a replayed
forward pass; batched candidates are verified at batch 1 where a flip is claimed.

Example::

    tr = causal_trace(session, twin_ids=twin, failure=bound)
    tr.decision_layer, tr.tail_curve[tr.decision_layer], tr.heatmap[12][-1]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from analysis.cca import BoundFailure
from analysis.interventions import Intervention
from analysis.replay import ReplaySession
from integrations.errors import AnalysisError

from ._twins import aligned_tail

__all__ = ["CausalTrace", "causal_trace", "decision_layer"]

_BATCH = 32


def decision_layer(flips: Sequence[bool], layers: Sequence[int]) -> int | None:
    """The earliest layer from which every later restoration flips (module doc)."""
    best = None
    for layer, ok in zip(reversed(layers), reversed(flips)):
        if not ok:
            break
        best = layer
    return best


@dataclass
class CausalTrace:
    """A causal trace of one incident against its twin (module doc)."""

    layers: list[int]
    positions: list[int]
    position_labels: list[str]
    heatmap: list[list[float]]
    tail_curve: list[float]
    tail_flips: list[bool]
    decision_layer: int | None
    decision_step: int
    metric_failing: float
    metric_twin: float
    runs: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _metric(session: ReplaySession, bound: BoundFailure, sets: list[list[Intervention]]
            ) -> list[float]:
    out: list[float] = []
    for i in range(0, len(sets), _BATCH):
        for r in session.run_batch(sets[i:i + _BATCH]):
            out.append(bound.value(r.logits))
    return out


def _positions(session: ReplaySession, bound: BoundFailure, n_prompt: int,
               suffix: int) -> list[int]:
    """Aligned positions computed up to the decision step: the prompt's tail, then one per
    decode step before it."""
    tail = list(range(n_prompt - suffix, n_prompt))
    return tail + [n_prompt + k - 1 for k in range(1, bound.step + 1)]


def causal_trace(session: ReplaySession, *, twin_ids: Sequence[int], failure: BoundFailure,
                 layers: Sequence[int] | None = None, tokenizer: Any = None,
                 heatmap: bool = True) -> CausalTrace:
    """Trace ``session`` against its benign twin prompt ``twin_ids`` (module doc)."""
    ids = [int(t) for t in session.plan.steps[0].tensors["input_ids"][0]]
    pre, span_end, suffix = aligned_tail(ids, twin_ids)
    if suffix == 0 or span_end <= pre:
        raise AnalysisError("the twin shares no tail with the incident's prompt after an extra "
                            "span; a causal trace needs a twin that differs by an inserted span")
    n_layers = len(session.resolve("blocks.*.resid_post"))
    layers = list(layers) if layers is not None else list(range(n_layers))
    donor = torch.tensor([list(twin_ids)])
    base = failure.value(session.run().logits)
    twin = failure.value(session.run_edited(plan=session.plan.with_prompt(donor)).logits)
    scale = base - twin if abs(base - twin) > 1e-6 else 1.0
    runs = 2
    tail_sets = [[Intervention(f"blocks.{layer}.resid_post[pos=-{suffix}:]", "patch",
                               donor=donor)] for layer in layers]
    tail = _metric(session, failure, tail_sets)
    runs += len(tail_sets)
    flips = [m <= 0 for m in tail]
    for i in range(len(layers)):   # a claimed flip is verified at the incident's shapes
        if flips[i]:
            flips[i] = failure.value(session.verify(tail_sets[i]).logits) <= 0
            runs += 1
    positions = _positions(session, failure, len(ids), suffix)
    grid: list[list[float]] = []
    if heatmap:
        cells = [[Intervention(f"blocks.{layer}.resid_post[pos={p}]", "patch", donor=donor)]
                 for layer in layers for p in positions]
        vals = _metric(session, failure, cells)
        runs += len(cells)
        grid = [[(v - twin) / scale for v in vals[i * len(positions):(i + 1) * len(positions)]]
                for i in range(len(layers))]
    labels = [tokenizer.decode([_token_at(session, ids, p)]) if tokenizer is not None else str(p)
              for p in positions]
    return CausalTrace(layers=layers, positions=positions, position_labels=labels,
                       heatmap=grid, tail_curve=[(v - twin) / scale for v in tail],
                       tail_flips=flips, decision_layer=decision_layer(flips, layers),
                       decision_step=failure.step, metric_failing=base, metric_twin=twin,
                       runs=runs)


def _token_at(session: ReplaySession, ids: list[int], p: int) -> int:
    if p < len(ids):
        return ids[p]
    step = p - len(ids) + 1
    return int(session.plan.steps[step].tensors["input_ids"][0, -1])
