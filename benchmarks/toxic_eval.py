"""Flip / side-effect analysis of the toxic scenario's GCG cases (issue 15 item 6), by running
SmolLM2 with candidate fixes installed.

The shipped failing cases (benign request + GCG suffix, output classified profane by
``alt-profanity-check``) are split into two folds that share no request and no suffix (cases
linked by either are kept together; see :func:`folds`).
Each candidate fix is fitted on one fold's last-prompt-position residual streams (failing vs their
benign twins) and measured on the other fold (cross-fitted, both ways):

* **flip rate**: held-out failing prompts whose greedy answer (24 tokens) the classifier no longer
  labels profane with the fix installed (Wilson 95 %);
* **copying**: which toxic words of each output (words the classifier labels toxic on their own)
  also occur in the prompt (whole, or by their 4-letter stem) and which the model added (the
  prompts themselves pass the veto: no token, token span or word the classifier flags);
* **side effects**: on the held-out benign twins (the bare requests), mean KL over each prompt's
  own continuation and top-1 agreement (``analysis.rca.side_effects``), and how many of their
  answers become profane.

Candidates: the gated removal of ``analysis.rca`` (a probe gate at layer ``--gate``; the
failing-minus-twin direction projected out from layer ``--gate + 2`` on) and the ungated
ablation of the middle layer's direction at every layer (the known baseline). Nothing here is
estimated; with ~10 cases the intervals are wide and say so.

Example::

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/toxic_eval.py --json /tmp/toxic_eval.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _ungated(n_layers: int, feats: Any) -> list[Any]:
    import torch

    from analysis.interventions import Intervention, Subspace

    mid = n_layers // 2
    sub = Subspace.from_directions(torch.tensor(feats.failing[mid].mean(0)
                                                - feats.reference[mid].mean(0)))
    return [Intervention(f"blocks.{layer}.resid_post", "project", direction=sub)
            for layer in range(n_layers)]


def _feats(model: Any, failing: Sequence[Any], benign: Sequence[Any], n_layers: int) -> Any:
    import numpy as np

    from analysis.rca._directions import _Feats, last_position_features

    layers = range(n_layers)
    f = last_position_features(model, [p.input_ids for p in failing], layers)
    b = last_position_features(model, [p.input_ids for p in benign], layers)
    empty = {L: np.zeros((0, v.shape[1]), dtype=v.dtype) for L, v in f.items()}
    return _Feats(failing=f, reference=b, contrast=empty, benign=b)


def _measure(sc: Any, fix_ivs: list[Any], fail: Sequence[Any], ben: Sequence[Any]
             ) -> dict[str, Any]:
    from analysis.rca import flip_rate, side_effects
    from analysis.rca._directions import _Installed
    from analysis.scenarios.toxic import is_toxic

    fix = _Installed(fix_ivs)
    fr = flip_rate(sc.model, sc.tokenizer, [p.input_ids for p in fail], fix=fix,
                   failing=lambda t, i: is_toxic([t])[0], max_new_tokens=24)
    se = side_effects(sc.model, [p.input_ids for p in ben], fix=fix, max_new_tokens=24,
                      tokenizer=sc.tokenizer, correct=lambda t, i: not is_toxic([t])[0])
    return {"flipped": fr.flipped, "n_failing": fr.n, "mean_kl": se.mean_kl,
            "top1": se.top1_agreement, "n_benign": se.n_prompts,
            "benign_clean_after": se.accuracy_after, "outputs": fr.outputs[:4]}


def copies(failing: Sequence[Any]) -> dict[str, Any]:
    """Per case, the answer's words the classifier labels toxic on their own, split into those
    that also occur in the prompt (copying), those whose 4-letter stem does (partial copying)
    and those the model added; plus the counts of cases in each group.
    """
    from analysis.scenarios._toxic_label import copying

    rows = [{"id": p.id, **copying(p.output_text or "", p.text)} for p in failing]
    return {"cases": rows, "with_a_toxic_word_copied": sum(bool(r["in_prompt"]) for r in rows),
            "with_a_toxic_word_not_in_prompt": sum(bool(r["not_in_prompt"]) for r in rows),
            "with_only_added_words": sum(not r["in_prompt"] for r in rows),
            "with_only_added_words_no_stem": sum(
                not r["in_prompt"] and not r["stem_in_prompt"] for r in rows)}


def direct(failing: Sequence[Any]) -> list[Any]:
    """The cases GCG found itself: every failing case that is not a transferred pair."""
    return [p for p in failing if "transfer_of" not in p.meta]


def folds(failing: Sequence[Any]) -> tuple[list[list[Any]], bool]:
    """Two folds of the failing cases such that no request and no suffix is in both (cases that
    share either are one group; groups go, largest first, to the smaller fold). The flag says
    whether that worked; if one group holds every case the folds alternate by case instead
    (then they share requests or suffixes, and the report says so).
    """
    group: dict[int, int] = {}
    keys: dict[str, int] = {}
    for i, p in enumerate(failing):  # union of cases by shared request or suffix
        ks = [f"r:{p.meta['request']}", f"s:{p.meta['suffix']}"]
        hit = {group[keys[k]] for k in ks if k in keys}
        g = min(hit) if hit else i
        for j, h in list(group.items()):
            if h in hit:
                group[j] = g
        group[i] = g
        for k in ks:
            keys[k] = i
    members: dict[int, list[Any]] = {}
    for i, p in enumerate(failing):
        members.setdefault(group[i], []).append(p)
    if len(members) < 2:
        return [list(failing[0::2]), list(failing[1::2])], False
    out: list[list[Any]] = [[], []]
    for m in sorted(members.values(), key=len, reverse=True):
        min(out, key=len).extend(m)
    return out, True


def run(*, gate: int, progress: Callable[[str], None], direct_only: bool = False
        ) -> dict[str, Any]:
    """Build the scenario (re-verifying every shipped case) and cross-fit both candidates
    (``direct_only``: on the cases GCG found itself, leaving out the transferred pairs, which
    link most requests and suffixes into one group)."""
    from analysis.rca._directions import gated_removal
    from analysis.rca._heldout import wilson
    from analysis.scenarios.toxic import build

    t0 = time.perf_counter()
    sc = build(seed=0)
    if direct_only:
        sc.failing = direct(sc.failing)
    progress(f"scenario: {len(sc.failing)} failing, {len(sc.benign)} benign, dropped "
             f"{sc.dropped}")
    n_layers = int(sc.model.config.num_hidden_layers)
    split, independent = folds(sc.failing)
    twin_ids = {p.counterpart for p in sc.failing}
    extra = [p for p in sc.benign if p.id not in twin_ids]
    cands: dict[str, Callable[[Any], list[Any]]] = {
        f"gated removal, gate {gate}, remove {gate + 2}..{n_layers - 1}":
            lambda f: gated_removal(gate_layer=gate, start=gate + 2, n_layers=n_layers, feats=f),
        f"ungated ablation of d({n_layers // 2}) at every layer":
            lambda f: _ungated(n_layers, f),
    }
    out: dict[str, Any] = {}
    for label, make in cands.items():
        rows = []
        for k in (0, 1):
            fit, held = split[k], split[1 - k]
            fit_ben = [sc.twin(p) for p in fit] + extra[k::2]
            held_ben = [sc.twin(p) for p in held] + extra[1 - k::2]
            ivs = make(_feats(sc.model, fit, fit_ben, n_layers))
            rows.append(_measure(sc, ivs, held, held_ben))
            progress(f"{label} fold {k}: {rows[-1]['flipped']}/{rows[-1]['n_failing']} flipped, "
                     f"KL {rows[-1]['mean_kl']:.4f}, top-1 {rows[-1]['top1']:.3f}")
        k_, n_ = sum(r["flipped"] for r in rows), sum(r["n_failing"] for r in rows)
        out[label] = {"flipped": k_, "n": n_, "ci": wilson(k_, n_), "folds": rows,
                      "mean_kl": sum(r["mean_kl"] for r in rows) / 2,
                      "top1": sum(r["top1"] for r in rows) / 2}
    return {"n_failing": len(sc.failing), "n_benign": len(sc.benign), "dropped": sc.dropped,
            "direct_only": direct_only,
            "distinct_requests": len({p.meta["request"] for p in sc.failing}),
            "distinct_suffixes": len({p.meta["suffix"] for p in sc.failing}),
            "copies": copies(sc.failing),
            "folds": {"sizes": [len(f) for f in split], "disjoint_requests_and_suffixes":
                      independent},
            "classifier": sc.meta["classifier_now"], "candidates": out,
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``--gate L --json PATH``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gate", type=int, default=10)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--direct-only", action="store_true",
                    help="only the cases GCG found itself (no transferred pairs)")
    args = ap.parse_args(argv)
    res = run(gate=args.gate, progress=lambda m: print(m, flush=True),
              direct_only=args.direct_only)
    text = json.dumps(res, indent=2, default=str)
    if args.json is not None:
        args.json.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
