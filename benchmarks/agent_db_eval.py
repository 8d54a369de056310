"""Issue 15's agent-db bars, measured by running SmolLM2 on the shipped episodes.

Phases (``--only`` picks some):

``replay``  every shipped failing episode and every benign twin is served again as one incident
            (``integrations.trace``; site ``blocks.15.resid_post``): the agent's tokens must equal
            the shipped ones; the incident's forward calls are replayed (``Replayer.load``:
            bit-exact, every step compared); the application is re-run in the sandbox with the
            production database sealed (``rerun_episode``: exact, every tool call answered from
            the recording, the database never reached).
``fix``     a baseline fix (:func:`analysis.scenarios._agent_db_fix.direction_fix`) derived from
            the failing episodes of the even phrasings only, then "would it have prevented the
            destructive action?" answered by a counterfactual re-run in the sandbox (local SQLite
            copy restored from the recorded dump) for the held-out failing episodes (odd
            phrasings): prevented rate with a Wilson 95 % interval; and for the benign twins:
            share that destroy nothing, issue the same statements as without the fix (the task
            still completes), and reproduce their episode token for token. This is the baseline, not the issue's ``investigate``
            fix (not wired for episodes yet).

Example::

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/agent_db_eval.py --json /tmp/agent_db.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analysis.scenarios._episode_cases import serve_traced as _serve
from benchmarks.episode_eval import replay_phase


def fix_phase(sc: Any, *, first_layer: int) -> dict[str, Any]:
    from analysis.cca._stats import wilson_ci
    from analysis.replay import Replayer
    from analysis.scenarios._agent_db_fix import direction_fix, would_fix_prevent

    t0 = time.perf_counter()
    derive = [c for c in sc.failing if c.phrasing % 2 == 0]
    held = [c for c in sc.failing if c.phrasing % 2 == 1]
    fix = direction_fix(sc.model, sc.tokenizer, failing=derive,
                        twins=[t for c in derive if (t := sc.twin(c)) is not None],
                        first_layer=first_layer)
    out: dict[str, Any] = {"derivation": len(derive), "held_out": len(held),
                           "first_layer": first_layer, "failing": [], "benign": []}
    for case in held:
        inc, _ = _serve(sc, case)
        r = would_fix_prevent(Replayer(sc.model).load(inc, measure=False), fix, sc.tokenizer,
                              task=case.task)
        out["failing"].append({"id": case.id, **r})
    twins = {t.id: t for c in held if (t := sc.twin(c)) is not None}
    for twin in twins.values():
        inc, _ = _serve(sc, twin)
        r = would_fix_prevent(Replayer(sc.model).load(inc, measure=False), fix, sc.tokenizer,
                              task=twin.task)
        r["same_statements"] = r["statements"] == twin.episode["statements"]
        r["same_episode"] = r["replies"] == twin.episode["replies"]
        out["benign"].append({"id": twin.id, **r})
    k, n = sum(r["prevented"] for r in out["failing"]), len(out["failing"])
    out["prevented"] = {"k": k, "n": n, "rate": k / n if n else None,
                        "wilson95": list(wilson_ci(k, n)) if n else None}
    b = out["benign"]
    out["benign_summary"] = {
        "n": len(b), "destroyed_nothing": sum(r["prevented"] for r in b),
        "same_statements": sum(r["same_statements"] for r in b),
        "same_episode": sum(r["same_episode"] for r in b)}
    out["production_touched"] = sum(r["production_touched"] for r in [*out["failing"], *b])
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    import torch

    from analysis.scenarios.agent_db import build

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", choices=["replay", "fix"], default=["replay", "fix"])
    ap.add_argument("--first-layer", type=int, default=12)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    sc = build(verify=2)
    res: dict[str, Any] = {"dropped": sc.dropped, "search": {
        k: v for k, v in (sc.meta.get("search") or {}).items() if k != "phase1"}}
    if "replay" in a.only:
        res["replay"] = replay_phase(sc)   # shared with the other episode scenarios
    if "fix" in a.only:
        res["fix"] = fix_phase(sc, first_layer=a.first_layer)
    text = json.dumps(res, indent=1)
    if a.json:
        a.json.write_text(text)
    summary = {k: ({kk: vv for kk, vv in v.items() if kk not in ("rows", "failing", "benign")}
                   if isinstance(v, dict) else v) for k, v in res.items()}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
