"""benchmarks/cca_guides.py's bar columns and cf_eval's per-model table, on hand-made rows."""

from __future__ import annotations

from typing import Any

from tests.unit._bench import load_benchmark


def row(guide: str, *, flip: bool, passes: int, said: bool = False, phase: str = "ranked",
        incident: int = 0) -> dict[str, Any]:
    return {"seed": 0, "incident": incident, "setup": "zero", "guide": guide, "flip": flip,
            "planted_in_fix": flip, "passes": passes, "n": 100, "said_over_budget": said,
            "phase": phase if flip else "—"}


def cells(table: str, guide: str) -> list[str]:
    line = next(x for x in table.splitlines() if f"| {guide} |" in x)
    return [c.strip() for c in line.strip("|").split("|")]


def test_summary_counts_lost_fixes_and_silent_overruns() -> None:
    guides = load_benchmark("cca_guides")
    rows = [row("none", flip=True, passes=30), row("none", flip=False, passes=20, incident=1),
            row("attribution", flip=False, passes=120, said=True),       # lost, said so
            row("attribution", flip=False, passes=20, incident=1),      # unguided failed too
            row("cf", flip=True, passes=130, phase="unguided"),          # over N, silent
            row("cf", flip=True, passes=10, incident=1)]
    table = guides.summarise(rows, "cmd", 60.0)
    # fix found | planted | passes/N | over N | silent | lost | by a fallback
    assert cells(table, "none")[2:] == ["1/2", "1/2", "25.00% (30.00%)", "0", "0", "0", "0"]
    assert cells(table, "attribution")[2:] == ["0/2", "0/2", "70.00% (120.00%)", "1", "0",
                                               "1", "0"]
    assert cells(table, "cf")[2:] == ["2/2", "2/2", "70.00% (130.00%)", "1", "1", "0", "1"]
    assert "| mean" not in table  # set-ups without rows are left out


def test_per_model_table_shows_top3_share_and_benign_rate() -> None:
    cf_eval = load_benchmark("cf_eval")
    res = {"auroc": 1.0, "ranks_strict": [1, 2, 5], "cand3_strict": [True, True, False],
           "fpr_default": 0.015}
    t = cf_eval.per_model_table([{"seed": 4, "kind": "gpt2-head",
                                  "fault_sites": ["blocks.1.attn.z[head=0]"],
                                  "results": {"mahalanobis": res}}])
    assert "mahalanobis top-3 cand. | mahalanobis benign FPR" in t
    assert t.splitlines()[-1] == ("| 4 | gpt2-head | blocks.1.attn.z[head=0] | 1.000 | 2 | "
                                  "0.67 | 0.015 |")
