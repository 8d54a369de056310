"""The sentiment scenario's data: derivation and held-out splits disjoint by review and suffix,
enough cases in each, and (slow) labels that reproduce by running MiniLM at batch 1."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from typing import Any

import pytest

from analysis.scenarios import sentiment
from analysis.scenarios._base import DATA_DIR
from analysis.scenarios._sentiment_pools import LEFT_OUT_ADJECTIVES, POOL_NAMES, make_pools

GROUPS = ("failing", "controls", "twins", "clean")


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DATA_DIR / sentiment.DATA_FILE).read_text())
    return data


def _of(doc: dict[str, Any], group: str, split: str) -> list[dict[str, Any]]:
    return [d for d in doc[group] if d["meta"]["split"] == split]


def test_pools_share_no_vocabulary_and_are_deterministic() -> None:
    pools = make_pools(seed=0)
    d, h = pools["derivation"], pools["heldout"]
    for key in ("pos_adj", "neg_adj", "nouns", "templates", "suffix_words"):
        a, b = getattr(d, key), getattr(h, key)
        assert a and b and not set(a) & set(b), key
    assert not set(d.all_reviews()) & set(h.all_reviews())
    assert make_pools(seed=0) == pools
    trained = {t for t, _ in sentiment.make_reviews(seed=0)["train"]}
    assert not trained & {t for p in pools.values() for t, _ in p.all_reviews()}
    assert not set(LEFT_OUT_ADJECTIVES) & {a for p in pools.values()
                                           for a in p.pos_adj + p.neg_adj}
    rows = d.reviews(random.Random(0), 10)
    assert sorted(lab for _, lab in rows) == [0] * 5 + [1] * 5 and len(set(rows)) == 10


def test_shipped_counts_per_split(doc: dict[str, Any]) -> None:
    for split in POOL_NAMES:
        assert len(_of(doc, "failing", split)) >= 80, split
        assert len(_of(doc, "controls", split)) >= 80, split
    clean = _of(doc, "clean", "heldout")
    assert sum(c["predicted"] == c["label"] for c in clean) >= 100
    assert doc["search"].keys() == set(POOL_NAMES)
    assert doc["pools"] == {n: p.to_json() for n, p in make_pools(seed=doc["seed"]).items()}


def test_every_case_has_its_twin_and_a_suffix_of_its_pools_words(doc: dict[str, Any]) -> None:
    for split in POOL_NAMES:
        words = set(doc["pools"][split]["suffix_words"])
        twins = {t["id"]: t for t in _of(doc, "twins", split)}
        assert all(t["predicted"] == t["label"] for t in twins.values())
        for group, wrong in (("failing", True), ("controls", False)):
            for p in _of(doc, group, split):
                twin = twins[p["counterpart"]]
                suffix = p["meta"]["suffix"]
                assert p["text"] == f"{twin['text']} {suffix}" == f"{p['meta']['base_text']} " \
                    f"{suffix}"
                assert set(suffix.split()) <= words and p["label"] == twin["label"]
                assert (p["predicted"] != p["label"]) is wrong
                assert (p["meta"]["p_wrong"] > 0.5) is wrong


def test_heldout_shares_no_review_and_no_suffix_with_derivation(doc: dict[str, Any]) -> None:
    def reviews(split: str) -> set[str]:
        return {d["text"] for g in ("twins", "clean") for d in _of(doc, g, split)} | {
            d["meta"]["base_text"] for g in ("failing", "controls") for d in _of(doc, g, split)}

    def suffixes(split: str) -> set[str]:
        return {d["meta"]["suffix"] for g in ("failing", "controls") for d in _of(doc, g, split)}

    assert not reviews("derivation") & reviews("heldout")
    assert not suffixes("derivation") & suffixes("heldout")
    words = [{w for s in suffixes(n) for w in s.split()} for n in POOL_NAMES]
    assert not words[0] & words[1]
    ids = [d["id"] for g in GROUPS for d in doc[g]]
    assert len(ids) == len(set(ids))
    # clean reviews are never twins: accuracy is measured on reviews the search never touched
    for split in POOL_NAMES:
        assert not {d["text"] for d in _of(doc, "clean", split)} & {
            d["text"] for d in _of(doc, "twins", split)}


def test_importing_the_scenario_does_not_load_torch() -> None:
    code = ("import sys, analysis.scenarios.sentiment as s; "
            "assert 'torch' not in sys.modules, 'torch imported'; print(s.DATA_FILE)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stderr


# --------------------------------------------------------------------------- real model


@pytest.mark.slow
@pytest.mark.real_model
def test_build_exposes_splits_whose_labels_reproduce_at_batch_1(doc: dict[str, Any]) -> None:
    sc = sentiment.build(seed=0, n_failing=4, n_controls=4, n_clean=6)
    assert sc.dropped == [], sc.dropped
    parts = sentiment.splits(sc)
    assert list(parts) == list(POOL_NAMES)
    for name, part in parts.items():
        assert (len(part.failing), len(part.controls), len(part.clean)) == (4, 4, 6)
        assert all(p.meta["split"] == name for g in GROUPS for p in getattr(part, g))
        assert sc.verify(part.failing) == [True] * 4
        assert sc.verify(part.controls) == [False] * 4
        assert sc.verify(part.twins) == [False] * len(part.twins)
        assert sc.verify(part.clean) == [p.predicted != p.label for p in part.clean]
        for p in part.failing + part.controls:
            twin = part.twin(p)
            assert twin is not None and p.text.startswith(twin.text + " ")
    assert {p.id for p in sc.failing} == {p.id for part in parts.values() for p in part.failing}
    # a random sample of every group, labelled again with the plain batch-1 predict()
    rng = random.Random(1)
    sample = [d for g in GROUPS for d in rng.sample(doc[g], 5)]
    preds = sentiment.predict(sc.model, sc.tokenizer, [d["text"] for d in sample], batch_size=1)
    assert [p for p, _ in preds] == [d["predicted"] for d in sample]


@pytest.mark.slow
@pytest.mark.real_model
def test_discover_searches_both_pools() -> None:
    out = sentiment.discover(write=False, n_failing=2, n_clean=2)
    for split in POOL_NAMES:
        assert len(_of(out, "failing", split)) >= 2 and len(_of(out, "clean", split)) == 2
        assert out["search"][split]["reviews_searched"] >= 2
