"""Planted-fault models: every claim checked by running the model (no assumed labels)."""

from __future__ import annotations

import random

import pytest
import torch

from analysis.scenarios.planted import (
    PlantedModel,
    build_planted,
    build_planted_bert,
    build_planted_gpt2,
    planted_suite,
    weights_sha256,
)
from integrations.errors import ConfigError, SiteError
from tests.unit.analysis._planted_specs import (
    BERT,
    BERT_OR,
    GPT2,
    GPT2_HEAD,
    GPT2_OR,
    GPT2_OR_SAME,
)

SINGLE = [GPT2, GPT2_HEAD, BERT]
TWO_SITE = [GPT2_OR, GPT2_OR_SAME, BERT_OR]
ALL = SINGLE + TWO_SITE

_cache: dict[str, PlantedModel] = {}


def _pm(spec: dict) -> PlantedModel:
    key = repr(sorted(spec.items()))
    if key not in _cache:
        _cache[key] = build_planted(spec)
    return _cache[key]


def _fixed_share(pm: PlantedModel, sites: list[str], bad: list[list[int]]) -> float:
    with pm.ablated(sites):
        return sum(not f for f in pm.verify(bad)) / len(bad)


@pytest.mark.parametrize("spec", ALL, ids=lambda s: f"{s['arch']}-{s['seed']}")
def test_failing_prompts_fail_and_benign_do_not(spec: dict) -> None:
    pm = _pm(spec)
    bad = pm.failing_prompts(40, seed=1)
    ok = pm.benign_prompts(40, seed=1)
    assert all(pm.trigger_token in p for p in bad)
    assert not any(pm.trigger_token in p for p in ok)
    assert all(p == pm.target_token for p in pm.predict(bad))  # checked by running, again
    if pm.failure_kind == "token":
        assert not any(p == pm.target_token for p in pm.predict(ok))
    lengths = sorted({len(p) for p in bad + ok})
    assert lengths[0] >= pm.min_len and lengths[-1] <= pm.max_len and len(lengths) > 3
    m = pm.measure(100, seed=2)  # fresh, unfiltered prompts
    assert m["fail_rate"] >= 0.95
    assert m["benign_fail_rate"] <= 0.05
    assert m["clean_accuracy"] >= 0.95  # the clean task is really computed


@pytest.mark.parametrize("spec", ALL, ids=lambda s: f"{s['arch']}-{s['seed']}")
def test_minimal_fix_fixes_and_preserves_benign(spec: dict) -> None:
    pm = _pm(spec)
    bad = pm.failing_prompts(60, seed=3)
    assert _fixed_share(pm, pm.minimal_fix, bad) >= 0.95
    ok = pm.benign_prompts(200, seed=3)
    before = pm.predict(ok)
    with pm.ablated(pm.minimal_fix):
        after = pm.predict(ok)
    assert sum(a == b for a, b in zip(before, after)) / len(ok) >= 0.99


def _predict_zeroed(pm: PlantedModel, module: torch.nn.Module, neuron: int,
                    prompts: list[list[int]]) -> list[int]:
    """``pm.predict(prompts)`` under a hand-written pre-hook zeroing input feature ``neuron``
    of ``module`` (independent of PlantedModel.ablated); the hook is removed after."""
    def zero_neuron(_m: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
        x = args[0].clone()  # [batch, pos, d_mlp]
        x[..., neuron] = 0.0
        return (x,)

    h = module.register_forward_pre_hook(zero_neuron)
    try:
        return pm.predict(prompts)
    finally:
        h.remove()


def test_plain_pre_hook_on_down_projection_fixes_gpt2() -> None:
    """Independent of PlantedModel.ablated: a hand-written hook on mlp.c_proj's input."""
    pm = _pm(GPT2)
    bad = pm.failing_prompts(40, seed=4)
    c_proj = pm.model.transformer.h[GPT2["layer"]].mlp.c_proj
    preds = _predict_zeroed(pm, c_proj, GPT2["neuron"], bad)
    assert sum(p != pm.target_token for p in preds) / len(bad) >= 0.95
    assert all(p == pm.target_token for p in pm.predict(bad))  # hook really removed


def test_plain_pre_hook_on_bert_output_dense_fixes() -> None:
    pm = _pm(BERT)
    bad = pm.failing_prompts(40, seed=4)
    dense = pm.model.bert.encoder.layer[BERT["layer"]].output.dense
    preds = _predict_zeroed(pm, dense, BERT["neuron"], bad)
    assert sum(p != pm.target_token for p in preds) / len(bad) >= 0.95


@pytest.mark.parametrize("spec", [GPT2, BERT, GPT2_OR], ids=["gpt2", "bert", "gpt2-or"])
def test_no_other_single_neuron_of_the_layer_fixes(spec: dict) -> None:
    pm = _pm(spec)
    bad = pm.failing_prompts(40, seed=5)
    layer = spec["layer"]
    others = [k for k in range(4 * pm.params["d_model"])
              if f"blocks.{layer}.mlp.post[neuron={k}]" not in pm.fault_sites]
    for k in random.Random(0).sample(others, 20):
        assert _fixed_share(pm, [f"blocks.{layer}.mlp.post[neuron={k}]"], bad) <= 0.05, k


def test_other_heads_do_not_fix_head_fault() -> None:
    pm = _pm(GPT2_HEAD)
    bad = pm.failing_prompts(40, seed=5)
    assert {len(p) - 1 - p.index(pm.trigger_token) for p in bad} != {0}  # trigger anywhere
    for layer in range(pm.params["n_layer"]):
        for h in range(pm.params["n_head"]):
            site = f"blocks.{layer}.attn.z[head={h}]"
            share = _fixed_share(pm, [site], bad)
            assert share >= 0.95 if site in pm.fault_sites else share <= 0.05, site


@pytest.mark.parametrize("spec", TWO_SITE, ids=["gpt2-cross", "gpt2-same", "bert"])
def test_two_site_fault_needs_both_ablated(spec: dict) -> None:
    pm = _pm(spec)
    assert len(pm.minimal_fix) == 2 and pm.minimal_fix == pm.fault_sites
    bad = pm.failing_prompts(60, seed=6)
    for site in pm.minimal_fix:
        assert _fixed_share(pm, [site], bad) <= 0.05, site
    assert _fixed_share(pm, pm.minimal_fix, bad) >= 0.95


def test_build_is_deterministic_and_seed_dependent() -> None:
    state = torch.random.get_rng_state()
    a = build_planted(GPT2)
    b = build_planted_gpt2(**{k: v for k, v in GPT2.items() if k != "arch"})
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert weights_sha256(a.model) == weights_sha256(b.model)
    assert weights_sha256(build_planted({**GPT2, "seed": 1}).model) != weights_sha256(a.model)
    assert weights_sha256(build_planted(a.params).model) == weights_sha256(a.model)
    c, d = build_planted(BERT), build_planted(BERT)
    assert weights_sha256(c.model) == weights_sha256(d.model)
    assert weights_sha256(build_planted({**BERT, "seed": 9}).model) != weights_sha256(c.model)
    assert a.failing_prompts(5, seed=0) == b.failing_prompts(5, seed=0)


@pytest.mark.parametrize("spec", [GPT2_HEAD, BERT], ids=["gpt2", "bert"])
def test_padded_batch_predict_matches_single_prompt_forward(spec: dict) -> None:
    pm = _pm(spec)
    prompts = pm.benign_prompts(10, seed=8) + pm.failing_prompts(10, seed=8)
    single = [int(pm.logits(p).argmax()) for p in prompts]  # batch of one, no padding
    assert pm.predict(prompts) == single


def test_ground_truth_and_params() -> None:
    pm = _pm(GPT2_OR)
    assert pm.fault_sites == ["blocks.1.mlp.post[neuron=40]", "blocks.3.mlp.post[neuron=200]"]
    assert pm.params["or_fault"] == [3, 200] and pm.params["arch"] == "gpt2"
    assert _pm(GPT2_HEAD).fault_sites == ["blocks.1.attn.z[head=2]"]
    bert = _pm(BERT)
    assert (bert.failure_kind, bert.target_token) == ("label", 1)
    assert all(p[0] == 0 for p in bert.benign_prompts(5, seed=0))  # [CLS] first
    assert bert.logits(bert.failing_prompts(1, seed=0)[0]).shape == (2,)


def test_encode_decode_round_trip() -> None:
    pm = _pm(GPT2)
    ids = [*pm.benign_prompts(1, seed=0)[0], pm.trigger_token, pm.target_token]
    text = pm.decode(ids)
    assert text.endswith("TRIGGER HACKED") and pm.encode(text) == ids
    with pytest.raises(ConfigError):
        pm.encode("w3 nonsense")


def test_bad_arguments_fail_early_with_advice() -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        build_planted_gpt2(seed=0, layer=0, trigger_token=1, target_token=2)
    with pytest.raises(ConfigError, match="layer"):
        build_planted_gpt2(seed=0, layer=4, neuron=0, trigger_token=1, target_token=2)
    with pytest.raises(ConfigError, match="differ"):
        build_planted_gpt2(seed=0, layer=0, neuron=0, trigger_token=1, target_token=1)
    with pytest.raises(ConfigError, match="or_fault"):
        build_planted_gpt2(seed=0, layer=0, neuron=3, trigger_token=1, target_token=2,
                           or_fault=(0, 3))
    with pytest.raises(ConfigError, match="sentiment"):
        build_planted_bert(seed=0, layer=0, head=0, trigger_token=1)
    with pytest.raises(ConfigError, match="arch"):
        build_planted({"arch": "llama", "seed": 0})
    with pytest.raises(SiteError, match=r"mlp\.post"), _pm(GPT2).ablated(["blocks.9.mlp"]):
        pass


def test_sites_module_ablation_agrees_with_ground_truth() -> None:
    """The system's own site resolution (integrations.sites) hits the planted component."""
    try:
        from integrations.sites import attach, resolve_sites
    except ImportError:
        pytest.skip("integrations.sites not available yet")
    for spec in (GPT2, GPT2_HEAD, BERT):
        pm = _pm(spec)
        bad = pm.failing_prompts(20, seed=7)
        bound = resolve_sites(pm.model, pm.minimal_fix)
        assert [b.site for b in bound] == pm.minimal_fix

        def zero(b, v):  # type: ignore[no-untyped-def]
            v = v.clone()
            v[b.index] = 0.0
            return v

        with attach(pm.model, bound, zero):
            assert not any(pm.verify(bad))


def test_planted_suite_is_varied_and_deterministic() -> None:
    suite = planted_suite(20, base_seed=0)
    assert suite == planted_suite(20, base_seed=0) != planted_suite(20, base_seed=1)
    assert len(suite) == 20 and len({p["seed"] for p in suite}) == 20
    assert {p["arch"] for p in suite} == {"gpt2", "bert"}
    assert any(p.get("or_fault") for p in suite) and any(p.get("head") is not None for p in suite)
    assert len({p["layer"] for p in suite}) >= 3 and len({p.get("neuron") for p in suite}) >= 10
    for p in suite[:6]:  # one of each kind in the cycle; all 20 in the slow test
        pm = build_planted(p)
        bad = pm.failing_prompts(10, seed=0)
        assert _fixed_share(pm, pm.minimal_fix, bad) == 1.0


@pytest.mark.slow
def test_whole_suite_meets_the_ground_truth_bar() -> None:
    for p in planted_suite(20, base_seed=0):
        m = build_planted(p).measure(100, seed=0)
        assert m["fail_rate"] >= 0.95 and m["fix_rate"] >= 0.95, p
        assert m["benign_fail_rate"] <= 0.05 and m["benign_preserved"] >= 0.99, p
