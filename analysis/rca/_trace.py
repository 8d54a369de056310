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
twin's level. Along the tail curve the failure is lost where later layers stop reading it from
the span: restoring the tail at layer ``L`` removes the share of the failure that layers
``<= L`` have already moved out of the span. Each layer's *share* is the step down of the
curve's upper non-increasing envelope (clipped to [0, 1], starting from 1 = no restoration;
a dip the curve climbs back out of removes nothing). The **decision layer** is the earliest
layer whose restoration removes at least ``MIN_SHARE`` (0.15) of the failure for good — the
first layer where a sizeable part of the failure is read out of the injected span — else the
layer with the largest share (:func:`first_drop`; ``decision_share`` is its share). On
SmolLM2's prompt injection the curve has two read-outs, layers 22–23 and layer 28, and this
rule names the first (``RESULTS_rca.md``); the largest single step (:func:`steepest_drop`)
jumps between the two.

The earlier rule — the earliest layer from which every later tail restoration removes the
failure (metric <= 0) — is kept as ``flip_layer`` (:func:`flip_layer`): it depends on the
failure's margin (a failure that wins by 0.05 logits flips at the first small dip of a long
gentle slope, one that wins by 2 only near the end), so it varies with the phrasing, not with
where the failure is decided. Every value is a replayed forward pass (stopped at the decision
step); the restorations at the decision layer and the one before it are re-run at batch 1 (the
incident's shapes) and those values kept; with ``verify_flips`` every claimed flip is too.

Example::

    tr = causal_trace(session, twin_ids=twin, failure=bound)
    tr.decision_layer, tr.decision_share, tr.tail_curve[tr.decision_layer], tr.heatmap[12][-1]
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

from ._twins import aligned_tail

__all__ = ["MIN_SHARE", "CausalTrace", "causal_trace", "first_drop", "flip_layer",
           "steepest_drop"]

_BATCH = 32
#: The share of the failure one layer's restoration must remove to be the decision layer
#: (chosen on the injection scenario's derivation split, ``RESULTS_rca.md``).
MIN_SHARE = 0.15


def flip_layer(flips: Sequence[bool], layers: Sequence[int]) -> int | None:
    """The earliest layer from which every later restoration flips (the earlier rule)."""
    best = None
    for layer, ok in zip(reversed(layers), reversed(flips)):
        if not ok:
            break
        best = layer
    return best


def _drops(curve: Sequence[float]) -> list[float]:
    """The share of the failure each layer's restoration removes for good: the steps down of
    the curve's upper non-increasing envelope (at each layer the largest value at it or any
    later layer; values clipped to [0, 1]), starting from 1 (no restoration). A dip that the
    curve climbs back out of removes nothing."""
    env, high = [], 0.0
    for value in reversed(curve):
        high = max(high, max(0.0, min(1.0, float(value))))
        env.append(high)
    env.reverse()
    return [a - b for a, b in zip([1.0, *env], env)]


def first_drop(curve: Sequence[float], layers: Sequence[int], *, min_share: float = MIN_SHARE
               ) -> tuple[int | None, float | None]:
    """``(layer, share)``: the earliest layer whose restoration removes at least ``min_share``
    of the failure in one step (see :func:`steepest_drop` for the steps), else the steepest.

    Example::

        first_drop([1.0, 0.7, 0.6, 0.0], [0, 1, 2, 3], min_share=0.2)   # (1, 0.3)
    """
    drops = _drops(curve)
    for layer, d in zip(layers, drops):
        if d >= min_share - 1e-9:
            return layer, d
    return steepest_drop(curve, layers)


def steepest_drop(curve: Sequence[float], layers: Sequence[int]
                  ) -> tuple[int | None, float | None]:
    """``(layer, share)``: the layer whose restoration removes the largest share of the
    failure for good (the largest step of :func:`_drops`) and that share; ``(None, None)``
    for an empty curve. The earliest layer wins a tie.

    Example::

        steepest_drop([1.0, 0.9, 0.3, 0.2, 0.0], [0, 1, 2, 3, 4])   # (2, 0.6)
    """
    best: int | None = None
    share: float | None = None
    for layer, d in zip(layers, _drops(curve)):
        if share is None or d > share + 1e-9:
            best, share = layer, d
    return best, share


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
    decision_share: float | None = None
    flip_layer: int | None = None
    rule: str = (f"earliest layer whose tail restoration removes >= {MIN_SHARE:.0%} of the "
                 "failure for good (else the largest share)")
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _Runner:
    """Replays of one trace, stopped at the decision step, counted."""

    def __init__(self, session: ReplaySession, bound: BoundFailure) -> None:
        self.s, self.bound, self.runs = session, bound, 0

    def batched(self, sets: list[list[Intervention]]) -> list[float]:
        out: list[float] = []
        for i in range(0, len(sets), _BATCH):
            for r in self.s.run_batch(sets[i:i + _BATCH], last_step=self.bound.step):
                out.append(self.bound.value(r.logits))
        self.runs += len(sets)
        return out

    def one(self, ivs: list[Intervention]) -> float:
        self.runs += 1
        return self.bound.value(self.s.verify(ivs, last_step=self.bound.step).logits)

    def ends(self, twin: torch.Tensor) -> tuple[float, float, float]:
        """The failing run's metric, the twin prompt's (``[1, pos]``, teacher-forced on the
        incident's decode tokens) and the scale that normalises between them."""
        base = self.one([])
        other = self.bound.value(self.s.run_edited(plan=self.s.plan.with_prompt(twin),
                                                   last_step=self.bound.step).logits)
        self.runs += 1
        return base, other, base - other if abs(base - other) > 1e-6 else 1.0


def _positions(bound: BoundFailure, n_prompt: int, suffix: int) -> list[int]:
    """Aligned positions computed up to the decision step: the prompt's tail, then one per
    decode step before it."""
    tail = list(range(n_prompt - suffix, n_prompt))
    return tail + [n_prompt + k - 1 for k in range(1, bound.step + 1)]


def rerun_around(run: _Runner, sets: list[list[Intervention]], raw: list[float],
                 decide: Callable[[list[float]], int | None]) -> tuple[int | None, bool]:
    """The index ``decide(raw)`` names, after the values at it and the one before are re-run at
    batch 1 (``raw`` updated in place; up to 3 rounds while that moves it), and whether
    batch 1 moved it."""
    done: set[int] = set()
    first = decide(raw)
    for _ in range(3):
        i = decide(raw)
        todo = [] if i is None else [j for j in (i - 1, i) if 0 <= j < len(raw)
                                     and j not in done]
        if not todo:
            break
        for j in todo:
            raw[j] = run.one(sets[j])
            done.add(j)
    final = decide(raw)
    return final, final != first


def _verified_decision(run: _Runner, sets: list[list[Intervention]], raw: list[float],
                       norm: Any, layers: list[int]) -> tuple[int | None, float | None, bool]:
    """The decision layer from ``raw`` with the values at it and the layer before re-run at
    batch 1 (``raw`` updated in place); ``True`` when batch 1 moved it."""
    def index(values: list[float]) -> int | None:
        layer, _ = first_drop([norm(v) for v in values], layers)
        return None if layer is None else layers.index(layer)

    _, moved = rerun_around(run, sets, raw, index)
    layer, share = first_drop([norm(v) for v in raw], layers)
    return layer, share, moved


def causal_trace(session: ReplaySession, *, twin_ids: Sequence[int], failure: BoundFailure,
                 layers: Sequence[int] | None = None, tokenizer: Any = None,
                 heatmap: bool = True, verify_flips: bool = True) -> CausalTrace:
    """Trace ``session`` against its benign twin prompt ``twin_ids`` (module doc)."""
    ids = [int(t) for t in session.plan.steps[0].tensors["input_ids"][0]]
    pre, span_end, suffix = aligned_tail(ids, twin_ids)
    if suffix == 0 or span_end <= pre:
        raise AnalysisError("the twin shares no tail with the incident's prompt after an extra "
                            "span; a causal trace needs a twin that differs by an inserted span")
    n_layers = len(session.resolve("blocks.*.resid_post"))
    layers = list(layers) if layers is not None else list(range(n_layers))
    donor = torch.tensor([list(twin_ids)])
    run = _Runner(session, failure)
    base, twin, scale = run.ends(donor)

    def norm(v: float) -> float:
        return (v - twin) / scale

    tail_sets = [[Intervention(f"blocks.{layer}.resid_post[pos=-{suffix}:]", "patch",
                               donor=donor)] for layer in layers]
    tail = run.batched(tail_sets)
    decision, share, moved = _verified_decision(run, tail_sets, tail, norm, layers)
    flips = [m <= 0 for m in tail]
    for i in range(len(layers)):   # a claimed flip is verified at the incident's shapes
        if flips[i] and verify_flips:
            flips[i] = run.one(tail_sets[i]) <= 0
    positions = _positions(failure, len(ids), suffix)
    grid: list[list[float]] = []
    if heatmap:
        cells = [[Intervention(f"blocks.{layer}.resid_post[pos={p}]", "patch", donor=donor)]
                 for layer in layers for p in positions]
        vals = [norm(v) for v in run.batched(cells)]
        grid = [vals[i * len(positions):(i + 1) * len(positions)] for i in range(len(layers))]
    labels = [tokenizer.decode([_token_at(session, ids, p)]) if tokenizer is not None else str(p)
              for p in positions]
    notes = ["re-running the decision layer's restorations at batch 1 moved the decision "
             "layer"] if moved else []
    if not verify_flips:
        notes.append("tail_flips from the batched replays (not re-run at batch 1)")
    return CausalTrace(layers=layers, positions=positions, position_labels=labels,
                       heatmap=grid, tail_curve=[norm(v) for v in tail], tail_flips=flips,
                       decision_layer=decision, decision_share=share,
                       flip_layer=flip_layer(flips, layers), decision_step=failure.step,
                       metric_failing=base, metric_twin=twin, runs=run.runs, notes=notes)


def _token_at(session: ReplaySession, ids: list[int], p: int) -> int:
    if p < len(ids):
        return ids[p]
    step = p - len(ids) + 1
    return int(session.plan.steps[step].tensors["input_ids"][0, -1])
