"""The real sentiment-bypass scenario (MiniLM-L6 + shipped head) for ``benchmarks/cf_eval.py``.

Failing = the shipped reviews whose neutral-word suffix flips the label (both splits of
:mod:`analysis.scenarios.sentiment`); benign = a sample of the shipped correctly classified
unsuffixed reviews (failing cases' twins and clean reviews); the sharper group = the shipped
controls with a RANDOM neutral-word suffix of the same length as their review's greedy suffix
on which the model is still right. Every label comes from
running the model inside the recorded request (batch 1); a prompt whose recorded prediction
disagrees with its group is dropped and counted.

Run through cf_eval (~5 min on 2 CPU cores)::

    python benchmarks/cf_eval.py --only sentiment --splits 5 --out sentiment.json
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import cf_eval  # a sibling script (benchmarks/ is not a package)

log = logging.getLogger("cf_sentiment")

SITES = cf_eval.PLANTED_BERT_SITES


def sentiment(n_base: int, n_benign: int, detectors: Sequence[str], *, seed: int = 0,
              n_suffixed: int = 60, n_failing: int | None = None,
              splits: int = 1) -> dict[str, Any]:
    """Record and evaluate the sentiment scenario (module doc); ``n_failing`` caps the shipped
    failing cases (default: all of both splits)."""
    import torch

    from analysis.scenarios.sentiment import build
    from analysis.scenarios.sentiment import splits as scenario_splits

    sc = build(seed=seed, verify=False)
    model, tok = sc.model, sc.tokenizer
    rng = random.Random(seed)
    failing = [(p.text, int(p.label)) for p in sc.failing][:n_failing]
    shipped = [(p.text, int(p.label)) for p in sc.benign]
    rng.shuffle(shipped)
    benign = shipped[:n_base + n_benign + 20]  # margin for reviews misclassified now
    controls = [(p.text, int(p.label)) for s in scenario_splits(sc).values()
                for p in s.controls if p.meta["search"] == "random"]
    rng.shuffle(controls)
    suffixed = controls[:2 * n_suffixed]
    prompts = [("benign", t, lab) for t, lab in benign] + [
        ("failing", t, lab) for t, lab in failing] + [("suffixed", t, lab) for t, lab in suffixed]
    predicted: dict[int, int] = {}

    def runner(i: int, text: str) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                logits = model(**tok(text, return_tensors="pt")).logits  # [1, 2]
            predicted[i] = int(logits.argmax(-1))
        return run

    t0 = time.perf_counter()
    incs = cf_eval.record(model, [runner(i, t) for i, (_, t, _) in enumerate(prompts)], SITES,
                          "sentiment")
    rec_s = time.perf_counter() - t0
    groups: dict[str, list[Any]] = {"benign": [], "failing": [], "suffixed": []}
    dropped = {"benign_misclassified": 0, "failing_not_flipped": 0, "suffixed_flipped": 0}
    for i, ((group, _, label), inc) in enumerate(zip(prompts, incs)):
        wrong = predicted[i] != label  # the failure label: the model's own recorded output
        if group == "failing" and not wrong:
            dropped["failing_not_flipped"] += 1
        elif group != "failing" and wrong:
            dropped["benign_misclassified" if group == "benign" else "suffixed_flipped"] += 1
        else:
            groups[group].append(inc)
    ben, fail, suf = groups["benign"], groups["failing"], groups["suffixed"][:n_suffixed]
    order = list(range(len(ben)))
    random.Random(seed).shuffle(order)  # shipped and fresh reviews in both halves
    ben = [ben[i] for i in order][:n_base + n_benign]
    if len(ben) < n_base + 10 or not fail:
        raise RuntimeError(f"too few correctly classified benign ({len(ben)}) or failing "
                           f"({len(fail)}) reviews; dropped: {dropped}")
    others = {"suffixed_not_failing": suf} if suf else None
    res, split_rows = cf_eval.evaluate_splits(ben, fail, n_base, detectors, others, splits)
    first = incs[0]
    return {"n_base": n_base, "n_benign": len(ben) - n_base, "n_failing": len(fail),
            "n_suffixed_not_failing": len(suf), "dropped": dropped, "record_s": rec_s,
            "sites": len(first.sites("activation")), "results": res, "splits": split_rows,
            "heldout_accuracy_at_training": sc.meta.get("heldout_accuracy_at_training")}


def report(j: dict[str, Any]) -> str:
    """Markdown for the sentiment section of cf_eval's report."""
    head = (f"### MiniLM-L6 sentiment bypass ({j['n_failing']} failing, {j['n_benign']} held-out "
            f"benign, {j['n_suffixed_not_failing']} with a random neutral suffix but not "
            f"failing, baseline {j['n_base']} benign; {j['sites']} sites; dropped "
            f"{j['dropped']})\n\n")
    out = head + cf_eval._fmt_table(j["results"], False)
    if len(j.get("splits", [])) > 1:
        out += "\n\n" + cf_eval.splits_table(j["splits"], "suffixed_not_failing")
    return out
