"""benchmarks/rca_dbc_sites.py and rca_dbc_rules.py: the per-component restoration curve finds
the planted read (tiny GPT-2 whose head ``blocks.2.attn.z[head=1]`` reads a trigger and makes
"HACKED"), and the decision-layer rules over curves pick the layers they say they pick."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from analysis.cca import Failure
from analysis.rca._twins import aligned_tail
from analysis.scenarios.planted import PlantedModel
from tests.unit._bench import load_benchmark
from tests.unit.analysis.test_rca_spans_trace import (  # noqa: F401  (fixtures)
    LAYER,
    TARGET,
    _session,
    case,
    planted,
)


@pytest.fixture(scope="module")
def sites() -> Any:
    return load_benchmark("rca_dbc_sites")


@pytest.fixture(scope="module")
def rules() -> Any:
    return load_benchmark("rca_dbc_rules")


def test_attention_restoration_finds_the_planted_read(
        sites: Any, rules: Any, planted: PlantedModel,  # noqa: F811
        case: tuple[list[int], list[int]]) -> None:  # noqa: F811
    failing, twin = case
    s = _session(planted, failing)
    bound = Failure.token(TARGET, step=0).bind(s)
    row, base, tw = sites.ends(s, bound, twin, resid=True)
    assert base > 0 >= tw and row["decision_layer"] == LAYER and len(row["resid"]) == 4
    _, _, suffix = aligned_tail(failing, twin)
    fmt, half = sites.SITES["attn"]
    curve = sites.site_curve(s, bound, torch.tensor([twin]), suffix, fmt, half, 4,
                             lambda x: (x - tw) / (base - tw))
    # only the planted layer's attention carries the trigger into the tail
    assert curve[LAYER] < 0.1 and all(abs(curve[i] - 1) < 0.1 for i in (0, 1, 3))
    assert rules.first_effect("attn", 0.3)({"attn": curve}) == LAYER
    assert rules.largest_effect("attn")({"attn": curve}) == LAYER
    fmt, half = sites.SITES["attn_w3"]
    window = sites.site_curve(s, bound, torch.tensor([twin]), suffix, fmt, half, 4,
                              lambda x: (x - tw) / (base - tw))
    # every window that contains the planted layer removes it; the first is centred before it
    assert [v < 0.1 for v in window] == [False, True, True, True]
    assert rules.first_effect("attn_w3", 0.3)({"attn_w3": window}) == LAYER - 1


def test_rules_over_curves(rules: Any) -> None:
    row = {"attn": [1.0, 0.95, 0.7, 1.2, 0.4]}
    assert rules.effects(row["attn"]) == pytest.approx([0.0, 0.05, 0.3, 0.0, 0.6])
    assert rules.first_effect("attn", 0.3)(row) == 2
    assert rules.first_effect("attn", 0.5)(row) == 4
    assert rules.first_effect("attn", 0.9)(row) == 4          # none reaches it: the largest
    assert rules.largest_effect("attn")(row) == 4
    curves = {"a": {"attn": [1.0, 0.5, 1.0]}, "b": {"attn": [0.5, 1.0, 1.0]},
              "c": {"attn": [1.0, 1.0, 0.2]}}
    rule = rules.first_effect("attn", 0.3)
    assert rules.consensus(curves, rule) == 1
    ok, n, xs = rules.judge(curves, rule, 1)
    assert (ok, n, xs) == (3, 3, [1, 0, 2])
    assert rules.judge(curves, rule, 3)[0] == 1
    assert set(rules.PREREGISTERED) == {"attn_w3 first >= 0.3", "attn_w3 first >= 0.2"}


def test_paired_comparison_counts_discordant_variants(rules: Any) -> None:
    flat, drop = [1.0] * 30, [1.0] * 23 + [0.0] * 7          # current rule: layer 23
    derive = {"curves": {"d": {"resid": drop, "attn_w3": [1.0] * 22 + [0.5] + [1.0] * 7}}}
    held = {"curves": {"a": {"attn_w3": [1.0] * 22 + [0.5] + [1.0] * 7},    # 22: agrees
                       "b": {"attn_w3": [1.0] * 10 + [0.5] + [1.0] * 19},   # 10: misses
                       "c": {"attn_w3": [1.0] * 22 + [0.5] + [1.0] * 7}}}
    resid = {"curves": {"a": {"resid": drop}, "b": {"resid": drop},
                        "c": {"resid": [1.0] * 10 + [0.0] * 20}, "x": {"resid": flat}}}
    out = rules.paired(derive, held, resid)
    assert out["n"] == 3 and out["current"] == {"reference": 23, "consistent": 2}
    row = out["attn_w3 first >= 0.3"]
    assert (row["consistent"], row["only_this"], row["only_current"], row["both_miss"]) == \
        (2, 1, 1, 0)
    assert row["mcnemar_p"] == 1.0
    assert rules.near(0, 1) and not rules.near(None, 1) and not rules.near(3, 1)
