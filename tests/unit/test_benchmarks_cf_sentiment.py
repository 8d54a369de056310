"""benchmarks/cf_sentiment.py on the real MiniLM-L6 scenario: groups labelled by running the
model inside each recorded request, the sharper group built, and the report renders."""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit._bench import load_benchmark


@pytest.fixture(scope="module")
def cf_sentiment() -> Any:
    return load_benchmark("cf_sentiment")


@pytest.mark.slow
def test_sentiment_records_labels_and_evaluates(cf_sentiment: Any) -> None:
    j = cf_sentiment.sentiment(12, 12, ["norm"], n_suffixed=6, n_failing=10)
    assert j["n_base"] == 12 and j["n_benign"] == 12 and j["n_suffixed_not_failing"] == 6
    assert j["n_failing"] + j["dropped"]["failing_not_flipped"] == 10  # the shipped cases
    r = j["results"]["norm"]
    assert 0.0 <= r["auroc"] <= 1.0 and "auroc_fail_vs_suffixed_not_failing" in r
    text = cf_sentiment.report(j)
    assert "MiniLM-L6 sentiment bypass" in text and "| norm |" in text


def test_splits_table_and_group_columns_format_what_they_are_given() -> None:
    cf_eval = load_benchmark("cf_eval")
    g = "suffixed_not_failing"
    sp = [{"norm": {"auroc": a, f"auroc_fail_vs_{g}": b, f"auroc_{g}_vs_benign": c}}
          for a, b, c in ((0.8, 0.5, 0.9), (0.9, 0.7, 0.7))]
    t = cf_eval.splits_table(sp, g)
    assert "| detector | failing vs benign | failing vs suffixed-not-failing |" in t
    assert "| norm | 0.850 [0.800, 0.900] | 0.600 [0.500, 0.700] | 0.800 [0.700, 0.900] |" in t
    row = {"auroc": 0.8, "tpr_at_5fpr": 0.5, "fpr_default": 0.0, "tpr_default": 0.1,
           "fpr_p05": 0.02, "tpr_p05": 0.4, f"auroc_fail_vs_{g}": 0.5, f"auroc_{g}_vs_benign": 0.9}
    table = cf_eval._fmt_table({"norm": row}, False)
    assert "AUROC failing vs suffixed-not-failing" in table
    assert table.splitlines()[-1] == "| norm | 0.800 | 0.50 | 0.000 | 0.10 | 0.020 | 0.40 | 0.500 | 0.900 |"
