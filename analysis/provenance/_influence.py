"""Which training examples most raise a failure: influence functions on a linear head.

For the L2-regularised logistic head of :mod:`._linear` (convex, a few hundred parameters) the
influence function (Koh & Liang 2017) is computed exactly: per-example gradients ``g_z`` of the
training loss and the Hessian ``H`` of the full training objective (loss + L2 term) at the trained
parameters, both in closed form (a softmax linear head's are), ``grad F`` by autograd; the
failure ``F`` is the mean failure margin (:meth:`LinearHead.margin`: > 0 misclassified) over
the failing inputs (``metric="margin"``) or their mean wrong-class probability
(``"probability"``). Removing training example ``z`` changes
the parameters by about ``H^-1 g_z / n``, hence ``F`` by about ``grad F . H^-1 g_z / n``; an
example's **score** is minus that — how much its presence raises the failure (``> 0``: removing
it should lower ``F``). ``method="gradient"`` drops ``H^-1`` (TracIn at the final checkpoint, a
first-order baseline). ``H`` is inverted with a pseudo-inverse: the two-class softmax is
invariant to adding a constant to both biases, a direction every gradient is orthogonal to.

Scores are predictions; :func:`~analysis.provenance.fit_linear_head` with ``keep=`` retrains
without the examples, which is how the provenance benchmark checks them.

Example::

    inf = influence_on_failure(head, x_train, y_train, x_fail, y_fail)
    inf.top(10)                       # indices of the 10 examples that most raise the failure
    inf.scores[inf.top(1)], inf.failure
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from integrations.errors import AnalysisError

from ._linear import LinearHead

if TYPE_CHECKING:
    import torch

__all__ = ["METHODS", "METRICS", "Influence", "influence_on_failure"]

METHODS = ("influence", "gradient")
METRICS = ("margin", "probability")


@dataclass(frozen=True)
class Influence:
    """Per-training-example scores (module doc): ``scores`` [n_train] (> 0: raises the
    failure), the failure ``F`` at the trained head, and how it was computed."""

    scores: torch.Tensor
    failure: float
    method: str
    metric: str
    n_failing: int

    def top(self, k: int) -> list[int]:
        """Indices of the ``k`` examples with the highest scores, highest first."""
        return [int(i) for i in self.scores.argsort(descending=True)[:k]]

    def predicted_change(self, remove: list[int]) -> float:
        """Predicted change of ``F`` when the examples ``remove`` are left out (first order:
        minus the sum of their scores)."""
        return -float(self.scores[remove].sum())


def _failure(metric: str, theta: torch.Tensor, x: torch.Tensor,
             y: torch.Tensor) -> torch.Tensor:
    """``F`` at parameters ``theta`` [classes, features + 1] (last column: the bias)."""
    head = LinearHead(weight=theta[:, :-1], bias=theta[:, -1], weight_decay=0.0)
    if metric == "margin":
        return head.margin(x, y).mean()
    p = head.logits(x).softmax(-1)  # [n, classes]
    return (1.0 - p.gather(1, y[:, None])[:, 0]).mean()


def _hessian(theta: torch.Tensor, xt: torch.Tensor, weight_decay: float) -> torch.Tensor:
    """Hessian of ``mean CE + weight_decay * |W|^2`` (closed form for a softmax linear head):
    ``mean_i (diag p_i - p_i p_i^T) ⊗ x_i x_i^T`` plus ``2 weight_decay`` on the weights;
    ``[P, P]`` with ``P = classes * (features + 1)``, laid out like ``theta.reshape(-1)``."""
    import torch

    p = (xt @ theta.T).softmax(-1)  # [n, classes]
    a = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # [n, classes, classes]
    h = torch.einsum("nab,ni,nj->aibj", a, xt, xt) / len(xt)  # [c, d+1, c, d+1]
    c, d1 = theta.shape
    h = h.reshape(c * d1, c * d1)
    reg = torch.ones(c, d1, dtype=h.dtype)
    reg[:, -1] = 0.0  # the bias is not regularised
    return h + torch.diag(2.0 * weight_decay * reg.reshape(-1))


def influence_on_failure(head: LinearHead, x_train: torch.Tensor, y_train: torch.Tensor,
                         x_fail: torch.Tensor, y_fail: torch.Tensor, *,
                         method: str = "influence", metric: str = "margin") -> Influence:
    """Score every training example by how much it raises the failure on ``x_fail`` (their
    true labels ``y_fail``) under ``head`` (trained on ``x_train``, ``y_train``), module doc.

    Example::

        inf = influence_on_failure(head, x, y, x_bypassed, y_bypassed)
    """
    import torch

    if method not in METHODS or metric not in METRICS:
        raise AnalysisError(f"method={method!r}, metric={metric!r}: use a method of {METHODS} "
                            f"and a metric of {METRICS}")
    if len(x_fail) == 0:
        raise AnalysisError("no failing inputs to attribute: pass the misclassified ones")
    theta = torch.cat([head.weight, head.bias[:, None]], 1).double()  # [c, d+1]
    ones = torch.ones(len(x_train), 1, dtype=torch.float64)
    xt = torch.cat([x_train.double(), ones], 1)  # [n, d+1]
    resid = (xt @ theta.T).softmax(-1)  # [n, c]: dCE/dz = p - onehot(y)
    resid[torch.arange(len(xt)), y_train] -= 1.0
    g = (resid[:, :, None] * xt[:, None, :]).reshape(len(xt), -1)  # [n, P] per-example grads
    th = theta.clone().requires_grad_()
    fail = _failure(metric, th, x_fail.double(), y_fail)
    (direction,) = torch.autograd.grad(fail, th)
    direction = direction.reshape(-1)  # [P]
    if method == "influence":
        h = _hessian(theta, xt, head.weight_decay)
        direction = torch.linalg.pinv(h, hermitian=True) @ direction
    scores = -(g @ direction) / len(xt)  # [n]
    return Influence(scores=scores.float(), failure=float(fail.detach()), method=method,
                     metric=metric, n_failing=len(x_fail))
