"""Training-data provenance: which training examples most raise a failure, where the training
data is ours (DESIGN §15) — the sentiment scenario's trained head.

* :func:`fit_linear_head` — the head's training rule on features computed once (reproduces
  :func:`analysis.scenarios.sentiment.train_head`), ``keep=`` to retrain without examples;
* :func:`influence_on_failure` — exact influence functions (per-example gradients, the
  objective's Hessian) of every training example on a failure metric over failing inputs, or
  its first-order (TracIn-style) variant; :class:`Influence` holds the scores;
* :func:`sentiment_features` — the MiniLM features of the head's training reviews and of the
  shipped scenario's bypassed and clean reviews (:class:`SentimentFeatures`), one encoder pass.

Example::

    from analysis.provenance import fit_linear_head, influence_on_failure, sentiment_features
    f = sentiment_features()
    head = fit_linear_head(f.x_train, f.y_train)
    inf = influence_on_failure(head, f.x_train, f.y_train, *f.cases["derivation"]["failing"])
    top = inf.top(50)
    mask = torch.ones(len(f.y_train), dtype=torch.bool); mask[top] = False
    again = fit_linear_head(f.x_train, f.y_train, keep=mask)
    again.error_rate(*f.cases["heldout"]["failing"])        # the held-out bypass rate now
"""

from __future__ import annotations

from ._influence import Influence, influence_on_failure
from ._linear import LinearHead, fit_linear_head
from ._sentiment import SentimentFeatures, sentiment_features

__all__ = [
    "Influence",
    "LinearHead",
    "SentimentFeatures",
    "fit_linear_head",
    "influence_on_failure",
    "sentiment_features",
]
