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
