"""The sentiment head's provenance data: MiniLM features of its training reviews and of the
scenario's reviews, computed once.

The head of :mod:`analysis.scenarios.sentiment` is a linear classifier over the pooled MiniLM
output ``tanh(0.3 * [CLS])``; the encoder and pooler are fixed, so the features of every review
are computed once here and the head can be retrained in a fraction of a second
(:func:`~analysis.provenance.fit_linear_head`). Training features are pooled exactly as
``train_head`` pools them (its reviews in order, padded batches of 64); the scenario's reviews
(shipped in ``data/sentiment_cases.json``, re-verified on load by
:func:`analysis.scenarios.sentiment.build`) are pooled one at a time from their shipped token
ids, as the scenario runs them.

Example::

    f = sentiment_features()
    x, y = f.cases["heldout"]["failing"]       # the held-out bypassed reviews, true labels
    f.x_train.shape, f.shipped.error_rate(x, y)     # (600, 384), 1.0 (all bypassed as shipped)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._linear import LinearHead

if TYPE_CHECKING:
    import torch

__all__ = ["SentimentFeatures", "sentiment_features"]

#: The shipped head's training rule (``train_head``'s defaults).
WEIGHT_DECAY = 1e-3


@dataclass
class SentimentFeatures:
    """Pooled features and labels: ``x_train``/``y_train`` (the head's 600 training reviews,
    ``train_texts``), ``x_reviews``/``y_reviews`` (``make_reviews``' held-out reviews: the
    head's own accuracy set), ``cases[split][group] = (x, y)`` for splits ``derivation`` and
    ``heldout`` and groups ``failing`` (bypassed reviews) and ``clean``; ``shipped`` is the
    shipped head as a :class:`LinearHead`, ``dropped`` the cases the scenario dropped on load."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    train_texts: list[str]
    x_reviews: torch.Tensor
    y_reviews: torch.Tensor
    cases: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]
    shipped: LinearHead
    dropped: list[tuple[str, str]] = field(default_factory=list)


def _pooled_batches(model: Any, tokenizer: Any, texts: Sequence[str],
                    batch_size: int = 64) -> torch.Tensor:
    import torch

    from analysis.scenarios._sentiment_head import encode

    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            out.append(model.bert(**encode(tokenizer, texts[i:i + batch_size])).pooler_output)
    return torch.cat(out)  # [n, 384]


def _pooled_one_by_one(model: Any, prompts: Sequence[Any]) -> torch.Tensor:
    import torch

    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p.input_ids])  # [1, pos]
            out.append(model.bert(input_ids=ids, attention_mask=torch.ones_like(ids)
                                  ).pooler_output)
    return torch.cat(out)  # [n, 384]


def _label(p: Any) -> int:
    if p.label is None:  # pragma: no cover - every shipped sentiment case has its label
        raise ValueError(f"sentiment case {p.id} has no label")
    return int(p.label)


def sentiment_features(*, seed: int = 0, n_failing: int | None = None,
                       n_clean: int | None = None) -> SentimentFeatures:
    """Run the MiniLM encoder once over every review the provenance analysis needs (module
    doc); ``seed`` is the head's data seed (``make_reviews``, ``train_head``); ``n_failing`` /
    ``n_clean`` subsample the scenario's bypassed / clean reviews per split (default all).

    Example::

        f = sentiment_features(n_failing=30, n_clean=30)
    """
    import torch

    from analysis.scenarios.sentiment import build, make_reviews, splits

    sc = build(seed=seed, n_failing=n_failing, n_controls=0, n_clean=n_clean)
    model = sc.model
    data = make_reviews(seed=seed)
    cases: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, split in splits(sc).items():
        cases[name] = {g: (_pooled_one_by_one(model, ps),
                           torch.tensor([_label(p) for p in ps]))
                       for g, ps in (("failing", split.failing), ("clean", split.clean))}
    texts = [t for t, _ in data["train"]]
    shipped = LinearHead(weight=model.classifier.weight.detach().clone(),
                         bias=model.classifier.bias.detach().clone(), weight_decay=WEIGHT_DECAY)
    return SentimentFeatures(
        x_train=_pooled_batches(model, sc.tokenizer, texts),
        y_train=torch.tensor([lab for _, lab in data["train"]]), train_texts=texts,
        x_reviews=_pooled_batches(model, sc.tokenizer, [t for t, _ in data["heldout"]]),
        y_reviews=torch.tensor([lab for _, lab in data["heldout"]]), cases=cases,
        shipped=shipped, dropped=list(sc.dropped))
