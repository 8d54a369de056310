"""Finding sentiment bypasses by running the model: greedy suffix search, random-suffix controls.

For one :class:`~analysis.scenarios._sentiment_pools.Pool` (:func:`search_pool`): draw
reviews, keep those the model classifies correctly at batch 1 (the *twins*), and for each

* search a suffix greedily (:func:`greedy_suffix`: each step appends the pool's suffix word that
  most raises the wrong label's probability, all candidates in one padded batch, and stops at the
  first step where the wrong label wins or after ``max_words``). If the suffixed review is
  misclassified at batch 1 it is a *failing* case; if not, a *control* (``search="greedy"``);
* draw a random suffix of the same length from the pool's words (:func:`random_control`) until
  one leaves the label right at batch 1 (``search="random"``; draws that flip are counted, not
  kept): a suffixed-but-not-failing *control* matched to the same review.

Then further reviews of the pool, unsuffixed and never used as twins, are labelled at batch 1
(*clean*: correct and misclassified alike, for accuracy). Every label comes from running the
model; the true label comes from the template (which adjective list the review used).

Example::

    out = search_pool(model, tok, make_pools()["heldout"], n_failing=5, n_clean=10)
    out["failing"][0].meta["suffix"], out["stats"]
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from analysis.scenarios._base import Prompt
from analysis.scenarios._sentiment_head import encode
from analysis.scenarios._sentiment_pools import Pool

if TYPE_CHECKING:
    from transformers import BertForSequenceClassification

__all__ = ["batch1_probs", "greedy_suffix", "random_control", "search_pool"]

_log = logging.getLogger(__name__)


def batch1_probs(model: BertForSequenceClassification, tokenizer: Any,
                 text: str) -> list[float]:
    """Class probabilities of ``text`` run alone (batch 1, no padding): the labelling run."""
    import torch

    ids = torch.tensor([tokenizer(text)["input_ids"]])  # [1, pos]
    with torch.no_grad():
        probs = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.softmax(-1)
    return [float(x) for x in probs[0]]  # [2]


def greedy_suffix(model: BertForSequenceClassification, tokenizer: Any, text: str, label: int,
                  words: Sequence[str], *, max_words: int = 4) -> list[str]:
    """Greedy neutral-word suffix pushing ``text`` away from ``label`` (module doc; batched, so
    the result must be re-checked at batch 1).

    Example::

        greedy_suffix(model, tok, "The film was great.", 1, ["street", "tea"], max_words=2)
    """
    import torch

    suffix: list[str] = []
    wrong = 1 - label
    for _ in range(max_words):
        cands = [" ".join([text, *suffix, w]) for w in words]
        with torch.no_grad():
            probs = torch.cat([model(**encode(tokenizer, cands[i:i + 128])).logits.softmax(-1)
                               for i in range(0, len(cands), 128)])  # [n_words, 2]
        best = int(probs[:, wrong].argmax())
        suffix.append(words[best])
        if float(probs[best, wrong]) > 0.5:
            break
    return suffix


def random_control(model: BertForSequenceClassification, tokenizer: Any, text: str,
                   label: int, words: Sequence[str], length: int, rng: random.Random, *,
                   tries: int = 10) -> tuple[list[str] | None, int]:
    """A random ``length``-word suffix from ``words`` that leaves ``text`` correctly classified
    at batch 1, or None after ``tries`` draws; also returns how many draws flipped the label.

    Example::

        suffix, flips = random_control(model, tok, "The film was great.", 1, words, 2, rng)
    """
    flips = 0
    for _ in range(tries):
        suffix = rng.sample(list(words), length)
        probs = batch1_probs(model, tokenizer, " ".join([text, *suffix]))
        if max(range(2), key=lambda k: probs[k]) == label:
            return suffix, flips
        flips += 1
    return None, flips


def _suffixed(tokenizer: Any, pid: str, twin: Prompt, suffix: list[str], probs: list[float],
              search: str, pool: str) -> Prompt:
    text = " ".join([twin.text, *suffix])
    pred = max(range(2), key=lambda k: probs[k])
    assert twin.label is not None
    return Prompt(id=pid, text=text, input_ids=[int(t) for t in tokenizer(text)["input_ids"]],
                  label=twin.label, predicted=pred, counterpart=twin.id,
                  meta={"split": pool, "suffix": " ".join(suffix), "base_text": twin.text,
                        "search": search, "p_wrong": probs[1 - twin.label]})


def _unsuffixed(tokenizer: Any, pid: str, text: str, label: int, probs: list[float],
                pool: str, role: str) -> Prompt:
    return Prompt(id=pid, text=text, input_ids=[int(t) for t in tokenizer(text)["input_ids"]],
                  label=label, predicted=max(range(2), key=lambda k: probs[k]),
                  meta={"split": pool, "role": role, "p_wrong": probs[1 - label]})


def _one_review(model: Any, tokenizer: Any, pool: Pool, k: int, text: str, label: int,
                rng: random.Random, max_words: int, out: dict[str, Any]) -> None:
    """Search one review (module doc); appends to ``out``'s lists and counts to its stats."""
    tag, st = pool.name[0], out["stats"]
    probs = batch1_probs(model, tokenizer, text)
    if max(range(2), key=lambda i: probs[i]) != label:
        st["misclassified_unsuffixed"] += 1
        return
    twin = _unsuffixed(tokenizer, f"{tag}-review-{k}", text, label, probs, pool.name, "twin")
    out["twins"].append(twin)
    suffix = greedy_suffix(model, tokenizer, text, label, pool.suffix_words, max_words=max_words)
    sprobs = batch1_probs(model, tokenizer, " ".join([text, *suffix]))
    adv = _suffixed(tokenizer, f"{tag}-bypass-{k}", twin, suffix, sprobs, "greedy", pool.name)
    if adv.predicted != label:
        out["failing"].append(adv)
    else:
        st["greedy_not_flipped"] += 1
        adv.id = f"{tag}-control-greedy-{k}"
        out["controls"].append(adv)
    ctrl, flips = random_control(model, tokenizer, text, label, pool.suffix_words, len(suffix),
                                 rng)
    st["random_draws"] += flips + (ctrl is not None)
    st["random_draws_flipped"] += flips
    if ctrl is not None:
        cprobs = batch1_probs(model, tokenizer, " ".join([text, *ctrl]))
        out["controls"].append(_suffixed(tokenizer, f"{tag}-control-{k}", twin, ctrl, cprobs,
                                         "random", pool.name))


def search_pool(model: BertForSequenceClassification, tokenizer: Any, pool: Pool, *,
                seed: int = 0, n_failing: int = 120, n_clean: int = 200, max_words: int = 4,
                max_reviews: int = 2000) -> dict[str, Any]:
    """Failing cases, controls, twins and clean reviews of one pool (module doc).

    Reviews are searched until ``n_failing`` failing cases and as many controls are found (at
    most ``max_reviews``); then ``n_clean`` further reviews are labelled.
    """
    t0 = time.perf_counter()
    rng = random.Random(f"sentiment-search-{pool.name}-{seed}")
    rows = pool.reviews(rng, min(max_reviews + n_clean, len(pool.all_reviews())))
    out: dict[str, Any] = {"failing": [], "controls": [], "twins": [], "clean": [], "stats": {
        "reviews_searched": 0, "misclassified_unsuffixed": 0, "greedy_not_flipped": 0,
        "random_draws": 0, "random_draws_flipped": 0}}
    k = 0
    while k < len(rows) - n_clean and (len(out["failing"]) < n_failing
                                       or len(out["controls"]) < n_failing):
        text, label = rows[k]
        _one_review(model, tokenizer, pool, k, text, label, rng, max_words, out)
        k += 1
        if k % 20 == 0:
            _log.info("%s: %d reviews, %d failing, %d controls", pool.name, k,
                      len(out["failing"]), len(out["controls"]))
    out["stats"]["reviews_searched"] = k
    for j, (text, label) in enumerate(rows[k:k + n_clean], start=k):
        probs = batch1_probs(model, tokenizer, text)
        out["clean"].append(_unsuffixed(tokenizer, f"{pool.name[0]}-clean-{j}", text, label,
                                        probs, pool.name, "clean"))
    out["stats"].update(max_suffix_words=max_words, candidates=len(pool.suffix_words),
                        seconds=round(time.perf_counter() - t0, 1))
    return out
