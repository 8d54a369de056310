"""IS-C (pairwise Shapley–Taylor interactions among a fix set's components): the estimator on
pure Boolean games with known answers, then on planted-fault models by real replays — the
two-site OR fault is called redundant, a single fault's pair is not, two fixes of one cause are
synergistic — and the result travels in the fix set's JSON, summary and saved file."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from analysis.cca import CausalCCA, FixSet, interaction_indices
from analysis.cca._interactions import pairwise_interactions
from analysis.interventions import Intervention
from tests.unit.analysis._oracles import BooleanOracle
from tests.unit.analysis._planted_case import planted_case
from tests.unit.analysis._planted_specs import BERT_OR, GPT2, GPT2_OR


# ---------------------------------------------------------------- the estimator, known games
def test_or_fault_game_is_redundant_and_an_and_fault_game_synergistic() -> None:
    # fixed iff both 0 and 1 are applied (a two-site OR fault): v = +1, +1, +1, -1
    isc = pairwise_interactions([BooleanOracle(4, [{0, 1}])], [0, 1], sites=["a", "b"])
    (p,) = isc.pairs
    assert (p.index, p.ci, p.label, p.needs_both) == (-1.0, (-1.0, -1.0), "redundant", 1.0)
    assert isc.method == "exact" and isc.coalitions == 4 and isc.forward_passes == 4
    # fixed by either alone (the failure needs both causes): v = +1, -1, -1, -1
    isc = pairwise_interactions([BooleanOracle(4, [{0}, {1}])], [0, 1], sites=["a", "b"])
    assert (isc.pairs[0].index, isc.pairs[0].label, isc.pairs[0].needs_both) == \
        (1.0, "synergistic", 0.0)


def test_a_component_that_does_nothing_is_independent_of_the_others() -> None:
    # candidates 2, 3, 0: the fix is {2, 3} (OR fault); candidate 0 never matters
    isc = pairwise_interactions([BooleanOracle(4, [{2, 3}])], [2, 3, 0], sites=["a", "b", "c"])
    got = {(p.a, p.b): (p.index, p.label) for p in isc.pairs}
    # with n = 3 the pair's index averages delta over S = {} (weight 2/3 * 1/1) and S = {c}
    # (weight 2/3 * 1/2): both -2, so -2 * (2/3 + 1/3) / total effect 2 = -1
    assert got[("a", "b")] == (pytest.approx(-1.0), "redundant")
    assert got[("a", "c")] == (0.0, "independent") and got[("b", "c")] == (0.0, "independent")
    assert isc.coalitions == 8


def test_sampled_estimate_agrees_with_exact_enumeration() -> None:
    # 6 components, fixed when {0,1} or {2,3,4} are all applied: interactions of every size
    oracle = BooleanOracle(6, [{0, 1}, {2, 3, 4}])
    items, sites = list(range(6)), [f"s{i}" for i in range(6)]
    exact = pairwise_interactions([oracle], items, sites=sites, max_exact=6)
    sampled = pairwise_interactions([BooleanOracle(6, [{0, 1}, {2, 3, 4}])], items,
                                    sites=sites, max_exact=1, n_permutations=600, seed=3)
    assert exact.method == "exact" and sampled.method == "sampled"
    assert sampled.n_permutations == 600
    for e, s in zip(exact.pairs, sampled.pairs):
        assert (e.a, e.b) == (s.a, s.b)
        assert e.index is not None and s.index is not None and s.ci is not None
        assert abs(e.index - s.index) < 0.08, (e, s)
        assert s.ci[0] <= s.index <= s.ci[1]
        # sampling uncertainty where there is something to sample (s5 is a null player)
        assert (s.ci[1] - s.ci[0] > 0) == ("s5" not in (s.a, s.b)), s
    assert any(abs(p.index or 0.0) > 0.1 for p in exact.pairs)  # the game does interact


def test_interval_pools_inputs_and_labels_only_what_it_excludes() -> None:
    # two inputs that disagree (one redundant, one synergistic): no call either way
    isc = pairwise_interactions([BooleanOracle(2, [{0, 1}]), BooleanOracle(2, [{0}, {1}])],
                                [0, 1], sites=["a", "b"], n_bootstrap=500)
    p = isc.pairs[0]
    assert p.index == 0.0 and p.ci is not None and p.ci[0] < -0.2 and p.ci[1] > 0.2
    assert p.label == "inconclusive" and p.needs_both == 0.5 and isc.n_inputs == 2
    with pytest.raises(ValueError, match=">= 2 components"):
        pairwise_interactions([BooleanOracle(2, [{0}])], [0], sites=["a"])


# ---------------------------------------------------------------- planted models, real replays
@pytest.mark.parametrize("spec", [GPT2_OR, BERT_OR], ids=["gpt2-or", "bert-or"])
def test_the_fix_set_of_a_planted_or_fault_is_called_redundant(spec: dict[str, Any],
                                                                tmp_path: Path) -> None:
    c = planted_case(spec)
    pm, session, failure, variants = c.pm, c.session, c.failure, c.variants
    fix = CausalCCA(n_permutations=0).search_fix_set(
        session, benign=c.benign, baseline=c.baseline, failure=failure, variants=variants,
        candidates=["blocks.*.mlp.post[neuron=*]"], intervention="mean")
    assert sorted(fix.sites) == sorted(pm.fault_sites)
    isc = fix.interactions
    assert isc is not None and isc.n_inputs == 1 + len(variants) and isc.method == "exact"
    (p,) = isc.pairs
    assert p.label == "redundant" and p.needs_both == 1.0
    assert p.index is not None and p.ci is not None and p.ci[1] < -0.5
    assert isc.forward_passes > 0 and fix.statistics_forward_passes >= isc.forward_passes
    # the replays behind it: each alone leaves the failure, both remove it (batch 1)
    bound = failure.bind(session)
    one = [bound.value(session.verify([iv]).logits) for iv in fix.interventions]
    assert all(m > 0 for m in one) and fix.metric_after is not None and fix.metric_after <= 0
    # serialised with the fix set, shown in its summary, kept in a saved fix file
    d = json.loads(json.dumps(fix.to_dict(), allow_nan=False))
    assert d["interactions"]["pairs"][0]["label"] == "redundant"
    assert "redundant" in fix.summary()
    loaded = FixSet.load(fix.save(tmp_path / "fix.json"))
    assert loaded.derivation is not None
    assert loaded.derivation["interactions"]["pairs"][0]["label"] == "redundant"


def test_pairs_around_a_single_planted_fault_are_not_called_redundant() -> None:
    c = planted_case(GPT2)
    pm, session, base, failure, variants = c.pm, c.session, c.baseline, c.failure, c.variants
    (site,) = pm.fault_sites                  # blocks.2.mlp.post[neuron=17]
    planted = Intervention(site, "mean", donor=base)
    # an unrelated neuron beside the cause: effects add up
    isc = interaction_indices(session, [planted, Intervention("blocks.0.mlp.post[neuron=3]",
                                                              "mean", donor=base)],
                              failure=failure, variants=variants)
    (p,) = isc.pairs
    assert p.label == "independent" and p.needs_both == 0.0 and isc.n_inputs == 7
    assert p.index is not None and abs(p.index) < 0.05
    # two fixes of the one cause (the neuron, the whole MLP output of its layer): either alone
    # removes the failure, so the index is positive — synergistic, never redundant
    isc = interaction_indices(session, [planted, Intervention("blocks.2.mlp", "zero")],
                              failure=failure, variants=variants)
    (p,) = isc.pairs
    assert p.label == "synergistic" and p.needs_both == 0.0
    assert p.index is not None and p.index > 0.2 and not math.isnan(p.raw)
