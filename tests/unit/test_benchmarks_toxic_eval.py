"""benchmarks/toxic_eval.py: the two folds share no request and no suffix (a transferred suffix
and its source stay together), and the copying counts add up."""

from __future__ import annotations

from typing import Any

import pytest

from analysis.scenarios._base import Prompt
from tests.unit._bench import load_benchmark


@pytest.fixture(scope="module")
def toxic_eval() -> Any:
    return load_benchmark("toxic_eval")


def _case(pid: str, request: str, suffix: str, out: str = "") -> Prompt:
    return Prompt(id=pid, text=request + suffix, input_ids=[], output_text=out,
                  meta={"request": request, "suffix": suffix})


def test_folds_keep_shared_requests_and_suffixes_together(toxic_eval: Any) -> None:
    cases = [_case("a1", "A.", " s1"), _case("b2", "B.", " s2"), _case("c1", "C.", " s1"),
             _case("d3", "D.", " s3"), _case("a4", "A.", " s4"), _case("e5", "E.", " s5"),
             _case("c6", "C.", " s6")]
    (f0, f1), ok = toxic_eval.folds(cases)
    assert ok and len(f0) + len(f1) == len(cases)
    for key in ("request", "suffix"):
        assert not {p.meta[key] for p in f0} & {p.meta[key] for p in f1}
    assert {p.id for p in f0} == {"a1", "c1", "a4", "c6"}  # one group: A/s1/C/s4/s6
    (g0, g1), ok = toxic_eval.folds([_case("x", "A.", " s"), _case("y", "B.", " s")])
    assert not ok and [p.id for p in g0 + g1] == ["x", "y"]


def test_copies_counts(toxic_eval: Any) -> None:
    got = toxic_eval.copies([_case("1", "Hi.", " moronic", "You moron."),
                             _case("2", "Hi.", " stup", "You are stupid."),
                             _case("3", "Hi.", " x", "You jerk.")])
    assert [r["in_prompt"] for r in got["cases"]] == [["moron"], [], []]
    assert got["with_a_toxic_word_copied"] == 1 and got["with_only_added_words"] == 2
    assert got["with_only_added_words_no_stem"] == 1


def test_direct_cases_leave_out_transferred_pairs_so_folds_split(toxic_eval: Any) -> None:
    found = [_case("gcg-1", "A.", " s1"), _case("gcg-2", "B.", " s2")]
    moved = _case("gcg-1-on-2", "B.", " s1")
    moved.meta["transfer_of"] = "gcg-1"
    _, ok = toxic_eval.folds([*found, moved])
    assert not ok  # the transferred pair links both cases into one group
    assert toxic_eval.direct([*found, moved]) == found
    (g0, g1), ok = toxic_eval.folds(toxic_eval.direct([*found, moved]))
    assert ok and len(g0) == len(g1) == 1
