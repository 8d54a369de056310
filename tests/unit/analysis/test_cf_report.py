"""CFReport views: root-cause candidates (flagged sites in forward order) and first_flagged."""

from __future__ import annotations

from analysis.cf import CFReport, SiteScore, WorstUnit


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
