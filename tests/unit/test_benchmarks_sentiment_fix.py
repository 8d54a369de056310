"""benchmarks/sentiment_fix_explore.py: folds that share no suffix word or review, span masks,
fitted candidates that are portable interventions, the side-effect budget of the pick."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from analysis.scenarios._base import Prompt
from analysis.scenarios.sentiment import SentimentSplit
from tests.unit._bench import load_benchmark


@pytest.fixture(scope="module")
def fx() -> Any:
    return load_benchmark("sentiment_fix_explore")


@pytest.fixture(scope="module")
def ff() -> Any:
    return load_benchmark("sentiment_fix_fit")


class WordTokenizer:
    """One id per whitespace word; [CLS]=0 and [SEP]=1 around it unless told otherwise."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [2 + len(w) for w in text.split()]
        return {"input_ids": [0, *ids, 1] if add_special_tokens else ids}


def _split() -> SentimentSplit:
    tok = WordTokenizer()
    s = SentimentSplit("derivation")
    for i, (fail, ctrl) in enumerate([("down", "tea"), ("tall grey", "wide"), ("down", "cup"),
                                      ("water", "tall"), ("grey", "grey down")]):
        review = f"Review number {i} was good."
        twin = Prompt(id=f"r{i}", text=review, input_ids=tok(review)["input_ids"], label=1,
                      predicted=1)
        s.twins.append(twin)
        for kind, suffix, pred in (("f", fail, 0), ("c", ctrl, 1)):
            text = f"{review} {suffix}"
            p = Prompt(id=f"{kind}{i}", text=text, input_ids=tok(text)["input_ids"], label=1,
                       predicted=pred, counterpart=twin.id, meta={"suffix": suffix})
            (s.failing if kind == "f" else s.controls).append(p)
    s.clean = [Prompt(id=f"k{i}", text="Fine.", input_ids=[0, 7, 1], label=1, predicted=1)
               for i in range(4)]
    return s


def test_folds_share_no_suffix_word_and_no_review(fx: Any) -> None:
    folds = fx._folds(_split())
    words = [{w for g in ("failing", "controls") for p in f[g] for w in p.meta["suffix"].split()}
             for f in folds]
    assert not words[0] & words[1]
    reviews = [{p.counterpart for g in ("failing", "controls") for p in f[g]} for f in folds]
    assert not reviews[0] & reviews[1]
    for f, rev in zip(folds, reviews):
        assert {t.id for t in f["twins"]} == {p.counterpart for p in f["failing"]}
        assert rev <= {t.id for t in f["twins"]}
    assert sum(len(f["clean"]) for f in folds) == 4
    # "tall grey" mixes the folds unless both words landed together; nothing is counted twice
    assert sum(len(f["failing"]) for f in folds) <= 5


def test_span_mask_marks_the_suffix_tokens(ff: Any) -> None:
    tok = WordTokenizer()
    p = _split().failing[1]  # "... good. tall grey"
    mask = ff.span_mask(tok, p)
    assert mask.tolist() == [False] * (len(p.input_ids) - 3) + [True, True, False]
    assert not ff.span_mask(tok, _split().twins[0]).any()


def test_fitted_candidates_are_portable_interventions(ff: Any) -> None:
    from analysis.interventions import check_portable

    tok, split = WordTokenizer(), _split()
    gen = torch.Generator().manual_seed(0)
    acts = {g: {s: [torch.randn(len(p.input_ids), 8, generator=gen) for p in getattr(split, g)]
                for s in ff.SITES} for g in ff.GROUPS}
    masks = {g: [ff.span_mask(tok, p) for p in getattr(split, g)] for g in ff.GROUPS}
    for c in [ff.Candidate("gated", "blocks.1.resid_post", "span", "failing+controls", "d"),
              ff.Candidate("gated", "embed", "span", "failing", "2"),
              ff.Candidate("dom", "blocks.2.resid_post", "cls", "twins", "mean"),
              ff.Candidate("dom", "blocks.2.resid_post", "span", "controls", "steer")]:
        (iv,) = ff.fit(c, acts, masks)
        check_portable(iv)
        assert iv.site == c.site and iv.kind == ("steer" if c.rule == "steer" else "project")
        assert (iv.gate is not None) == (c.family == "gated")
        h = torch.randn(3, 8, generator=gen)
        assert iv.transform(h).shape == (3, 8)


def test_pick_respects_the_side_effect_budget(fx: Any) -> None:
    rows = [{"flip": 0.99, "acc_drop": 0.02, "acc_controls": 1.0, "acc_controls_base": 1.0,
             "kl_clean": 0.0},
            {"flip": 0.9, "acc_drop": 0.0, "acc_controls": 0.9, "acc_controls_base": 1.0,
             "kl_clean": 0.0},
            {"flip": 0.8, "acc_drop": 0.0, "acc_controls": 1.0, "acc_controls_base": 1.0,
             "kl_clean": 0.2},
            {"flip": 0.8, "acc_drop": -0.01, "acc_controls": 0.99, "acc_controls_base": 1.0,
             "kl_clean": 0.1}]
    assert fx.pick(rows) == [rows[3], rows[2]]
    assert all(c.family in ("gated", "dom") for c in fx.candidates())
