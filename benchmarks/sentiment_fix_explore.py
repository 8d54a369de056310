"""Which portable activation-level fix removes the MiniLM sentiment bypass? Fitted on the
derivation split only, chosen by cross-fitting on it, judged once on the held-out split.

Data: :mod:`analysis.scenarios.sentiment` (``splits(build())``): bypassed reviews (a neutral
suffix flips the label), controls (a suffix that does not), their unsuffixed twins and clean
reviews, in a derivation and a held-out split that share no review, suffix word or suffix.
Activations are read at batch 1 at ``embed`` and every ``blocks.i.resid_post``.

Candidates (``sentiment_fix_fit.py``: the generic difference of means ``dom`` and the gated
span neutralisation ``gated``) are lists of :class:`analysis.interventions.Intervention` applied
at *every* position of one site, so they are portable: :func:`analysis.interventions.applied`
installs them on the live model for any input.

Selection: two folds of the derivation split that, like the held-out split, share no suffix
word and no review (:func:`_folds`); each candidate is fitted on one fold and scored on the
other (padded batches). The pick maximises the cross-fitted flip rate among candidates whose cross-fitted clean-accuracy
drop is <= 0.5 point and controls-accuracy drop <= 2 points (ties: lower KL). It is refitted on
the whole derivation split and evaluated on the held-out split at batch 1 under ``applied()``:
flip rate (bypassed reviews classified correctly again) with its Wilson 95 % interval
(``scipy.stats.binomtest``), accuracy on held-out clean reviews and controls, mean KL of the
class distribution on clean reviews; plus multi-sentence stress reviews, the same numbers
after a ``FixSet.save`` / ``FixSet.load`` round trip (``--fix PATH``), and, with
``--adaptive N``, a greedy suffix search run *against the fixed model* on N held-out reviews.
The ``--top`` best derivation candidates are also shown on held-out (diagnostic only).

Run (~10 min on 2 CPU cores)::

    python benchmarks/sentiment_fix_explore.py --out /tmp/sentiment_fix.json --adaptive 60
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sentiment_fix_fit import GROUPS, Candidate, candidates, collect, fit, span_mask

from analysis.interventions import Intervention, applied
from analysis.scenarios._base import Prompt

log = logging.getLogger("sentiment_fix_explore")


# --------------------------------------------------------------------------- evaluation


def class_probs(model: Any, tok: Any, prompts: Sequence[Prompt], ivs: Sequence[Intervention],
                *, batch1: bool) -> torch.Tensor:
    """``[n, 2]`` class probabilities with ``ivs`` installed (batch 1, or padded batches)."""
    from analysis.scenarios._sentiment_head import encode

    rows = []
    with applied(model, ivs) if ivs else contextlib.nullcontext(), torch.no_grad():
        if batch1:
            for p in prompts:
                ids = torch.tensor([p.input_ids])  # [1, pos]
                rows.append(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits)
        else:
            for i in range(0, len(prompts), 64):
                rows.append(model(**encode(tok, [p.text for p in prompts[i:i + 64]])).logits)
    return torch.cat(rows).softmax(-1)


def score(model: Any, tok: Any, groups: dict[str, list[Prompt]], ivs: Sequence[Intervention],
          base: dict[str, torch.Tensor], *, batch1: bool) -> dict[str, float]:
    """Flip rate (+ Wilson 95 % interval), accuracy per group, mean KL on clean reviews."""
    from scipy.stats import binomtest

    out: dict[str, float] = {}
    for g, ps in groups.items():
        probs = class_probs(model, tok, ps, ivs, batch1=batch1)
        labels = torch.tensor([p.label for p in ps])
        right = int((probs.argmax(-1) == labels).sum())
        out[f"acc_{g}"] = right / len(ps)
        out[f"acc_{g}_base"] = float((base[g].argmax(-1) == labels).float().mean())
        if g == "failing":
            ci = binomtest(right, len(ps)).proportion_ci(method="wilson")
            out.update(flip=right / len(ps), flip_k=right, flip_n=len(ps),
                       flip_lb=float(ci.low), flip_hi=float(ci.high))
        if g == "clean":
            p, q = base[g].clamp_min(1e-12), probs.clamp_min(1e-12)
            out["kl_clean"] = float((p * (p.log() - q.log())).sum(-1).mean())
    out["acc_drop"] = out["acc_clean_base"] - out["acc_clean"]
    return out


def _folds(split: Any, seed: int = 0) -> list[dict[str, list[Prompt]]]:
    """Two folds of a split that share no suffix word and no review, as the held-out split
    does: suffix words are dealt to the folds (most used first, to the fold with fewer failing
    cases so far; ties in random order); a failing case whose suffix words all
    fall in one fold takes its review (twin) there, a control joins only if its words and
    its review are in that fold; the rest are left out of the cross-fit."""
    uses = Counter(w for p in split.failing for w in p.meta["suffix"].split())
    words = sorted({w for p in split.failing + split.controls for w in p.meta["suffix"].split()})
    random.Random(seed).shuffle(words)
    load, fold_of_word = [0, 0], {}
    for w in sorted(words, key=lambda w: -uses[w]):  # balance the failing cases per fold
        fold_of_word[w] = int(load[1] < load[0])
        load[fold_of_word[w]] += uses[w]

    def fold(p: Prompt) -> int | None:
        fs = {fold_of_word[w] for w in p.meta["suffix"].split()}
        return fs.pop() if len(fs) == 1 else None

    out: list[dict[str, list[Prompt]]] = [{g: [] for g in GROUPS} for _ in range(2)]
    review: dict[str, int] = {}
    for p in split.failing:
        f = fold(p)
        if f is not None and p.counterpart is not None and p.counterpart not in review:
            review[p.counterpart] = f
            out[f]["failing"].append(p)
    for p in split.controls:
        f = fold(p)
        if f is not None and review.get(p.counterpart or "") == f:
            out[f]["controls"].append(p)
    for p in split.twins:
        if p.id in review:
            out[review[p.id]]["twins"].append(p)
    for i, p in enumerate(split.clean):
        out[i % 2]["clean"].append(p)
    return out


def crossfit(model: Any, tok: Any, split: Any, cands: Sequence[Candidate]) -> list[dict[str, Any]]:
    """Cross-fitted derivation scores of every candidate (fit on one fold, score the other)."""
    folds = _folds(split)
    log.info("cross-fit folds: %s", [{g: len(f[g]) for g in GROUPS} for f in folds])
    masks = [{g: [span_mask(tok, p) for p in f[g]] for g in GROUPS} for f in folds]
    acts = [{g: collect(model, f[g]) for g in GROUPS} for f in folds]
    evals = [{g: f[g] for g in ("failing", "controls", "clean")} for f in folds]
    base = [{g: class_probs(model, tok, ps, [], batch1=False) for g, ps in e.items()}
            for e in evals]
    rows = []
    for c in cands:
        parts = [score(model, tok, evals[1 - i], fit(c, acts[i], masks[i]), base[1 - i],
                       batch1=False) for i in range(2)]
        # pooled over the folds: each rate weighted by the size of the group it is measured on
        group = {"flip": "failing", "acc_drop": "clean", "acc_controls": "controls",
                 "acc_controls_base": "controls", "kl_clean": "clean"}
        row = {k: sum(p[k] * len(evals[1 - i][g]) for i, p in enumerate(parts))
               / sum(len(e[g]) for e in evals) for k, g in group.items()}
        rows.append({"candidate": asdict(c), "label": c.label, **row})
        log.info("%-55s flip %.3f drop %+.3f ctrl %.3f kl %.4f", c.label, row["flip"],
                 row["acc_drop"], row["acc_controls"], row["kl_clean"])
    return rows


def pick(rows: Sequence[dict[str, Any]], *, max_drop: float = 0.005,
         max_ctrl_drop: float = 0.02) -> list[dict[str, Any]]:
    """Rows within the side-effect budget, best first (flip rate, then KL)."""
    ok = [r for r in rows if r["acc_drop"] <= max_drop
          and r["acc_controls_base"] - r["acc_controls"] <= max_ctrl_drop]
    return sorted(ok, key=lambda r: (-r["flip"], r["kl_clean"]))


# --------------------------------------------------------------------------- held-out checks


def stress_sets(tok: Any, n: int = 100, seed: int = 0) -> dict[str, list[Prompt]]:
    """:meth:`~analysis.scenarios._sentiment_pools.Pool.stress_reviews` of the held-out pool."""
    from analysis.scenarios.sentiment import make_pools

    rows = make_pools(seed=seed)["heldout"].stress_reviews(random.Random(f"stress-{seed}"), n)
    return {kind: [Prompt(id=f"{kind}-{i}", text=t, label=lab,
                          input_ids=[int(x) for x in tok(t)["input_ids"]])
                   for i, (t, lab) in enumerate(texts)] for kind, texts in rows.items()}


def adaptive_attack(model: Any, tok: Any, twins: Sequence[Prompt],
                    ivs: Sequence[Intervention]) -> dict[str, Any]:
    """Greedy suffix search (the scenario's own, 4 words, held-out pool words) run against the
    model *with the fix installed*; a bypass is confirmed at batch 1 under the fix."""
    from analysis.scenarios._sentiment_search import greedy_suffix
    from analysis.scenarios.sentiment import make_pools

    words = make_pools()["heldout"].suffix_words
    flipped = 0
    with applied(model, ivs):
        for t in twins:
            assert t.label is not None
            suffix = greedy_suffix(model, tok, t.text, t.label, words, max_words=4)
            ids = torch.tensor([tok(" ".join([t.text, *suffix]))["input_ids"]])  # [1, pos]
            with torch.no_grad():
                flipped += int(model(input_ids=ids).logits.argmax(-1)) != t.label
    return {"reviews": len(twins), "bypassed_under_fix": flipped,
            "rate": flipped / max(1, len(twins))}


def heldout(model: Any, tok: Any, split: Any, ivs: Sequence[Intervention]) -> dict[str, Any]:
    """Held-out numbers of one fix at batch 1 (module doc), with the stress sets."""
    groups = {"failing": split.failing, "controls": split.controls, "clean": split.clean}
    base = {g: class_probs(model, tok, ps, [], batch1=True) for g, ps in groups.items()}
    out: dict[str, Any] = score(model, tok, groups, ivs, base, batch1=True)
    out["stress"] = {}
    for name, ps in stress_sets(tok).items():
        labels = torch.tensor([p.label for p in ps])
        accs = [float((class_probs(model, tok, ps, v, batch1=True).argmax(-1) == labels)
                      .float().mean()) for v in ([], ivs)]
        out["stress"][name] = {"n": len(ps), "acc_base": accs[0], "acc_fixed": accs[1]}
    return out


def roundtrip(model: Any, tok: Any, split: Any, ivs: Sequence[Intervention], path: Path,
              measured: dict[str, Any]) -> dict[str, Any]:
    """Save the fix as a portable :class:`~analysis.cca.FixSet`, load it, and check that
    ``fix.apply(model)`` gives the held-out predictions of the interventions it was saved from."""
    from analysis.cca import FixSet

    loaded = FixSet.load(FixSet.from_saved(list(ivs), measured).save(path))
    ps = split.failing + split.controls + split.clean
    want = class_probs(model, tok, ps, ivs, batch1=True)
    with loaded.apply(model):
        got = class_probs(model, tok, ps, [], batch1=True)
    return {"path": str(path), "prompts": len(ps), "same_labels": bool(
        (got.argmax(-1) == want.argmax(-1)).all()), "max_abs_diff": float((got - want).abs().max())}


def _row(name: str, r: dict[str, Any]) -> str:
    return (f"| {name} | {r['flip_k']}/{r['flip_n']} = {r['flip']:.3f} [{r['flip_lb']:.3f}, "
            f"{r['flip_hi']:.3f}] | {r['acc_clean_base']:.3f} -> {r['acc_clean']:.3f} | "
            f"{r['acc_controls_base']:.3f} -> {r['acc_controls']:.3f} | {r['kl_clean']:.5f} |")


def report(doc: dict[str, Any]) -> str:
    """Markdown summary of a run."""
    head = ("| fix | held-out flip (Wilson 95 %) | clean acc | controls acc | KL clean |\n"
            "|---|---|---|---|---|")
    lines = ["### Chosen on derivation (cross-fitted), judged on held-out (batch 1)", "",
             head, _row(doc["chosen"]["label"], doc["heldout"]), "", "Stress sets (accuracy "
             "without -> with the fix): " + ", ".join(
                 f"{k} {v['acc_base']:.2f} -> {v['acc_fixed']:.2f}"
                 for k, v in doc["heldout"]["stress"].items())]
    if doc.get("adaptive"):
        a = doc["adaptive"]
        lines.append(f"Adaptive greedy attack under the fix: {a['bypassed_under_fix']}/"
                     f"{a['reviews']} held-out reviews bypassed")
    if doc.get("roundtrip"):
        lines.append(f"FixSet save/load round trip: {doc['roundtrip']}")
    lines += ["", "### Diagnostic: best derivation candidates per family on held-out", "", head]
    lines += [_row(r["label"], r["heldout"]) for r in doc["top"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--adaptive", type=int, default=0, help="held-out reviews to attack")
    ap.add_argument("--top", type=int, default=4, help="best candidates per family shown")
    ap.add_argument("--only", choices=["gated", "dom"], default=None)
    ap.add_argument("--fix", type=Path, default=None, help="save the chosen fix here (JSON)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    from analysis.scenarios.sentiment import build, splits

    t0 = time.perf_counter()
    sc = build(seed=0)
    model, tok, parts = sc.model, sc.tokenizer, splits(sc)
    der, held = parts["derivation"], parts["heldout"]
    cands = [c for c in candidates() if args.only in (None, c.family)]
    rows = crossfit(model, tok, der, cands)
    ranked = pick(rows)
    if not ranked:
        raise SystemExit("no candidate within the side-effect budget on derivation")
    masks = {g: [span_mask(tok, p) for p in getattr(der, g)] for g in GROUPS}
    acts = {g: collect(model, getattr(der, g)) for g in GROUPS}

    def refit(r: dict[str, Any]) -> list[Intervention]:
        return fit(Candidate(**r["candidate"]), acts, masks)

    chosen = ranked[0]
    ivs = refit(chosen)
    doc: dict[str, Any] = {"chosen": chosen, "heldout": heldout(model, tok, held, ivs),
                           "dropped": sc.dropped, "derivation": rows, "top": []}
    for family in ("gated", "dom"):
        for r in [r for r in ranked if r["candidate"]["family"] == family][:args.top]:
            doc["top"].append({**r, "heldout": heldout(model, tok, held, refit(r))})
    if args.fix:
        doc["roundtrip"] = roundtrip(model, tok, held, ivs, args.fix, {
            "reason": chosen["label"], "strategy": "sentiment_fix_explore",
            "flip": True, "heldout_flip": doc["heldout"]["flip"]})
    if args.adaptive:
        doc["adaptive"] = adaptive_attack(model, tok, held.twins[:args.adaptive], ivs)
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    print(report(doc))
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
