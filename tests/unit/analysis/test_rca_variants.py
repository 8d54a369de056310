"""Decision-layer consistency over failing variants (analysis.rca._variants) and the side
effects' shared continuations, on the planted ground truth of ``test_rca_investigate`` (tiny
GPT-2, head ``blocks.2.attn.z[head=1]`` reads a trigger anywhere and writes "HACKED"): every
variant is decided at the planted layer, so the consensus is that layer; a wrong reference
is refused by the counts, and a variant without a twin is skipped, not counted."""

from __future__ import annotations

from typing import Any

import pytest

from analysis.cca import Failure
from analysis.interventions import Intervention
from analysis.rca._heldout import generate, side_effects
from analysis.rca._twins import prompt_ids
from analysis.rca._variants import consensus_layer, decision_consistency
from analysis.replay import Replayer
from analysis.scenarios.planted import PlantedModel

from .test_rca_investigate import cases, planted  # noqa: F401  (fixtures)
from .test_rca_spans_trace import LAYER, _Words


def test_consensus_is_the_lower_median_of_the_layers_found() -> None:
    assert consensus_layer([None, 3, 5, 4, 22]) == 4
    assert consensus_layer([23, 22, 23, 28]) == 23
    assert consensus_layer([None]) is None and consensus_layer([]) is None


@pytest.mark.slow
def test_variants_agree_on_the_planted_layer(planted: PlantedModel,  # noqa: F811
                                             cases: dict[str, Any]) -> None:  # noqa: F811
    tok = _Words(planted)
    failing = Failure.text_contains("HACKED", tokenizer=tok)
    variants, benign = cases["failing"][:5], cases["benign"]
    rp = Replayer(planted.model)
    c = decision_consistency(planted.model, variants, benign, failure_of=lambda _i: failing,
                             tokenizer=tok, load=rp.load)
    assert c.reference == LAYER and "median" in c.reference_from
    assert (c.consistent, c.evaluated, c.exact) == (5, 5, 5) and c.rate == 1.0
    assert c.ci[0] > 0.5 and set(c.layers.values()) == {LAYER}
    assert all(s is not None and s > 0.5 for s in c.shares.values())
    assert all(len(curve) == 4 for curve in c.curves.values())
    # without their twins (benign[0], benign[1]) the variants are skipped, not counted
    alone = decision_consistency(planted.model, variants[:2], benign[2:],
                                 failure_of=lambda _i: failing, tokenizer=tok, load=rp.load)
    assert alone.evaluated == 0 and len(alone.skipped) == 2 and alone.rate is None
    wrong = decision_consistency(planted.model, variants[2:4], benign,
                                 failure_of=lambda _i: failing, tokenizer=tok,
                                 reference_layer=LAYER + 2, load=rp.load)
    assert wrong.reference == LAYER + 2 and wrong.reference_from == "given"
    assert (wrong.consistent, wrong.evaluated) == (0, 2)


def test_side_effects_reuse_given_continuations(planted: PlantedModel,  # noqa: F811
                                                cases: dict[str, Any]) -> None:  # noqa: F811
    prompts = [prompt_ids(b) for b in cases["benign"][:4]]

    class Fix:
        def apply(self, model: Any) -> Any:
            from analysis.interventions import applied

            return applied(model, [Intervention("blocks.1.mlp", "zero")])

    fresh = side_effects(planted.model, prompts, fix=Fix(), max_new_tokens=3)
    conts = generate(planted.model, prompts, max_new_tokens=3)
    reused = side_effects(planted.model, prompts, fix=Fix(), max_new_tokens=3,
                          continuations=conts)
    assert fresh.mean_kl > 0 and fresh.to_dict() == reused.to_dict()
    other = side_effects(planted.model, prompts, fix=Fix(), max_new_tokens=3,
                         continuations=[c[:1] for c in conts])
    assert other.n_tokens < fresh.n_tokens
