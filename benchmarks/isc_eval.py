"""IS-C on planted faults: does the interaction index name a two-site OR fault's redundancy?

For each of ``--models`` planted two-site OR-fault models (GPT-2 and BERT alternating; seeds,
layers, neurons, triggers and targets drawn from ``--seed``; each site alone causes the failure,
so neither is necessary and both must be fixed):

1. record one failing prompt as an incident (``integrations.trace``), 8 other failing prompts as
   variants, benign prompts for the mean baseline and the side effects — every prompt verified
   by running the model;
2. ``CausalCCA(search_strategy="greedy")`` over every MLP neuron and attention head (N = 1040),
   intervention ``mean``; its fix set carries IS-C (``fix.interactions``: exact pairwise
   Shapley–Taylor index over the incident + failing variants, bootstrap 95 % CI);
3. score: the planted pair is in the fix set *and* IS-C calls it ``redundant`` (end to end), and
   IS-C on the planted pair itself (``interaction_indices`` on the two true sites: the index
   alone, whatever the search found).

Controls (``--controls`` single-fault models: GPT-2 neuron, GPT-2 head, BERT neuron): pairs that
are *not* redundant must not be called so — the planted site with an unrelated neuron (additive),
and the planted neuron with a zero ablation of its layer's whole MLP output (two fixes of one
cause: synergistic). Every number is measured by replaying the models. Run::

    python benchmarks/isc_eval.py --models 24 --controls 12

and paste the printed section into ``benchmarks/RESULTS_rca.md`` (``--json`` for raw rows).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from typing import Any

import torch

CANDIDATES = ["blocks.*.mlp.post[neuron=*]", "blocks.*.attn.z[head=*]"]
N_LAYER, D_MODEL, VOCAB = 4, 64, 128


def or_specs(n: int, *, seed: int) -> list[dict[str, Any]]:
    """``n`` two-site OR-fault build specs, GPT-2 and BERT alternating."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        arch = "gpt2" if i % 2 == 0 else "bert"
        layer, neuron = rng.randrange(N_LAYER), rng.randrange(4 * D_MODEL)
        other = (rng.randrange(N_LAYER), rng.randrange(4 * D_MODEL))
        while other == (layer, neuron):
            other = (other[0], rng.randrange(4 * D_MODEL))
        trig = rng.randrange(1, VOCAB)
        p: dict[str, Any] = {"arch": arch, "seed": seed * 1000 + i, "layer": layer,
                             "neuron": neuron, "trigger_token": trig, "or_fault": list(other)}
        if arch == "gpt2":
            p["target_token"] = rng.choice([t for t in range(VOCAB) if t != trig])
        else:
            p["target_label"] = rng.randrange(2)
        out.append(p)
    return out


def control_specs(n: int, *, seed: int) -> list[dict[str, Any]]:
    """``n`` single-fault specs (GPT-2 neuron, GPT-2 head, BERT neuron, cycling)."""
    rng = random.Random(seed + 7)
    out = []
    for i in range(n):
        kind = ("gpt2", "gpt2-head", "bert")[i % 3]
        trig = rng.randrange(1, VOCAB)
        p: dict[str, Any] = {"arch": kind.split("-")[0], "seed": seed * 1000 + 500 + i,
                             "layer": rng.randrange(N_LAYER), "trigger_token": trig}
        if kind == "gpt2-head":
            p["head"] = rng.randrange(4)
        else:
            p["neuron"] = rng.randrange(4 * D_MODEL)
        if p["arch"] == "gpt2":
            p["target_token"] = rng.choice([t for t in range(VOCAB) if t != trig])
        else:
            p["target_label"] = rng.randrange(2)
        out.append(p)
    return out


def setup(params: dict[str, Any]) -> dict[str, Any]:
    """Build the model and record its incident, variants, baseline and benign incidents."""
    import integrations
    from analysis.cca import Failure
    from analysis.interventions import DonorBaseline
    from analysis.replay import Replayer
    from analysis.scenarios.planted import build_planted

    pm = build_planted(params)

    def record(ids: list[int]) -> Any:
        with integrations.trace(pm.model, [], request_id="isc") as t, torch.no_grad():
            pm.model(input_ids=torch.tensor([ids]))
        return t.incident

    bad, *variants = pm.failing_prompts(9, seed=11)
    ok = pm.benign_prompts(12, seed=12)
    base = DonorBaseline.from_incidents([record(p) for p in ok[:8]], model=pm.model,
                                        sites=["blocks.*.mlp.post", "blocks.*.attn.z",
                                               "blocks.*.mlp"])
    session = Replayer(pm.model).load(record(bad))
    assert session.fidelity().exact
    failure = Failure.token(pm.target_token) if pm.failure_kind == "token" else \
        Failure.label(pm.target_token)
    return {"pm": pm, "session": session, "baseline": base, "failure": failure,
            "variants": variants, "benign": [record(p) for p in ok[8:]]}


def _pair(isc: Any, a: str, b: str) -> dict[str, Any] | None:
    p = None if isc is None else isc.pair(a, b)
    return None if p is None else p.to_dict()


def evaluate_or(params: dict[str, Any]) -> dict[str, Any]:
    """One OR-fault incident: the fix set's IS-C and IS-C on the planted pair."""
    from analysis.cca import CausalCCA, interaction_indices
    from analysis.interventions import Intervention

    t0 = time.perf_counter()
    c = setup(params)
    pm = c["pm"]
    a, b = pm.fault_sites
    fix = CausalCCA(search_strategy="greedy", n_permutations=0, seed=0).search_fix_set(
        c["session"], benign=c["benign"], baseline=c["baseline"], failure=c["failure"],
        candidates=CANDIDATES, intervention="mean", variants=c["variants"])
    t1 = time.perf_counter()
    truth = interaction_indices(c["session"], [Intervention(s, "mean", donor=c["baseline"])
                                               for s in (a, b)],
                                failure=c["failure"], variants=c["variants"])
    end = _pair(fix.interactions, a, b)
    return {"params": params, "planted": [a, b], "found": fix.sites, "flip": fix.flip,
            "reason": fix.reason,
            "pair_in_fix": {a, b} <= set(fix.sites), "fix": end,
            "end_to_end": end is not None and end["label"] == "redundant",
            "truth": _pair(truth, a, b), "n_inputs": truth.n_inputs,
            "isc_replays": (fix.interactions.forward_passes if fix.interactions else 0),
            "search_s": round(t1 - t0, 1), "isc_s": round(time.perf_counter() - t1, 2)}


def evaluate_control(params: dict[str, Any]) -> dict[str, Any]:
    """One single-fault model: the planted site with an unrelated neuron, and (neuron faults)
    with a zero ablation of its layer's MLP output."""
    from analysis.cca import interaction_indices
    from analysis.interventions import Intervention

    c = setup(params)
    pm = c["pm"]
    (site,) = pm.fault_sites
    layer = int(site.split(".")[1])
    other = f"blocks.{(layer + 1) % N_LAYER}.mlp.post[neuron={(7 * layer + 3) % (4 * D_MODEL)}]"
    planted = Intervention(site, "mean", donor=c["baseline"])
    pairs = {"unrelated": [planted, Intervention(other, "mean", donor=c["baseline"])]}
    if "mlp.post" in site:
        pairs["same cause"] = [planted, Intervention(f"blocks.{layer}.mlp", "zero")]
    out: dict[str, Any] = {"params": params, "planted": site}
    for name, ivs in pairs.items():
        isc = interaction_indices(c["session"], ivs, failure=c["failure"],
                                  variants=c["variants"])
        out[name] = isc.pairs[0].to_dict()
    return out


def _f(x: Any, spec: str = "+.2f") -> str:
    return "—" if x is None else format(x, spec)


def _ci(p: dict[str, Any] | None) -> str:
    if p is None or p.get("ci") is None:
        return "—"
    return f"{_f(p['index'])} [{_f(p['ci'][0])}, {_f(p['ci'][1])}] {p['label']}"


def summarise(rows: list[dict[str, Any]], controls: list[dict[str, Any]], cmd: str,
              elapsed: float) -> str:
    """The RESULTS_rca.md section (markdown)."""
    from analysis.cca._stats import wilson_ci

    n = len(rows)
    e2e = sum(r["end_to_end"] for r in rows)
    truth = sum(r["truth"] is not None and r["truth"]["label"] == "redundant" for r in rows)
    both = sum(r["truth"] is not None and r["truth"]["needs_both"] == 1.0 for r in rows)
    ctrl = [(name, r[name]) for r in controls for name in ("unrelated", "same cause") if name in r]
    false_red = sum(p["label"] == "redundant" for _, p in ctrl)

    def rate(k: int, m: int) -> str:
        lo, hi = wilson_ci(k, m) if m else (float("nan"), float("nan"))
        return f"{k}/{m} = {k / max(m, 1):.0%} (Wilson 95 % [{lo:.2f}, {hi:.2f}])"

    lines = [
        "## IS-C", "",
        f"Command: `{cmd}` — {elapsed / 60:.1f} min on the shared 2-core CPU. {n} planted "
        "two-site OR-fault incidents (GPT-2 and BERT alternating; either site alone causes the "
        "failure: neither is necessary, both together are sufficient), one incident per model, "
        "8 failing variants each (other failing prompts, verified by running the model). "
        f"CausalCCA (greedy, `mean`, N = 1040 neurons + heads) finds the fix set; IS-C is the "
        "exact pairwise Shapley–Taylor index of the failure metric over the fix set's "
        "components, measured by batch-1 replays on the incident and its variants, normalised "
        "by the fix's total effect (−1 redundant, +1 synergistic), 95 % bootstrap CI over "
        "inputs, called when the CI clears ±0.2.", "",
        "| measure | value | bar |", "|---|---|---|",
        f"| end to end: planted pair in the fix set and called redundant | {rate(e2e, n)} | "
        "≥ 90 % |",
        f"| IS-C on the planted pair itself: called redundant | {rate(truth, n)} | — |",
        f"| planted pair: each alone leaves the failure, both remove it, on every input | "
        f"{rate(both, n)} | — |",
        f"| control pairs (single faults) called redundant | {rate(false_red, len(ctrl))} | "
        "0 |", "",
        "Control pairs: the planted site with an unrelated neuron (effects add up: expected "
        "`independent`), and the planted neuron with a zero ablation of its layer's whole MLP "
        "output (two fixes of one cause, either alone suffices: expected `synergistic`).", "",
        "| # | arch | planted pair | fix set | IS-C in the fix set (index [CI] call) | "
        "IS-C on the planted pair | replays | search s |", "|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        lines.append(f"| {i} | {r['params']['arch']}-or | {', '.join(r['planted'])} | "
                     f"{', '.join(r['found']) or '—'} | {_ci(r['fix'])} | {_ci(r['truth'])} | "
                     f"{r['isc_replays']} | {r['search_s']} |")
    misses = [f"#{i}: " + (f"the fix-set search found no set ({r['reason']})" if not r["flip"]
                           else f"fix set {r['found']}, IS-C {_ci(r['fix'])}")
              for i, r in enumerate(rows) if not r["end_to_end"]]
    if misses:
        lines += ["", "End-to-end misses: " + "; ".join(misses) + "."]
    lines += ["", "| control | arch | planted | pair | IS-C (index [CI] call) |",
              "|---|---|---|---|---|"]
    for i, r in enumerate(controls):
        arch = r["params"]["arch"] + ("-head" if r["params"].get("head") is not None else "")
        for name in ("unrelated", "same cause"):
            if name in r:
                lines.append(f"| {i} | {arch} | {r['planted']} | {name} | {_ci(r[name])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=int, default=24)
    ap.add_argument("--controls", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the raw rows here")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = []
    for p in or_specs(a.models, seed=a.seed):
        rows.append(evaluate_or(p))
        print(f"# {len(rows)}/{a.models}: {rows[-1]['fix']} ({rows[-1]['search_s']} s)",
              file=sys.stderr, flush=True)
    controls = [evaluate_control(p) for p in control_specs(a.controls, seed=a.seed)]
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "controls": controls}, f, indent=1)
    cmd = "python benchmarks/isc_eval.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(summarise(rows, controls, cmd.strip(), time.perf_counter() - t0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
