"""The span neutraliser (analysis.rca.derive_span_fix) against a planted ground truth: a tiny
BERT classifier whose label flips when a trigger token appears anywhere (its layer 0 pools
the trigger into [CLS], so the gate sits on the block-0 input). Fitted on derivation
prompts with the trigger's position as the span (and an inserted non-trigger token as the
contrast's span), the gate must fire on the trigger only: held-out failing prompts flip back,
clean prompts keep their label."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from analysis.rca._spanfix import classify, derive_span_fix
from analysis.scenarios.planted import PlantedModel, build_planted_bert
from integrations.errors import AnalysisError

from ._traced import traced

TRIGGER, TARGET = 50, 1


@pytest.fixture(scope="module")
def planted() -> PlantedModel:
    return build_planted_bert(seed=2, layer=2, neuron=9, trigger_token=TRIGGER,
                              target_label=TARGET, n_layer=3)


def _record(pm: PlantedModel, prompts: list[list[int]]) -> list[Any]:
    def call(ids: list[int]) -> Any:
        x = torch.tensor([ids])
        return lambda: pm.model(input_ids=x, attention_mask=torch.ones_like(x))
    return [traced(pm.model, call(p), request_id=f"r-{i}") for i, p in enumerate(prompts)]


def _insert(p: list[int], token: int, at: int) -> list[int]:
    return [*p[:at], token, *p[at:]]


def _split(pm: PlantedModel, seed: int, n: int) -> tuple[list[list[int]], list[list[int]]]:
    """(failing, clean): the trigger inserted at varying positions of clean prompts the model
    does not label TARGET, kept only where the model then fails."""
    clean = [list(p) for p in pm.benign_prompts(4 * n, seed=seed)
             if pm.predict([list(p)]) != [TARGET]][:n]
    failing = [_insert(p, TRIGGER, 1 + i % (len(p) - 1)) for i, p in enumerate(clean)]
    ok = pm.predict(failing)
    return [f for f, y in zip(failing, ok) if y == TARGET], clean


def test_the_gate_learns_the_inserted_trigger_and_carries_over(planted: PlantedModel) -> None:
    pm = planted
    failing, clean = _split(pm, seed=1, n=24)
    assert len(failing) >= 12
    other = next(t for t in range(5, 100) if t != TRIGGER)      # an inserted harmless token
    contrast = [_insert(p, other, 1 + i % (len(p) - 1)) for i, p in enumerate(clean)]
    contrast = [c for c, y in zip(contrast, pm.predict(contrast)) if y != TARGET]
    spans = [[(f.index(TRIGGER), f.index(TRIGGER) + 1)] for f in failing]
    c_spans = [[(c.index(other), c.index(other) + 1)] for c in contrast]
    labels = pm.predict(clean)
    fix = derive_span_fix(pm.model, failing=_record(pm, failing), spans=spans,
                          contrast=_record(pm, contrast), benign=_record(pm, clean),
                          labels=labels, failing_label=lambda inc: TARGET,
                          sites=["blocks.0.resid_pre"], contrast_spans=c_spans)
    assert fix.chosen is not None and fix.chosen.within_budget
    assert fix.chosen.flip_rate >= 0.9                        # cross-fitted on derivation

    held_failing, held_clean = _split(pm, seed=7, n=24)      # new prompts, new positions
    probs = classify(pm.model, held_failing, interventions=fix.interventions)
    flipped = sum(int(p.argmax()) != TARGET for p in probs)
    assert flipped >= 0.9 * len(held_failing)
    before = classify(pm.model, held_clean).argmax(-1)
    after = classify(pm.model, held_clean, interventions=fix.interventions).argmax(-1)
    assert torch.equal(before, after)                        # clean prompts keep their label
    plain = classify(pm.model, held_failing).argmax(-1)
    assert bool((plain == TARGET).all())                     # the hooks were removed


def test_mismatched_contrast_spans_are_refused(planted: PlantedModel) -> None:
    failing, clean = _split(planted, seed=1, n=8)
    inc = _record(planted, failing[:4] + clean[:4])
    with pytest.raises(AnalysisError, match="contrast_spans"):
        derive_span_fix(planted.model, failing=inc[:4], spans=[[(1, 2)]] * 4,
                        contrast=inc[4:], benign=inc[4:], labels=[0] * 4,
                        failing_label=lambda i: TARGET, contrast_spans=[[(1, 2)]])
