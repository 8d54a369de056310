"""``analysis.rca.investigate`` end to end on a planted ground truth (tiny GPT-2, head
``blocks.2.attn.z[head=1]`` reads a trigger token anywhere and writes "HACKED"): every step
runs, and each finds what was planted; the fix it returns is portable and saved."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from analysis.cca import Failure, FixSet
from analysis.rca import investigate
from analysis.replay import Replayer
from analysis.scenarios.planted import PlantedModel, build_planted_gpt2
from integrations.incident import Incident

from ._traced import traced
from .test_rca_spans_trace import HEAD, LAYER, TARGET, TRIGGER, _Words


@pytest.fixture(scope="module")
def planted() -> PlantedModel:
    return build_planted_gpt2(seed=3, layer=LAYER, head=HEAD, trigger_token=TRIGGER,
                              target_token=TARGET, n_layer=4)


def _incident(pm: PlantedModel, ids: list[int], name: str) -> Incident:
    x = torch.tensor([ids])
    return traced(pm.model, lambda: pm.model.generate(x, max_new_tokens=3, do_sample=False,
                                                      pad_token_id=0), request_id=name)


@pytest.fixture(scope="module")
def cases(planted: PlantedModel) -> dict[str, list[Incident]]:
    neutral = next(t for t in range(20, 60) if t not in (TRIGGER, TARGET))
    out: dict[str, list[Incident]] = {"failing": [], "contrast": [], "benign": []}
    for k, p in enumerate(planted.benign_prompts(80, seed=11)):
        if len(p) < 7 or planted.predict([p]) == [TARGET]:
            continue
        failing = [*p[:3], TRIGGER, *p[3:]]
        control = [*p[:3], neutral, *p[3:]]
        if planted.verify([failing]) != [True] or planted.predict([control]) == [TARGET]:
            continue
        out["failing"].append(_incident(planted, failing, f"f{k}"))
        out["contrast"].append(_incident(planted, control, f"c{k}"))
        out["benign"].append(_incident(planted, list(p), f"b{k}"))
        if len(out["failing"]) == 10:
            break
    assert len(out["failing"]) == 10
    return out


@pytest.mark.slow
def test_investigate_finds_what_was_planted(planted: PlantedModel, cases: dict[str, Any],
                                            tmp_path: Path) -> None:
    tok = _Words(planted)
    inc, *variants = cases["failing"]
    session = Replayer(planted.model).load(inc)
    said: list[str] = []
    rep = investigate(session, failure=Failure.text_contains("HACKED", tokenizer=tok),
                      tokenizer=tok, benign=cases["benign"], contrast=cases["contrast"],
                      variants=variants, progress=said.append)
    assert rep.notes == [], rep.notes
    assert rep.input_spans is not None and rep.input_spans.text == "TRIGGER"
    assert rep.trace is not None and rep.trace.decision_layer == LAYER
    assert rep.consistency is not None and rep.consistency.rate == 1.0
    assert rep.consistency.evaluated == len(variants)
    # from the span's side: removing the trigger before the planted head's layer removes it
    assert rep.span_trace is not None and rep.span_trace.decision_layer == LAYER
    sc = rep.span_consistency
    assert sc is not None and sc.measure == "span" and sc.reference == LAYER
    assert (sc.consistent, sc.evaluated) == (len(variants), len(variants))
    assert rep.components is not None and rep.components.flip
    assert any(s.startswith(f"blocks.{LAYER}.attn.z[head={HEAD}]") for s in rep.components.sites)
    assert rep.directions is not None and rep.directions.chosen is not None
    assert rep.directions.chosen.within_budget and len(rep.directions.baselines) == 2
    assert rep.fix is not None and rep.fix.flip and "HACKED" not in (rep.fix.greedy_output or "")
    assert rep.fix.side_effects is not None and rep.fix.side_effects.mean_kl <= 0.1
    assert any("directions" in s for s in said) and said[-1].endswith("done")
    paths = rep.save(tmp_path)
    loaded = FixSet.load(paths["fix"])
    with loaded.apply(planted.model), torch.no_grad():
        x = torch.tensor([[*planted.benign_prompts(1, seed=99)[0][:3], TRIGGER, 5, 6, 7]])
        assert int(planted.model(x).logits[0, -1].argmax()) != TARGET or \
            not planted.verify([x[0].tolist()])[0]
    assert (tmp_path / "report.json").read_text().startswith("{")
