"""benchmarks/isc_eval.py's and provenance_sentiment.py's bookkeeping, on hand-made rows: what
counts as a redundancy call, which misses are named, and the top-k vs random comparison."""

from __future__ import annotations

from typing import Any

import numpy as np

from tests.unit._bench import load_benchmark


def pair(label: str, index: float = -1.0) -> dict[str, Any]:
    return {"a": "s1", "b": "s2", "index": index, "ci": [index - 0.01, index + 0.01],
            "raw": index, "label": label, "needs_both": 1.0 if label == "redundant" else 0.0}


def row(*, flip: bool, label: str | None) -> dict[str, Any]:
    fix = None if label is None else pair(label)
    return {"params": {"arch": "gpt2"}, "planted": ["s1", "s2"], "found": ["s1", "s2"] if flip
            else [], "flip": flip, "reason": "" if flip else "budget spent", "fix": fix,
            "end_to_end": fix is not None and label == "redundant", "truth": pair("redundant"),
            "isc_replays": 4, "search_s": 1.0}


def test_isc_summary_counts_calls_and_names_the_misses() -> None:
    isc = load_benchmark("isc_eval")
    rows = [row(flip=True, label="redundant"), row(flip=True, label="independent"),
            row(flip=False, label=None)]
    controls = [{"params": {"arch": "bert"}, "planted": "s3", "unrelated": pair("independent", 0.0),
                 "same cause": pair("redundant")}]
    text = isc.summarise(rows, controls, "cmd", 60.0)
    assert "| end to end: planted pair in the fix set and called redundant | 1/3 = 33%" in text
    assert "| IS-C on the planted pair itself: called redundant | 3/3 = 100%" in text
    assert "| control pairs (single faults) called redundant | 1/2 = 50%" in text
    assert "#1: fix set ['s1', 's2'], IS-C -1.00 [-1.01, -0.99] independent" in text
    assert "#2: the fix-set search found no set (budget spent)" in text
    assert len(isc.or_specs(6, seed=0)) == 6 and all(
        p["or_fault"] != [p["layer"], p["neuron"]] for p in isc.or_specs(40, seed=1))


def test_provenance_comparison_is_top_minus_random_with_its_rank() -> None:
    prov = load_benchmark("provenance_sentiment")
    top = {"heldout": np.array([1.0, 0.0, 0.0, 1.0])}          # rate 0.5
    rand = [{"heldout": np.array([1.0, 1.0, 1.0, v]), "clean": 0.9, "reviews": 0.9,
             "derivation": 1.0} for v in (0.0, 1.0, 1.0)]       # rates 0.75, 1, 1
    c = prov._compare(top, rand, n_boot=500, seed=0)
    assert c["diff"] == 0.5 - (0.75 + 1 + 1) / 3
    assert c["p"] == 1 / 4                                      # no draw at or below 0.5
    assert c["ci"][0] < c["diff"] < c["ci"][1]        # reviews and draws resampled


def test_class_matched_draws_keep_the_top_ks_label_counts() -> None:
    import torch

    prov = load_benchmark("provenance_sentiment")
    f = type("F", (), {"y_train": torch.tensor([0] * 30 + [1] * 30)})()
    top = [0, 1, 2, 40]                                          # 3 negatives, 1 positive
    for d in prov._random_draws(f, top, 5, matched=True, seed=0):
        assert len(set(d)) == 4 and sum(i >= 30 for i in d) == 1
    uniform = prov._random_draws(f, top, 20, matched=False, seed=0)
    assert all(len(set(d)) == 4 for d in uniform)
    assert {sum(i >= 30 for i in d) for d in uniform} != {1}    # not matched by chance
