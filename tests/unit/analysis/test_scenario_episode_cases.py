"""What the episode scenarios share, without a model: a hit is kept only when it fails at batch 1
and its twin does not (with the reason for every rejection), and a shipped case that no longer
reproduces is dropped on load; the multiturn check of a reply is programmatic."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from analysis.scenarios._conversation import Constraint
from analysis.scenarios._episode_cases import confirm, find_case, reverify


@dataclass
class _Case:
    id: str
    counterpart: str | None
    episode: dict[str, Any] = field(default_factory=dict)


#: what "running" each case yields now: fails or not
OUTCOME = {"a": True, "b": False, "c": True, "tw1": False, "tw2": True}


def _run(c: _Case) -> dict[str, Any]:
    return {"fails": OUTCOME[c.id], "new_ids": [[len(c.id)]]}


def test_confirm_keeps_hits_whose_twin_does_not_fail() -> None:
    twins = {"tw1": _Case("tw1", None), "tw2": _Case("tw2", None)}
    hits = [_Case("a", "tw1"), _Case("b", "tw1"), _Case("c", "tw2")]
    failing, benign, rejected = confirm(hits, twins, run=_run, fails=lambda e: e["fails"],
                                        t0=time.perf_counter(), budget_s=60, max_cases=10)
    assert [c.id for c in failing] == ["a"] and [c.id for c in benign] == ["tw1"]
    assert {r["id"]: r["why"] for r in rejected} == {
        "b": "does not fail at batch 1", "c": "its benign twin fails too"}
    assert failing[0].episode == {"fails": True, "new_ids": [[1]]}
    capped = confirm([_Case("a", "tw1"), _Case("a2", "tw1")], twins, run=_run,
                     fails=lambda e: e["fails"], t0=time.perf_counter(), budget_s=60,
                     max_cases=1)
    assert capped[2] == [{"id": "a2", "why": "not checked: budget or max_cases reached"}]


@dataclass
class _Scenario:
    failing: list[_Case]
    benign: list[_Case]
    now: dict[str, list[list[int]]]
    dropped: list[tuple[str, str]] = field(default_factory=list)

    def verify(self, cases: Sequence[_Case]) -> list[bool]:
        return [self.now[c.id] == c.episode["new_ids"] for c in cases]

    def twin(self, case: _Case) -> _Case | None:
        return next((b for b in self.benign if b.id == case.counterpart), None)


def test_reverify_drops_what_no_longer_reproduces() -> None:
    sc = _Scenario([_Case("a", "t", {"new_ids": [[1]]}), _Case("b", "t", {"new_ids": [[2]]})],
                   [_Case("t", None, {"new_ids": [[3]]})], now={"a": [[1]], "b": [[9]],
                                                              "t": [[3]]})
    reverify(sc, verify=2, seed=0)
    assert sc.dropped == [("b", "re-run differs from the shipped episode")]
    assert [c.id for c in sc.failing] == ["a"] and find_case(sc, "t").id == "t"


def test_constraint_check_is_a_whole_word_match_in_any_case() -> None:
    c = Constraint("city", "never mention Paris", "Paris", ("capital of France?",), "Italy?")
    assert c.broken_in(["Sure.", "The capital of France is paris.", "Parisian food"]) == [1]
    code = Constraint("code", "code 4417", "4417", (), "")
    assert code.broken_in(["It is 4417.", "44178", "code: 4417"]) == [0, 2]
