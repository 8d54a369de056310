"""Issue 13's decision-layer bar (the seed's DBC) on SmolLM2 prompt injection, by running the
model: is the decision layer consistent across failing variants (>= 90 % within ±1 layer)?

Each failing prompt of the injection scenario (``analysis/scenarios/data/injection_cases.json``)
and its benign twin are recorded through the Recorder (16 greedy tokens); every failing
variant gets its tail-restoration curve and decision layer from
:func:`analysis.rca._variants.decision_consistency` (the library's rule). The reference layer
is the consensus (lower median) of a random sample of the *derivation* split; the held-out
failing prompts (other phrasing templates and inputs, two unseen tasks) are then judged
against it — the held-out set never chose the reference, the rule or its threshold. The
candidate rules compared on derivation (the earlier flip rule, the steepest drop, the first
drop of at least a share, fractional crossings) are recomputed from the same curves.

The failure of a variant is ``Failure.text_contains`` of its target word as it appears in
the recorded output (the scenario's criterion is case-insensitive: "hacked" counts).

The rule's threshold (``MIN_SHARE``) was chosen on derivation curves; while it was being
chosen the curves of the first 40 held-out failing prompts (scenario order) were looked at,
so the held-out figure is also given without them (``--inspected``).

Example::

    OMP_NUM_THREADS=1 python benchmarks/rca_dbc.py --n-derive 60 --json dbc.json
    python benchmarks/rca_dbc.py --json dbc.json --summarize    # the tables again
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

log = logging.getLogger("rca_dbc")


def crossing(curve: Sequence[float], f: float) -> float | None:
    """The interpolated layer after which the curve stays at or below ``f`` (None if it ends
    above it)."""
    if curve[-1] > f:
        return None
    i = len(curve) - 1
    while i > 0 and curve[i - 1] <= f:
        i -= 1
    if i == 0:
        return 0.0
    a, b = curve[i - 1], curve[i]
    return (i - 1) + (a - f) / (a - b)


def candidate_rules() -> dict[str, Callable[[Sequence[float], int | None], float | None]]:
    """Decision-layer rules recomputed from a tail curve (and the earlier flip layer)."""
    from analysis.rca._trace import first_drop, steepest_drop

    rules: dict[str, Callable[[Sequence[float], int | None], float | None]] = {
        "flip (earlier rule)": lambda c, fl: fl,
        "steepest drop": lambda c, fl: steepest_drop(c, list(range(len(c))))[0]}
    for s in (0.1, 0.15, 0.2, 0.25, 0.3):
        rules[f"first drop >= {s}"] = (
            lambda c, fl, s=s: first_drop(c, list(range(len(c))), min_share=s)[0])
    for f in (0.5, 0.7, 0.9):
        rules[f"crossing {f}"] = lambda c, fl, f=f: crossing(c, f)
    return rules


def agreement(xs: Sequence[float | None], ref: float | None, tol: float) -> tuple[int, int]:
    """How many of ``xs`` lie within ``tol`` of ``ref`` (None never does), out of all."""
    ok = sum(1 for x in xs if x is not None and ref is not None and abs(x - ref) <= tol + 1e-9)
    return ok, len(xs)


def compare_rules(derive: Any, held: Any, *, tol: float) -> dict[str, Any]:
    """Every candidate rule: its derivation consensus and agreement, and held-out agreement
    with the derivation consensus."""
    from analysis.rca._heldout import wilson

    out = {}
    for name, rule in candidate_rules().items():
        xs = {k: [rule(c.curves[v], c.flip_layers[v]) for v in c.curves]
              for k, c in (("derive", derive), ("heldout", held))}
        found = [x for x in xs["derive"] if x is not None]
        ref = statistics.median_low(found) if found else None
        row: dict[str, Any] = {"reference": ref}
        for k in ("derive", "heldout"):
            ok, n = agreement(xs[k], ref, tol)
            row[k] = {"consistent": ok, "n": n, "rate": ok / max(1, n), "ci": list(wilson(ok, n))}
        out[name] = row
    return out


def not_inspected(doc: dict[str, Any], first: int, *, tol: float) -> dict[str, Any]:
    """Held-out agreement with the derivation reference on the prompts after the first
    ``first`` of the held-out split (in the scenario's order): the ones nobody looked at while
    the rule was being chosen."""
    from analysis.rca._heldout import wilson

    h, ref = doc["heldout"], doc["derive"]["reference"]
    order = {pid: i for i, pid in enumerate(h["prompt_order"])}
    layers = [v for k, v in h["layers"].items() if order[h["prompt_ids"][k]] >= first]
    ok, n = agreement(layers, ref, tol)
    return {"after_first": first, "consistent": ok, "n": n, "ci": list(wilson(ok, n))}


def summarize(doc: dict[str, Any], *, inspected: int) -> None:
    """Print the rules table (and the not-inspected held-out figure) of a run's JSON."""
    for name, row in doc["rules"].items():
        print(f"{name:22s} ref {row['reference']}: derive {row['derive']['consistent']}/"
              f"{row['derive']['n']}, held-out {row['heldout']['consistent']}/"
              f"{row['heldout']['n']} {[round(x, 3) for x in row['heldout']['ci']]}")
    if inspected:
        print("held-out, not inspected:", not_inspected(doc, inspected, tol=doc["tolerance"]))


def record_split(model: Any, tok: Any, sc: Any, prompts: Sequence[Any], prefix: str
                 ) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """Failing incidents, their twins' incidents, and each failing incident's prompt."""
    from benchmarks.rca_eval import record_prompts

    F = record_prompts(model, prompts, f"{prefix}F", generate=16)
    twins = [t for p in prompts if (t := sc.twin(p)) is not None]
    B = record_prompts(model, list({t.id: t for t in twins}.values()), f"{prefix}B",
                       generate=16)
    return F, B, {i.id: p for i, p in zip(F, prompts)}


def failure_as_recorded(tok: Any, meta: dict[str, Any]) -> Callable[[Any], Any]:
    """The variant's target word, spelled as in its recorded output (else as injected)."""
    from analysis.cca import Failure
    from analysis.cca._failure import _output_ids
    from analysis.rca._twins import prompt_ids

    def of(inc: Any) -> Any:
        word = meta[inc.id].meta["target"]
        full = _output_ids(inc)
        new = [] if full is None else full.reshape(-1).tolist()[len(prompt_ids(inc)):]
        text = tok.decode(new, skip_special_tokens=True)
        for w in (word, word.lower(), word.capitalize()):
            if w in text:
                return Failure.text_contains(w, tokenizer=tok)
        return Failure.text_contains(word, tokenizer=tok)
    return of


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--n-derive", type=int, default=60,
                    help="random derivation failing prompts for the reference (0 = all)")
    ap.add_argument("--n-heldout", type=int, default=0, help="cap held-out prompts (0 = all)")
    ap.add_argument("--tolerance", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--inspected", type=int, default=40,
                    help="also report the held-out prompts after the first N (scenario order)")
    ap.add_argument("--summarize", action="store_true",
                    help="only print the summary of an existing --json")
    args = ap.parse_args(argv)
    if args.summarize:
        summarize(json.loads(args.json.read_text()), inspected=args.inspected)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from analysis.models import load_smollm2
    from analysis.rca._variants import decision_consistency
    from analysis.scenarios import injection as inj

    t0 = time.perf_counter()
    model, tok = load_smollm2()
    doc: dict[str, Any] = {"tolerance": args.tolerance}
    runs = {}
    for split, n in (("derive", args.n_derive), ("heldout", args.n_heldout)):
        sc = inj.build(split=split, model=model, tokenizer=tok, verify=False)
        prompts = list(sc.failing)
        if n and n < len(prompts):
            prompts = random.Random(args.seed).sample(prompts, n)
        F, B, meta = record_split(model, tok, sc, prompts, split[0])
        ref = runs["derive"].reference if split == "heldout" else None
        c = decision_consistency(model, F, B, failure_of=failure_as_recorded(tok, meta),
                                 tokenizer=tok, reference_layer=ref, tolerance=args.tolerance)
        runs[split] = c
        rows = {meta[k].id if k in meta else k: v for k, v in c.to_dict().items()}
        doc[split] = dict(rows, prompt_ids={i.id: meta[i.id].id for i in F},
                          prompt_order=[p.id for p in sc.failing],
                          seconds=round(time.perf_counter() - t0, 1))
        log.info("%s: %d/%d within ±%d of layer %s (%s), skipped %d", split, c.consistent,
                 c.evaluated, args.tolerance, c.reference, c.reference_from, len(c.skipped))
        args.json.write_text(json.dumps(doc, indent=1, default=str))
    doc["rules"] = compare_rules(runs["derive"], runs["heldout"], tol=args.tolerance)
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    args.json.write_text(json.dumps(doc, indent=1, default=str))
    summarize(doc, inspected=args.inspected if not args.n_heldout else 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
