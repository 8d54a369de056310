"""A linear softmax head over fixed features, and its training: the model provenance can retrain.

:func:`fit_linear_head` is the training rule of the sentiment scenario's head
(:func:`analysis.scenarios.sentiment.train_head`) on features computed once: L2-regularised
multinomial logistic regression, ``mean CE(x W^T + b, y) + weight_decay * |W|^2``, full-batch
L-BFGS (strong Wolfe, 1000 iterations) from ``W ~ 0.01 N(0, 1)`` drawn from a generator seeded
with ``seed`` and ``b = 0``. Given the same pooled features it reproduces the shipped head (the
provenance benchmark measures how closely). ``keep`` retrains on a subset: what removal tests use.

Example::

    head = fit_linear_head(x, y, seed=0, weight_decay=1e-3)
    head.predict(x_test), head.margin(x_test, y_test)      # > 0: the wrong class wins
    without = fit_linear_head(x, y, seed=0, keep=mask)     # retrained without some examples
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["LinearHead", "fit_linear_head"]


@dataclass(frozen=True)
class LinearHead:
    """``logits = x @ weight.T + bias``: ``weight`` [classes, features], ``bias`` [classes];
    ``weight_decay`` is the L2 coefficient it was trained with (its Hessian needs it)."""

    weight: torch.Tensor
    bias: torch.Tensor
    weight_decay: float

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, classes]`` logits of features ``x`` [n, features]."""
        return x @ self.weight.T + self.bias

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """``[n]`` predicted classes."""
        return self.logits(x).argmax(-1)

    def margin(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``[n]`` failure margin: the largest wrong-class logit minus the true class's (> 0:
        misclassified) — the metric of ``Failure.label(wrong)`` for two classes."""
        z = self.logits(x)  # [n, classes]
        true = z.gather(1, y[:, None])[:, 0]  # [n]
        wrong = z.scatter(1, y[:, None], float("-inf")).max(-1).values  # [n]
        return wrong - true

    def error_rate(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Share of rows misclassified (on bypassed reviews: the bypass rate)."""
        return float((self.predict(x) != y).float().mean())


def fit_linear_head(x: torch.Tensor, y: torch.Tensor, *, seed: int = 0,
                    weight_decay: float = 1e-3, n_classes: int = 2,
                    keep: torch.Tensor | None = None) -> LinearHead:
    """Train the head on features ``x`` [n, d] and labels ``y`` [n] (module doc); ``keep``
    (bool [n]) trains on those rows only, from the same initialisation.

    Example::

        head = fit_linear_head(x, y, seed=0)
    """
    import torch

    if keep is not None:
        x, y = x[keep], y[keep]
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n_classes, x.shape[1], generator=gen) * 0.01).requires_grad_()
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=1000, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w.T + b, y) + weight_decay * (w ** 2).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    return LinearHead(weight=w.detach().contiguous(), bias=b.detach().contiguous(),
                      weight_decay=weight_decay)
