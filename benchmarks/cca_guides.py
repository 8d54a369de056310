"""Does a prior ever sink the fix-set search? CCA on the planted suite under every guide.

For each model of :func:`analysis.scenarios.planted.planted_suite` and ``--incidents`` failing
prompts of it, recorded with the real Recorder as ``benchmarks/cf_eval.py`` records them (the
detectors' sites), every detector builds a baseline from 50 benign incidents and scores the
failing incident; then ``CausalCCA(search_strategy="greedy")`` (default budget: the exhaustive
single-candidate count N) searches a fix set for the same incident under each guide:

* ``none``: no ranking (``rank_by="none"``: the candidates' own order) — the unguided search;
* ``attribution``: attribution patching only (the default without ``guided_by``);
* ``cf`` / ``mahalanobis`` (the default detector) / ``norm``: attribution blended with that
  detector's report (``guided_by=report``);
* ``adversarial``: a made-up report that ranks the planted sites' layers last, with
  ``cf_weight=1.0`` (the guide alone decides the order) — the worst prior.

Two set-ups: ``zero`` on every MLP neuron (N = 1024; issue 13's case) and ``mean`` on every
neuron and attention head (N = 1040; ``benchmarks/cca_eval.py``'s set-up). Measured per search:
fix found, its size and whether it holds the planted sites, forward passes vs N, whether the
FixSet says so when it used more than its budget, and which phase found the set. Bars (issue
13): never more passes than N without saying so; never "no fix" when the unguided search finds
one. Every number is a real replay. Run::

    OMP_NUM_THREADS=1 python benchmarks/cca_guides.py --models 20 --incidents 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GUIDES = ("none", "attribution", "cf", "mahalanobis", "norm", "adversarial")
SETUPS = {"zero": (["blocks.*.mlp.post[neuron=*]"], "zero"),
          "mean": (["blocks.*.mlp.post[neuron=*]", "blocks.*.attn.z[head=*]"], "mean")}


def adversarial_guide(report: Any, fault_sites: list[str]) -> Any:
    """A report-like guide with the planted sites' layers ranked last (everything else keeps
    the real report's order)."""
    bad = {s.split("[", 1)[0] for s in fault_sites}
    layers = {b.split(".")[1] for b in bad}
    last = [(s, v) for s, v in report.ranked_sites if s.split(".")[1:2] and
            s.split(".")[1] in layers]
    first = [(s, v) for s, v in report.ranked_sites if (s, v) not in last]
    return SimpleNamespace(ranked_sites=first + last)


def search(session: Any, failure: Any, setup: str, guide: str, reports: dict[str, Any],
           fault_sites: list[str], baseline: Any) -> dict[str, Any]:
    """One greedy search under ``guide``; the measurements of the result."""
    from analysis.cca import CausalCCA

    candidates, kind = SETUPS[setup]
    opts: dict[str, Any] = {"n_variants": 0, "n_permutations": 0, "max_fix_set_size": 8,
                            "search_strategy": "greedy"}
    guided_by = None
    if guide == "none":
        opts["rank_by"] = "none"
    elif guide == "adversarial":
        guided_by, opts["cf_weight"] = adversarial_guide(reports["mahalanobis"],
                                                         fault_sites), 1.0
    elif guide != "attribution":
        guided_by = reports[guide]
    t0 = time.perf_counter()
    fix = CausalCCA(**opts).search_fix_set(session, guided_by=guided_by, failure=failure,
                                           candidates=candidates, intervention=kind,
                                           baseline=baseline if kind == "mean" else None)
    found_by = [m.group(1) for n in fix.notes if (m := re.search(r"the (\w+) fallback did", n))]
    phase = found_by[0] if found_by else ("ranked" if fix.flip else "—")
    return {"flip": fix.flip, "size": fix.size, "sites": fix.sites,
            "planted_in_fix": set(fault_sites) <= set(fix.sites),
            "passes": fix.forward_passes, "n": fix.exhaustive_forward_passes,
            "said_over_budget": any("more than the budget" in n for n in fix.notes),
            "phase": phase, "reason": fix.reason, "seconds": time.perf_counter() - t0}


def evaluate_model(spec: dict[str, Any], n_incidents: int) -> list[dict[str, Any]]:
    """Record one planted model, score its failing incidents with every detector, and search
    each under every guide and set-up."""
    from cf_eval import planted_kind, planted_recordings

    from analysis.cca import Failure
    from analysis.cf import DETECTOR_NAMES, detector_class, make_detector
    from analysis.interventions import DonorBaseline
    from analysis.replay import Replayer

    pm, base, _, failing = planted_recordings(spec, 50, 0, n_incidents)
    dets = {d: make_detector(d, baseline=detector_class(d).build_baseline(base))
            for d in DETECTOR_NAMES}
    donor = DonorBaseline.from_incidents(base[:16], sites=["blocks.*.mlp.post",
                                                           "blocks.*.attn.z"], model=pm.model)
    failure = (Failure.token(pm.target_token) if pm.failure_kind == "token"
               else Failure.label(pm.target_token))
    rows = []
    for i, inc in enumerate(failing):
        session = Replayer(pm.model).load(inc)
        reports = {d: det.analyze(inc) for d, det in dets.items()}
        for setup in SETUPS:
            for guide in GUIDES:
                r = search(session, failure, setup, guide, reports, pm.fault_sites, donor)
                rows.append({"seed": spec["seed"], "kind": planted_kind(pm), "incident": i,
                             "fault": pm.fault_sites, "setup": setup, "guide": guide, **r})
    return rows


def summarise(rows: list[dict[str, Any]], cmd: str, elapsed: float) -> str:
    """Markdown: per set-up and guide, fixes found, passes vs N, and the two bars."""
    lines = [f"Command: `{cmd}` ({elapsed / 60:.1f} min).", "",
             "| set-up | guide | fix found | holds the planted sites | passes / N: median "
             "(max) | over N | over N without saying so | \"no fix\" where unguided found one |"
             " found by a fallback |", "|---|---|---|---|---|---|---|---|---|"]
    ref = {(r["seed"], r["incident"], r["setup"]): r["flip"] for r in rows
           if r["guide"] == "none"}
    for setup in SETUPS:
        for guide in GUIDES:
            sel = [r for r in rows if r["setup"] == setup and r["guide"] == guide]
            if not sel:
                continue
            frac = [r["passes"] / r["n"] for r in sel]
            over = [r for r in sel if r["passes"] > r["n"]]
            silent = [r for r in over if not r["said_over_budget"]]
            lost = [r for r in sel if not r["flip"] and ref[(r["seed"], r["incident"],
                                                             r["setup"])]]
            lines.append(
                f"| {setup} (N = {sel[0]['n']}) | {guide} | {sum(r['flip'] for r in sel)}/"
                f"{len(sel)} | {sum(r['planted_in_fix'] for r in sel)}/{len(sel)} | "
                f"{statistics.median(frac):.2%} ({max(frac):.2%}) | {len(over)} | "
                f"{len(silent)} | {len(lost)} | "
                f"{sum(r['phase'] not in ('ranked', '—') for r in sel)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=int, default=20)
    ap.add_argument("--incidents", type=int, default=3)
    ap.add_argument("--suite-seed", type=int, default=0)
    ap.add_argument("--dominance", type=float, default=None,
                    help="override the planted write's strength (default 8: saturating; 2: "
                         "each OR site barely suffices, so many small edits interact)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    import torch

    from analysis.scenarios.planted import planted_suite

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for spec in planted_suite(args.models, base_seed=args.suite_seed):
        if args.dominance is not None:
            spec = {**spec, "dominance": args.dominance}
        rows += evaluate_model(spec, args.incidents)
        last = [r for r in rows if r["seed"] == spec["seed"]]
        print(f"{last[0]['kind']} {last[0]['fault']}: " + ", ".join(
            f"{r['setup']}/{r['guide']}={'F' if r['flip'] else 'X'}{r['passes']}"
            for r in last if r["incident"] == 0), flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1, default=str))
    cmd = "OMP_NUM_THREADS=1 python " + " ".join(
        ["benchmarks/cca_guides.py", *(argv if argv is not None else sys.argv[1:])])
    print(summarise(rows, cmd, time.perf_counter() - t0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
