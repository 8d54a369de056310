"""Where is the injected instruction read? Per-component restoration curves (Meng et al.-style)
for the decision layer of SmolLM2 prompt injection, beside the residual tail curve.

For each failing variant and its benign twin (recorded as in ``rca_dbc.py``), at every layer
``L`` and at every aligned position after the injected span, the twin's value is restored
into the failing run at one site, one layer at a time:

* ``resid``: ``blocks.L.resid_post`` (the library's tail curve, :func:`causal_trace`);
* ``attn``: ``blocks.L.attn`` (the attention output: what layer ``L`` reads, from the span
  among other positions, into the tail);
* ``attn_w3``: the attention outputs of layers ``L-1..L+1`` together (a window, as Meng et
  al. restore components over windows of layers to see a distributed read).

Values are normalised like the tail curve (1 = as failing, 0 = the twin's level). Curves are
written to the JSON; ``--rules`` evaluates the pre-registered rules (``PREREGISTERED``; fixed
on the derivation curves and committed before any held-out curve was computed) against the
derivation consensus.

Example::

    OMP_NUM_THREADS=1 python benchmarks/rca_dbc_sites.py --split derive --n 60 --json d.json
    OMP_NUM_THREADS=1 python benchmarks/rca_dbc_sites.py --split heldout --json h.json
    python benchmarks/rca_dbc_sites.py --rules d.json h.json
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

log = logging.getLogger("rca_dbc_sites")

SITES = {"attn": ("blocks.{L}.attn", 0), "attn_w3": ("blocks.{L}.attn", 1)}


def site_curve(session: Any, bound: Any, donor: Any, suffix: int, fmt: str, half: int,
               n_layers: int, norm: Callable[[float], float]) -> list[float]:
    """The normalised failure metric with ``fmt``'s output restored from the twin at the
    aligned tail, at each layer (with ``half`` layers either side when ``half`` > 0)."""
    from analysis.interventions import Intervention

    sets = [[Intervention(fmt.format(L=j) + f"[pos=-{suffix}:]", "patch", donor=donor)
             for j in range(max(0, L - half), min(n_layers, L + half + 1))]
            for L in range(n_layers)]
    out: list[float] = []
    for i in range(0, len(sets), 32):
        for r in session.run_batch(sets[i:i + 32], last_step=bound.step):
            out.append(norm(bound.value(r.logits)))
    return out


def variant_curves(model: Any, tok: Any, F: Sequence[Any], B: Sequence[Any],
                   failure_of: Callable[[Any], Any],
                   save: Callable[[dict[str, dict[str, Any]]], None] = lambda _c: None,
                   sites: dict[str, tuple[str, int]] = SITES, resid: bool = True
                   ) -> dict[str, dict[str, Any]]:
    """Every variant's curves (``resid`` and ``sites``), keyed by incident id; ``save``
    is called with the curves so far after each variant."""
    import torch

    from analysis.rca._twins import aligned_tail, find_twin, prompt_ids
    from analysis.replay import Replayer
    from integrations.errors import ForensicsError

    rep = Replayer(model)
    out: dict[str, dict[str, Any]] = {}
    for k, v in enumerate(F):
        twin = find_twin(v, B)
        if twin is None:
            continue
        try:
            s = rep.load(v)
            bound = failure_of(v).bind(s, tokenizer=tok)
            t0 = time.perf_counter()
            row, base, tw = ends(s, bound, twin, resid=resid)
            row["ends_seconds"] = round(time.perf_counter() - t0, 2)
        except ForensicsError as e:
            log.info("skip %s: %s", v.id, e)
            continue
        _, _, suffix = aligned_tail(prompt_ids(v), twin)
        sc = base - tw if abs(base - tw) > 1e-6 else 1.0
        donor = torch.tensor([twin])
        n_layers = len(s.resolve("blocks.*.resid_post"))
        for name, (fmt, half) in sites.items():
            t0 = time.perf_counter()
            row[name] = [round(x, 4) for x in site_curve(
                s, bound, donor, suffix, fmt, half, n_layers,
                lambda x, tw=tw, sc=sc: (x - tw) / sc)]
            row[f"{name}_seconds"] = round(time.perf_counter() - t0, 2)
        out[v.id] = row
        save(out)
        log.info("%d/%d %s decision %s", k + 1, len(F), v.id, row.get("decision_layer"))
    return out


def ends(session: Any, bound: Any, twin: list[int], *, resid: bool
         ) -> tuple[dict[str, Any], float, float]:
    """The failing run's and the twin's metric (and with ``resid`` the library's tail
    curve and decision layer, from :func:`causal_trace`)."""
    import torch

    from analysis.rca._trace import causal_trace

    if resid:
        tr = causal_trace(session, twin_ids=twin, failure=bound, heatmap=False,
                          verify_flips=False)
        return ({"resid": [round(x, 4) for x in tr.tail_curve],
                 "decision_layer": tr.decision_layer}, tr.metric_failing, tr.metric_twin)
    base = bound.value(session.verify([], last_step=bound.step).logits)
    plan = session.plan.with_prompt(torch.tensor([twin]))
    tw = bound.value(session.run_edited(plan=plan, last_step=bound.step).logits)
    return {}, base, tw


def record(split: str, n: int, seed: int, path: Path, sites: Sequence[str], *, resid: bool
           ) -> dict[str, Any]:
    """Record the split's failing prompts (a seeded sample of ``n``; 0 = all) and twins, and
    compute every variant's curves."""
    def curves(model: Any, tok: Any, F: Any, B: Any, failure_of: Any, save: Any) -> Any:
        return variant_curves(model, tok, F, B, failure_of, save=save,
                              sites={k: SITES[k] for k in sites}, resid=resid)
    return record_with(split, n, seed, path, curves)


def record_with(split: str, n: int, seed: int, path: Path,
                curves: Callable[..., dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Record the split's failing prompts (a seeded sample of ``n``; 0 = all) and their twins,
    and run ``curves(model, tok, F, B, failure_of, save)`` over them (the doc is saved to
    ``path`` after each variant); shared with ``rca_dbc_span.py``."""
    from analysis.models import load_smollm2
    from analysis.scenarios import injection as inj
    from benchmarks.rca_dbc import failure_as_recorded, record_split

    model, tok = load_smollm2()
    sc = inj.build(split=split, model=model, tokenizer=tok, verify=False)
    prompts = list(sc.failing)
    if n and n < len(prompts):
        prompts = random.Random(seed).sample(prompts, n)
    F, B, meta = record_split(model, tok, sc, prompts, split[0])

    def doc(found: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return {"split": split, "curves": {meta[k].id: v for k, v in found.items()},
                "tasks": {meta[k].id: meta[k].meta.get("task") for k in found}}

    return doc(curves(model, tok, F, B, failure_as_recorded(tok, meta),
                      lambda c: path.write_text(json.dumps(doc(c), indent=1))))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--split", choices=("derive", "heldout"))
    ap.add_argument("--n", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--no-resid", action="store_true",
                    help="skip the residual tail curve (only the failing and twin metrics)")
    ap.add_argument("--sites", nargs="*", default=list(SITES), choices=list(SITES))
    ap.add_argument("--rules", nargs=2, type=Path, metavar=("DERIVE", "HELDOUT"))
    args = ap.parse_args(argv)
    if args.rules:
        from benchmarks.rca_dbc_rules import report
        report(*(json.loads(p.read_text()) for p in args.rules))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t0 = time.perf_counter()
    doc = record(args.split, args.n, args.seed, args.json, args.sites,
                 resid=not args.no_resid)
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    args.json.write_text(json.dumps(doc, indent=1))
    med = ({k: [round(statistics.median(c[k][i] for c in doc["curves"].values()), 3)
               for i in range(len(next(iter(doc["curves"].values()))[k]))]
           for k in ([] if args.no_resid else ["resid"]) + list(args.sites)}
           if doc["curves"] else {})
    for k, m in med.items():
        print(k, m)
    return 0


if __name__ == "__main__":
    sys.exit(main())
