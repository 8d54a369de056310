"""CFReport views: root-cause candidates (flagged sites: onsets, then echoes, in forward order)
and first_flagged."""

from __future__ import annotations

import pytest
import torch

from analysis.cf import (
    DEFAULT_DETECTOR,
    ONSET_RATIO,
    CFReport,
    SiteScore,
    WorstUnit,
    default_detector,
    detector_class,
)
from analysis.scenarios.planted import build_planted
from integrations.errors import AnalysisError
from integrations.incident import Incident
from tests.unit.analysis._planted_specs import BERT, DETECTOR_SITES
from tests.unit.analysis._traced import traced


def _site(name: str, score: float, threshold: float = 2.0) -> SiteScore:
    w = WorstUnit(kind="last", bucket=0, step=0, position=3, value=1.0, z=score)
    return SiteScore(site=name, score=score, stat=score, p=0.5, q=0.5,
                     flagged=score >= threshold, significant=False, n_units=4, worst=w)


def _report(scores: dict[str, float], order: list[str]) -> CFReport:
    sites = {s: _site(s, v) for s, v in scores.items()}
    ranked = sorted(((s, v) for s, v in scores.items()), key=lambda t: (-t[1], t[0]))
    return CFReport(detector="mahalanobis", incident_id="i", score=9.0, flagged=True,
                    threshold=2.0, fdr=0.05, sites=sites, ranked_sites=ranked,
                    baseline_samples=50, model_fingerprint="fp", execution_order=order)


def test_candidates_follow_the_forward_pass_not_the_score() -> None:
    order = ["embed", "blocks.0.mlp.post", "blocks.0.mlp", "blocks.0.resid_post",
             "blocks.1.resid_post"]
    rep = _report({"embed": 0.3, "blocks.0.mlp.post": 2.5, "blocks.0.mlp": 400.0,
                   "blocks.0.resid_post": 30.0, "blocks.1.resid_post": 1.9}, order)
    # by score the cause is third; in forward order it is first, unflagged sites are left out
    assert [s for s, _ in rep.ranked_sites][:3] == ["blocks.0.mlp", "blocks.0.resid_post",
                                                    "blocks.0.mlp.post"]
    assert rep.root_cause_candidates == ["blocks.0.mlp.post", "blocks.0.mlp",
                                         "blocks.0.resid_post"]
    assert rep.first_flagged == "blocks.0.mlp.post"
    d = rep.to_dict()
    assert d["root_cause_candidates"] == rep.root_cause_candidates
    assert d["first_flagged"] == "blocks.0.mlp.post"


def test_candidates_without_execution_order_fall_back_to_score_and_none_when_clean() -> None:
    rep = _report({"a": 5.0, "b": 3.0, "c": 1.0}, order=[])
    assert rep.root_cause_candidates == ["a", "b"]  # old reports: flagged sites by score
    assert rep.first_flagged == "a"
    partial = _report({"a": 5.0, "b": 3.0}, order=["b"])  # a site missing from the order
    assert partial.root_cause_candidates == ["b", "a"]
    clean = _report({"a": 1.0, "b": 0.5}, order=["a", "b"])
    assert clean.root_cause_candidates == [] and clean.first_flagged is None


def test_weak_echoes_of_an_upstream_anomaly_follow_the_onsets() -> None:
    # As measured on planted BERT faults: the trigger token is unusual input (layer 0's pooling
    # head carries it), it echoes weakly through the next sites, then the planted neuron fires.
    order = ["embed", "blocks.0.attn.z", "blocks.0.attn", "blocks.1.attn.z", "blocks.1.attn",
             "blocks.2.attn", "blocks.3.mlp.post", "blocks.3.mlp", "blocks.3.resid_post"]
    scores = [0.5, 164.0, 2.9, 4.8, 8.5, 5.0, 9317.0, 1.06e6, 5.0]
    rep = _report(dict(zip(order, scores)), order)
    assert rep.root_cause_candidates == [
        "blocks.0.attn.z", "blocks.3.mlp.post", "blocks.3.mlp",           # onsets
        "blocks.0.attn", "blocks.1.attn.z", "blocks.1.attn", "blocks.2.attn",
        "blocks.3.resid_post"]                                            # echoes
    assert rep.first_flagged == "blocks.0.attn.z"
    # plain forward order (ratio 0) puts the planted site seventh; every flagged site is kept
    plain = rep.candidates(onset_ratio=0.0)
    assert plain == [s for s in order if rep.sites[s].flagged] and plain.index(
        "blocks.3.mlp.post") == 5
    assert sorted(plain) == sorted(rep.root_cause_candidates)
    # an onset needs ONSET_RATIO (0.25) of the largest score upstream: here 0.25 * 164 = 41
    near = _report({"a": 164.0, "b": 0.9 * 164.0, "c": 1000.0}, ["a", "b", "c"])
    assert ONSET_RATIO == 0.25 and near.root_cause_candidates == ["a", "b", "c"]
    assert near.candidates(onset_ratio=1.0) == ["a", "c", "b"]
    with pytest.raises(AnalysisError, match="onset_ratio"):
        rep.candidates(onset_ratio=1.5)


@pytest.mark.slow
def test_the_default_detector_names_a_planted_bert_neuron_among_its_first_candidates() -> None:
    # On planted BERT the trigger token is itself unusual input: layer 0's pooling head is
    # flagged first, and its weak echoes used to push the planted neuron out of the first three
    pm = build_planted(BERT)

    def record(ids: list[int]) -> Incident:
        return traced(pm.model, lambda: pm.model(input_ids=torch.tensor([ids])),
                      sites=DETECTOR_SITES)

    base = [record(p) for p in pm.benign_prompts(50, seed=31)]
    det = default_detector(baseline=detector_class(DEFAULT_DETECTOR).build_baseline(base))
    planted = pm.fault_sites[0].split("[", 1)[0]  # blocks.2.mlp.post
    for p in pm.failing_prompts(8, seed=32):
        rep = det.analyze(record(p))
        assert rep.flagged and planted in rep.root_cause_candidates[:3], rep.sites
