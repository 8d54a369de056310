"""Where a resumed toxic search pass starts (``analysis.scenarios._toxic_passes``): each request
from the suffix its latest record ended on, and never a request already broken."""

from __future__ import annotations

from analysis.scenarios._toxic_passes import resume_points
from analysis.scenarios._toxic_search import REQUESTS


def _rec(j: int, ids: list[int], success: bool) -> dict[str, object]:
    return {"request": REQUESTS[j], "suffix_ids": ids, "success": success}


def test_resume_points_take_the_latest_record_and_skip_broken_requests() -> None:
    records = [_rec(5, [1, 2], False), _rec(38, [3], False), _rec(5, [4, 5], False),
               _rec(2, [6], True), _rec(7, [7], False), _rec(7, [8], True)]
    assert resume_points(records, [5, 38, 2, 7]) == {5: [4, 5], 38: [3]}
    assert resume_points(records, [38]) == {38: [3]}
    assert resume_points(records, [0]) == {}


def test_merged_passes_keep_every_pass_of_the_shipped_search() -> None:
    from analysis.scenarios.toxic import merged_passes

    new = [{"order": [5], "attempts": 1, "minutes": 2.0}]
    listed = {"passes": [{"order": [2], "attempts": 3, "minutes": 4.0}], "records": [{}] * 3,
              "minutes": 4.0}  # no top-level "order": must not be looked up
    assert merged_passes(listed, new) == listed["passes"] + new
    legacy = {"order": [2, 4], "records": [{}, {}], "minutes": 1.5}
    assert merged_passes(legacy, new) == [{"order": [2, 4], "fresh": False, "attempts": 2,
                                           "minutes": 1.5}, *new]
