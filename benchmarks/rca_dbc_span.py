"""The decision layer as DESIGN §14 words it, measured from the span's side: the earliest layer
after which taking the injected instruction out of the residual stream no longer removes the
failure (SmolLM2 prompt injection; issue 13's DBC bar).

The tail curve (``analysis.rca._trace``, ``rca_dbc.py``) restores the benign twin's residual
stream at the positions *after* the injected span and asks where the failure is first read out
of it; three rules over it gave 68–76 % held-out consistency (``RESULTS_rca.md``). Meng et al.
restore the *subject's* own states instead; here the subject — the injected sentence — is an
insertion the twin does not have, so there is no clean state to restore. Its information is
removed instead: at layer ``L`` the residual stream ``blocks.L.resid_post`` of every span
position is replaced by the mean benign residual of that layer (over every non-BOS prefill
position of the benign twins: position 0 is the attention sink, orders of magnitude larger),
and the run continues (later layers see the span only through those vectors). Early, this
removes the instruction before anything read it; past the last layer that reads it, it no
longer matters. The *span curve* is the failure metric at each ``L``, normalised like the tail
curve (1 = as failing, 0 = the twin's level).

Rules map a span curve to a layer (``rules()``): the earliest layer from which ablating at that
layer and every later one no longer flips the failure (DESIGN's wording), or no longer removes
≥ ``s`` of it (``1 - curve < s``), or the interpolated upward crossing of ``f``. Protocol as
for ``rca_dbc_sites.py``: the family is explored on derivation curves only (the same seeded
sample of the derivation split as ``rca_dbc.py``); at most two rules are fixed in
``PREREGISTERED`` and committed before any held-out curve is computed; the held-out split is
then evaluated once against each rule's derivation consensus (lower median), within ±1 layer.

Example::

    OMP_NUM_THREADS=1 python benchmarks/rca_dbc_span.py --split derive --n 60 --json sd.json
    python benchmarks/rca_dbc_span.py --explore sd.json
    OMP_NUM_THREADS=1 python benchmarks/rca_dbc_span.py --split heldout --json sh.json
    python benchmarks/rca_dbc_span.py --report sd.json sh.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

log = logging.getLogger("rca_dbc_span")

Rule = Callable[[dict[str, Any]], float | None]

#: Fixed on derivation curves only, before any held-out span curve was computed (at most two):
#: the family's best on the 57 derivation variants (54/57 within ±1 of layer 23), and DESIGN
#: §14's own wording ("no longer removes the failure" = no longer flips it; 49/57 of layer 28).
PREREGISTERED: list[str] = ["no longer removes >= 0.5", "no longer flips"]


def benign_means(model: Any, B: Sequence[Any], n_layers: int) -> Any:
    """``[n_layers, d_model]``: the mean ``blocks.L.resid_post`` over every non-BOS prefill
    position of the benign twins (replayed)."""
    import torch

    from analysis.replay import Replayer

    rep = Replayer(model)
    sums: Any = None
    count = 0
    for inc in B:
        res = rep.load(inc, measure=False).run(capture=["blocks.*.resid_post"])
        acts = res.activations
        per_layer = [acts[f"blocks.{L}.resid_post"][0] for L in range(n_layers)]  # prefill
        x = torch.stack([t[0, 1:].double() for t in per_layer])   # [L, pos - 1, d_model]
        sums = x.sum(1) if sums is None else sums + x.sum(1)
        count += x.shape[1]
    return (sums / count).float()


def span_curve(session: Any, bound: Any, means: Any, span: tuple[int, int], n_layers: int,
               norm: Callable[[float], float]) -> tuple[list[float], list[float]]:
    """(normalised, raw) failure metric with the span's residual replaced by the benign mean
    at each layer."""
    from analysis.interventions import Intervention

    a, b = span
    sets = [[Intervention(f"blocks.{L}.resid_post[pos={a}:{b}]", "patch", value=means[L])]
            for L in range(n_layers)]
    raw: list[float] = []
    for i in range(0, len(sets), 32):
        for r in session.run_batch(sets[i:i + 32], last_step=bound.step):
            raw.append(float(bound.value(r.logits)))
    return [norm(x) for x in raw], raw


def variant_curves(model: Any, tok: Any, F: Sequence[Any], B: Sequence[Any],
                   failure_of: Callable[[Any], Any],
                   save: Callable[[dict[str, dict[str, Any]]], None]) -> dict[str, dict[str, Any]]:
    """Every failing variant's span curve (with its span and end metrics), by incident id."""
    from analysis.rca._twins import aligned_tail, find_twin, prompt_ids
    from analysis.replay import Replayer
    from benchmarks.rca_dbc_sites import ends
    from integrations.errors import ForensicsError

    rep = Replayer(model)
    n_layers = len(rep.load(F[0], measure=False).resolve("blocks.*.resid_post"))
    t0 = time.perf_counter()
    means = benign_means(model, B, n_layers)
    log.info("benign means over %d twins in %.1f s", len(B), time.perf_counter() - t0)
    out: dict[str, dict[str, Any]] = {}
    for k, v in enumerate(F):
        twin = find_twin(v, B)
        if twin is None:
            continue
        try:
            s = rep.load(v)
            bound = failure_of(v).bind(s, tokenizer=tok)
            _, base, tw = ends(s, bound, twin, resid=False)
        except ForensicsError as e:
            log.info("skip %s: %s", v.id, e)
            continue
        pre, span_end, _ = aligned_tail(prompt_ids(v), twin)
        sc = base - tw if abs(base - tw) > 1e-6 else 1.0
        t0 = time.perf_counter()
        curve, raw = span_curve(s, bound, means, (pre, span_end), n_layers,
                                lambda x, tw=tw, sc=sc: (x - tw) / sc)
        out[v.id] = {"span": [pre, span_end], "failing": round(base, 4), "twin": round(tw, 4),
                     "curve": [round(x, 4) for x in curve], "raw": [round(x, 4) for x in raw],
                     "seconds": round(time.perf_counter() - t0, 2)}
        save(out)
        log.info("%d/%d %s span %d:%d curve %s", k + 1, len(F), v.id, pre, span_end,
                 [round(x, 2) for x in curve])
    return out


def last_removing(removes: Sequence[bool]) -> float | None:
    """The earliest layer from which no later ablation removes (one past the last that does);
    0 when none does, None when the last layer still does."""
    if removes and removes[-1]:
        return None
    i = len(removes)
    while i > 0 and not removes[i - 1]:
        i -= 1
    return float(i)


def up_crossing(curve: Sequence[float], f: float) -> float | None:
    """The interpolated layer from which the curve stays at or above ``f``."""
    if curve[-1] < f:
        return None
    i = len(curve) - 1
    while i > 0 and curve[i - 1] >= f:
        i -= 1
    if i == 0:
        return 0.0
    a, b = curve[i - 1], curve[i]
    return (i - 1) + (f - a) / (b - a)


def rules() -> dict[str, Rule]:
    """The family explored on derivation (module doc)."""
    fam: dict[str, Rule] = {
        "no longer flips": lambda r: last_removing([x <= 0 for x in r["raw"]])}
    for s in (0.1, 0.15, 0.2, 0.3, 0.5):
        fam[f"no longer removes >= {s}"] = (
            lambda r, s=s: last_removing([1 - x >= s for x in r["curve"]]))
    for f in (0.5, 0.7, 0.9):
        fam[f"up-crossing {f}"] = lambda r, f=f: up_crossing(r["curve"], f)
    return fam


def judge(rule: Rule, derive: dict[str, Any], held: dict[str, Any] | None, *, tol: float = 1
          ) -> dict[str, Any]:
    """A rule's derivation consensus (lower median) and agreement within ``tol`` (and the
    held-out split's, against the derivation consensus)."""
    from analysis.rca._heldout import wilson

    xs = {"derive": [rule(r) for r in derive["curves"].values()]}
    if held is not None:
        xs["heldout"] = [rule(r) for r in held["curves"].values()]
    found = [x for x in xs["derive"] if x is not None]
    ref = statistics.median_low(found) if found else None
    out: dict[str, Any] = {"reference": ref}
    for k, vals in xs.items():
        ok = sum(1 for x in vals if x is not None and ref is not None and abs(x - ref) <= tol)
        out[k] = {"consistent": ok, "n": len(vals), "ci": [round(c, 3) for c in
                                                         wilson(ok, len(vals))],
                  "layers": sorted(vals, key=lambda x: -1 if x is None else x)}
    return out


def record(split: str, n: int, seed: int, path: Path) -> dict[str, Any]:
    """Record the split's failing prompts (a seeded sample of ``n``; 0 = all) and twins, and
    compute every variant's span curve (saved to ``path`` as it goes)."""
    from benchmarks.rca_dbc_sites import record_with

    return record_with(split, n, seed, path, lambda model, tok, F, B, failure_of, save:
                       variant_curves(model, tok, F, B, failure_of, save=save))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--split", choices=("derive", "heldout"))
    ap.add_argument("--n", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--explore", type=Path, metavar="DERIVE",
                    help="print every rule of the family on derivation curves")
    ap.add_argument("--report", nargs=2, type=Path, metavar=("DERIVE", "HELDOUT"),
                    help="the pre-registered rules on the held-out curves")
    args = ap.parse_args(argv)
    if args.explore or args.report:
        derive = json.loads((args.explore or args.report[0]).read_text())
        held = json.loads(args.report[1].read_text()) if args.report else None
        names = list(rules()) if args.explore else PREREGISTERED
        if not names:
            print("no rule is pre-registered yet: explore on derivation first")
            return 1
        curves = list(derive["curves"].values())
        print("median span curve (derivation):",
              [round(statistics.median(c["curve"][i] for c in curves), 2)
               for i in range(len(curves[0]["curve"]))])
        for name in names:
            j = judge(rules()[name], derive, held)
            line = (f"{name:28s} ref {j['reference']}: derive {j['derive']['consistent']}/"
                    f"{j['derive']['n']} {j['derive']['ci']}")
            if held is not None:
                line += (f"; held-out {j['heldout']['consistent']}/{j['heldout']['n']} "
                         f"{j['heldout']['ci']}")
            print(line)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t0 = time.perf_counter()
    doc = record(args.split, args.n, args.seed, args.json)
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    args.json.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
