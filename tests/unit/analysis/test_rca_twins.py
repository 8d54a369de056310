"""Benign twins: an inserted span is preferred; a replaced (shorter) span is the fallback."""

from __future__ import annotations

import torch

from analysis.rca._twins import find_twin
from integrations.incident import Incident, TensorRecord, new_manifest


def _inc(ids: list[int], name: str) -> Incident:
    return Incident.from_records(new_manifest(id=name), [
        TensorRecord("input", "input_ids", "", 0, torch.tensor([ids]))])


def test_insertion_twin_first_then_replacement() -> None:
    failing = _inc([1, 2, 3, 50, 51, 52, 53, 4, 5, 6], "f")
    inserted = _inc([1, 2, 3, 4, 5, 6], "ins")
    replaced = _inc([1, 2, 3, 60, 4, 5, 6], "rep")
    unrelated = _inc([9, 9, 9, 9], "x")
    assert find_twin(failing, [replaced, inserted, unrelated]) == [1, 2, 3, 4, 5, 6]
    assert find_twin(failing, [replaced, unrelated]) == [1, 2, 3, 60, 4, 5, 6]
    assert find_twin(failing, [unrelated]) is None
    # a prompt that is only a prefix (an earlier model call's) loses to a replaced span that
    # shares more, and to an insertion with a shared tail
    prefix = _inc([1, 2, 3, 50], "prefix")
    assert find_twin(failing, [prefix, replaced]) == [1, 2, 3, 60, 4, 5, 6]
    assert find_twin(failing, [prefix, inserted]) == [1, 2, 3, 4, 5, 6]
    # a replacement with no shared tail cannot be aligned
    assert find_twin(failing, [_inc([1, 2, 3, 60, 61], "notail")]) is None
