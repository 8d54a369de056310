"""CCA building blocks on real tiny models: failure metrics, config, statistics, group testing.

The fix-set search end to end on planted-fault models is in ``test_cca_planted.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from analysis.cca import CausalCCA, Failure
from analysis.cca._group_testing import ddmin, minimise, progressive_reduce
from analysis.cca._oracle import SessionOracle
from analysis.cca._stats import wilson_ci
from analysis.replay import Replayer
from integrations.config import load_config
from integrations.errors import AnalysisError, ConfigError
from tests.unit.analysis._oracles import BooleanOracle
from tests.unit.analysis._traced import traced

IDS = torch.tensor([[5, 17, 33, 8, 61, 12]])


def decode(ids: Sequence[int]) -> str:
    return "".join(f"<{int(t)}>" for t in ids)


# ---------------------------------------------------------------------------- failures
def test_token_metric_is_logit_margin_at_the_decision_step(tiny_gpt2: torch.nn.Module) -> None:
    inc = traced(tiny_gpt2, lambda: tiny_gpt2(input_ids=IDS))
    s = Replayer(tiny_gpt2).load(inc)
    lg = tiny_gpt2(input_ids=IDS).logits[0, -1].detach()
    top, second = lg.topk(2).indices.tolist()
    clean = s.run().logits
    bf = Failure.token(top).bind(s)
    assert bf.step == 0
    assert bf.value(clean) == pytest.approx(float(lg[top] - lg[second]), abs=1e-5)
    assert bf.value(clean) > 0  # the top-1 token: failing
    other = Failure.token(second).bind(s).value(clean)
    assert other == pytest.approx(float(lg[second] - lg[top]), abs=1e-5) and other < 0
    vs = Failure.token(second, expected=7).bind(s).value(clean)
    assert vs == pytest.approx(float(lg[second] - lg[7]), abs=1e-5)
    with pytest.raises(AnalysisError, match="has no recorded next-token logits"):
        Failure.token(top, position=2).bind(s)  # only the newest position's logits are kept


def test_text_contains_finds_the_step_that_produced_it(tiny_gpt2: Any) -> None:
    inc = traced(tiny_gpt2, lambda: tiny_gpt2.generate(IDS, max_new_tokens=5, do_sample=False))
    s = Replayer(tiny_gpt2).load(inc)
    out = inc.tensor("output_ids", step=inc.steps("output_ids", kind="output")[-1],
                     kind="output")[0, IDS.shape[1]:].tolist()
    assert len(out) == 5
    bf = Failure.text_contains(decode(out[2:4]), tokenizer=decode).bind(s)
    first = next(i for i in range(5) if out[i:i + 2] == out[2:4])  # first occurrence
    assert (bf.step, bf.token_id) == (first, out[first])
    clean = s.run().logits
    assert bf.value(clean) > 0  # teacher-forced replay: the recorded token is the top-1
    last = Failure.text_contains(decode(out[4:]), tokenizer=decode).bind(s)
    assert last.step == out.index(out[4])  # the last token comes from output_ids
    with pytest.raises(AnalysisError, match="does not contain"):
        Failure.text_contains("<999>", tokenizer=decode).bind(s)
    with pytest.raises(AnalysisError, match="needs a tokenizer"):
        Failure.text_contains("x").bind(s)


def test_label_metric_on_a_classifier(tiny_bert: torch.nn.Module) -> None:
    inc = traced(tiny_bert, lambda: tiny_bert(input_ids=IDS))
    s = Replayer(tiny_bert).load(inc)
    lg = tiny_bert(input_ids=IDS).logits[0].detach()
    k = int(lg.argmax())
    clean = s.run().logits
    assert Failure.label(k).bind(s).value(clean) == pytest.approx(float(lg[k] - lg[1 - k]),
                                                                   abs=1e-5)
    assert Failure.label(1 - k).bind(s).value(clean) < 0
    default = Failure.from_incident(inc)  # recorded top-1 class at the flagged step
    assert default.kind == "recorded"
    bound = default.bind(s)
    assert bound.token_id == k and "label" in bound.description


def test_defaults_from_the_flag_reason_and_callable_metrics(tiny_gpt2: Any) -> None:
    inc = traced(tiny_gpt2, lambda: tiny_gpt2.generate(IDS, max_new_tokens=3, do_sample=False),
                 flag="prompt_injection")
    s = Replayer(tiny_gpt2).load(inc)
    out = inc.tensor("output_ids", step=inc.steps("output_ids", kind="output")[-1],
                     kind="output")[0].tolist()

    class Tok:  # renders the generated token as "HACKED", like the real failure
        def decode(self, ids: Sequence[int]) -> str:
            return " ".join("HACKED" if t == out[-2] else str(t) for t in ids)

    f = Failure.from_incident(inc, tokenizer=Tok())
    assert f.kind == "text" and f.text == "HACKED"
    assert f.bind(s).token_id == out[-2]
    # without a tokenizer (or without the text in the output): the recorded top-1
    assert Failure.from_incident(inc).kind == "recorded"
    clean = s.run().logits
    g = Failure.coerce(lambda lg: lg[:, 3] - lg[:, 4], inc)
    assert g.kind == "metric"
    last = clean[-1]
    assert last is not None
    assert g.bind(s).value(clean) == pytest.approx(float(last[0, 3] - last[0, 4]))


# ---------------------------------------------------------------------------- config + stats
def test_config_keys_and_validation() -> None:
    cfg = load_config(overrides={"modules.cca.search_strategy": "beam",
                                 "modules.cca.max_fix_set_size": 3,
                                 "modules.cca.early_stop_threshold": 0.5})
    cca = CausalCCA(config=cfg)
    assert (cca.search_strategy, cca.max_fix_set_size, cca.early_stop_threshold) == \
        ("beam", 3, 0.5)
    assert CausalCCA(config=cfg, max_fix_set_size=5).max_fix_set_size == 5  # explicit wins
    default = CausalCCA()
    assert (default.search_strategy, default.max_fix_set_size,
            default.early_stop_threshold) == ("greedy", 8, 0.8)
    with pytest.raises(ConfigError, match="search_strategy"):
        CausalCCA(search_strategy="random")
    with pytest.raises(ConfigError, match="early_stop_threshold"):
        CausalCCA(early_stop_threshold=0.0)


def test_wilson_interval_is_scipys() -> None:
    from scipy.stats import binomtest

    lo, hi = wilson_ci(15, 16)
    ref = binomtest(15, 16).proportion_ci(method="wilson")
    assert (lo, hi) == (pytest.approx(ref.low), pytest.approx(ref.high))
    assert 0.0 < lo < 15 / 16 < hi <= 1.0


def test_mean_needs_benign_traffic(tiny_gpt2: torch.nn.Module) -> None:
    inc = traced(tiny_gpt2, lambda: tiny_gpt2(input_ids=IDS))
    s = Replayer(tiny_gpt2).load(inc)
    with pytest.raises(AnalysisError, match="benign"):
        CausalCCA().search_fix_set(s, intervention="mean")


def test_an_incident_that_does_not_fail_is_reported_not_fixed(
        tiny_gpt2: torch.nn.Module) -> None:
    inc = traced(tiny_gpt2, lambda: tiny_gpt2(input_ids=IDS))
    s = Replayer(tiny_gpt2).load(inc)
    lg = tiny_gpt2(input_ids=IDS).logits[0, -1].detach()
    not_top = int(lg.argmin())
    fix = CausalCCA().search_fix_set(s, failure=Failure.token(not_top), intervention="zero")
    assert not fix.flip and fix.interventions == [] and fix.flip_rate is None
    assert "does not fail" in fix.reason
    assert fix.forward_passes == 1  # one replay established it


# ---------------------------------------------------------------------------- group testing
@pytest.mark.parametrize("causes,rank_positions", [
    ({700}, [0]),            # a good ranking
    ({700}, [1023]),         # the cause ranked last (saturated gradients)
    ({3, 900}, [5, 1000]),   # two causes needed together, one ranked badly
    ({1, 2, 3}, [0, 512, 1023]),
])
def test_progressive_reduction_finds_k_causes_in_about_k_log2_n(
        causes: set[int], rank_positions: list[int]) -> None:
    n = 1024
    oracle = BooleanOracle(n, [causes])
    rest = [i for i in range(n) if i not in causes]
    order = list(rest)
    for pos, c in sorted(zip(rank_positions, sorted(causes))):
        order.insert(pos, c)
    red = progressive_reduce(oracle, order, max_size=8)
    assert red.items is not None and set(red.items) == causes
    k = len(causes)
    assert oracle.passes <= k * (2 * math.log2(n) + 2), red.trace
    final, without = minimise(oracle, red.items)
    assert set(final) == causes and all(m > 0 for m in without.values())


def test_progressive_reduction_respects_the_size_bound() -> None:
    oracle = BooleanOracle(64, [set(range(10))])
    red = progressive_reduce(oracle, list(range(64)), max_size=4)
    assert red.items is None and "max_fix_set_size=4" in red.reason


def test_ddmin_splits_finer_when_no_half_flips() -> None:
    oracle = BooleanOracle(64, [{5, 40}])  # AND fault across both halves
    red = ddmin(oracle, list(range(64)))
    assert red.items is not None and set(red.items) == {5, 40}
    assert any("split finer" in t for t in red.trace)


def test_minimise_drops_unneeded_elements_and_reports_necessity() -> None:
    oracle = BooleanOracle(16, [{2, 3}])
    final, without = minimise(oracle, [1, 2, 3, 9])
    assert sorted(final) == [2, 3] and set(without) == {2, 3}


def test_session_oracle_merges_neuron_interventions(tiny_gpt2: torch.nn.Module) -> None:
    from analysis.interventions import Intervention

    inc = traced(tiny_gpt2, lambda: tiny_gpt2(input_ids=IDS))
    s = Replayer(tiny_gpt2).load(inc)
    lg = tiny_gpt2(input_ids=IDS).logits[0, -1].detach()
    ivs = [Intervention(f"blocks.1.mlp.post[neuron={i}]", "zero") for i in range(6)]
    o = SessionOracle(s, Failure.token(int(lg.argmax())).bind(s), ivs)
    assert [iv.site for iv in o.interventions_for([4, 0, 2])] == \
        ["blocks.1.mlp.post[neuron=0|2|4]"]
    merged = o.verify([0, 2, 4])
    separate = Failure.token(int(lg.argmax())).bind(s).value(
        s.verify([ivs[0], ivs[2], ivs[4]]).logits)
    assert merged == separate  # the same intervention, bit for bit
    batched = o.evaluate_batch([[0, 2, 4], [1]])
    assert batched[0] == pytest.approx(merged, abs=1e-4)
    assert o.passes == 3 and o.verified_passes == 1
    o.verify([4, 2, 0])  # memoised: not replayed again
    assert o.passes == 3


def test_position_and_head_granularity_with_prompt_benign_set(tiny_gpt2: torch.nn.Module) -> None:
    inc = traced(tiny_gpt2, lambda: tiny_gpt2(input_ids=IDS))
    s = Replayer(tiny_gpt2).load(inc)
    top = int(tiny_gpt2(input_ids=IDS).logits[0, -1].argmax())
    fix = CausalCCA(n_permutations=9, n_variants=4).search_fix_set(
        s, failure=Failure.token(top), intervention="zero",
        candidates=["blocks.*.resid_post[pos=*]", "blocks.*.attn.z[head=*]"],
        benign=[[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13]])
    assert fix.n_candidates == 3 * 6 + 3 * 4 == fix.exhaustive_forward_passes
    assert fix.flip and fix.one_minimal, fix.reason
    bf = Failure.token(top).bind(s)
    assert bf.value(s.verify(fix.interventions).logits) == fix.metric_after <= 0
    assert fix.side_effects is not None and fix.side_effects.n_incidents == 2
    assert fix.permutation is not None and fix.permutation.n_permutations == 9
    assert len(fix.ranking) == fix.n_candidates
