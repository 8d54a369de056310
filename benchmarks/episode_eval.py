"""Issue 15's episode scenarios: every shipped episode served again and replayed over every step.

For each scenario named (``multiturn``, ``tool-misuse``, ``agent-db``), every shipped failing
episode and every benign twin is served again as one incident (``integrations.trace``; site
``blocks.15.resid_post``): the generated tokens must equal the shipped ones and the scenario's own
check must label it as shipped (failing / not); the incident's forward calls are replayed
(``Replayer.load(...).fidelity()``: bit-exact, every forward call compared, the KV cache reset or
carried as served); the application is re-run in the sandbox with the production tools sealed
(``rerun_episode``: exact, every tool call answered from the recording, production never reached).
``--rerun N`` limits the sandbox re-run to the first N episodes of each scenario (default all).

Example::

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/episode_eval.py --scenario multiturn \
        --json /tmp/multiturn_replay.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODULES = {"multiturn": "multiturn", "tool-misuse": "tool_misuse", "agent-db": "agent_db"}


def replay_phase(sc: Any, *, rerun: int | None = None) -> dict[str, Any]:
    """Serve, replay and (the first ``rerun``) re-run in the sandbox every shipped episode."""
    from analysis.replay import Replayer, rerun_episode
    from analysis.scenarios._episode_cases import serve_traced

    t0 = time.perf_counter()
    twins = {t.id: t for c in sc.failing if (t := sc.twin(c)) is not None}
    rows = []
    for i, case in enumerate([*sc.failing, *twins.values()]):
        inc, ep = serve_traced(sc, case)
        fid = Replayer(sc.model).load(inc).fidelity()
        new_ids = case.episode["new_ids"]
        row = {"id": case.id, "same_tokens": ep.to_json()["new_ids"] == new_ids,
               "same_label": (sc.failure(case, ep) is not None) == case.failing,
               "replay_exact": fid.exact, "steps_compared": fid.steps_compared,
               "forward_calls": sum(len(x) for x in new_ids),
               "steps": [(s["kind"], s.get("cache")) for s in
                         (inc.manifest.get("episode") or {"steps": []})["steps"]]}
        if rerun is None or i < rerun:
            agent, sealed = sc.sealed_run(case)
            run = rerun_episode(Replayer(sc.model).load(inc, measure=False), agent)
            row.update(rerun_exact=run.exact, served=run.served, remaining=run.remaining,
                       production_touched=getattr(sealed, "touched", 0))
        rows.append(row)
    reruns = [r for r in rows if "rerun_exact" in r]
    return {"episodes": len(rows), "failing": len(sc.failing), "twins": len(twins),
            "same_tokens": sum(r["same_tokens"] for r in rows),
            "same_label": sum(r["same_label"] for r in rows),
            "replay_exact_every_step": sum(r["replay_exact"] and r["steps_compared"] ==
                                           r["forward_calls"] for r in rows),
            "forward_calls": sum(r["forward_calls"] for r in rows),
            "reruns": len(reruns), "rerun_exact": sum(r["rerun_exact"] for r in reruns),
            "production_touched": sum(r["production_touched"] for r in reruns),
            "seconds": round(time.perf_counter() - t0, 1), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenario", nargs="*", choices=sorted(MODULES),
                    default=["multiturn", "tool-misuse"])
    ap.add_argument("--rerun", type=int, default=None)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    res: dict[str, Any] = {}
    for name in a.scenario:
        sc = importlib.import_module(f"analysis.scenarios.{MODULES[name]}").build(verify=2)
        search = sc.meta.get("search") or {}
        res[name] = {"dropped": sc.dropped, "search": {
            k: v for k, v in search.items() if not isinstance(v, (dict, list))},
            "replay": replay_phase(sc, rerun=a.rerun)}
    text = json.dumps(res, indent=1)
    if a.json:
        a.json.write_text(text)
    print(json.dumps({n: {**r, "replay": {k: v for k, v in r["replay"].items() if k != "rows"}}
                      for n, r in res.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
