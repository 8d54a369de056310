"""Failure signatures: cross-validated linear probes that read "this incident failed" off its
activations (DESIGN §14 step 5), and how well they do it.

A probe is logistic regression on one feature vector per incident (e.g. the residual stream at
the last prompt position, or averaged over decode steps), standardised by the training folds'
mean and spread. Quality is measured out of fold only, with folds formed by *group* (e.g. the
injected phrasing, or the input) so that no test fold shares a group with its training folds:
AUROC with a seeded bootstrap 95 % interval, and the true-positive rate at 1 % false-positive
rate (what an alert on the probe would catch at that false-alarm budget). Run over sites it
gives the *decodability curve*: at which layer the failure becomes linearly readable.

Example::

    res = cross_validate(X, y, groups=phrasing_ids, folds=5)
    res.auroc, res.auroc_ci, res.tpr_at_1pct_fpr
    probe = LinearProbe.fit(X, y)            # on everything, for scoring new incidents
    probe.score(x_new)                       # probability of the failure class
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["LinearProbe", "ProbeResult", "auroc_ci", "cross_validate", "tpr_at_fpr"]


@dataclass(frozen=True)
class LinearProbe:
    """A fitted, standardised logistic-regression probe (JSON-able: weights as lists).

    ``score(x)`` is the probability of the positive class; ``logit(x)`` the linear score
    ``w . (x - mean) / scale + b``.
    """

    mean: np.ndarray      # [d]
    scale: np.ndarray     # [d]
    weight: np.ndarray    # [d]
    bias: float

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, *, c: float = 0.05) -> LinearProbe:
        """Fit on ``x`` ``[n, d]`` and binary labels ``y`` ``[n]`` (L2, class-balanced)."""
        from sklearn.linear_model import LogisticRegression

        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y).astype(int)
        if x.ndim != 2 or len(x) != len(y) or len(set(y.tolist())) != 2:
            raise ValueError("a probe needs x [n, d] and labels of both classes")
        mean = x.mean(0)
        scale = x.std(0) + 1e-6
        clf = LogisticRegression(C=c, max_iter=5000, class_weight="balanced")
        clf.fit((x - mean) / scale, y)
        return cls(mean=mean, scale=scale, weight=clf.coef_[0].astype(np.float64),
                   bias=float(clf.intercept_[0]))

    def logit(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, dtype=np.float64) - self.mean) / self.scale) @ self.weight \
            + self.bias

    def score(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(1.0 / (1.0 + np.exp(-self.logit(x))))

    def raw_direction(self) -> tuple[np.ndarray, float]:
        """``(w, b)`` such that ``logit(x) = w . x + b`` (for a gate on raw activations)."""
        w = self.weight / self.scale
        return w, float(self.bias - (self.mean / self.scale) @ self.weight)

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist(),
                "weight": self.weight.tolist(), "bias": self.bias}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LinearProbe:
        """Rebuild from :meth:`to_dict` output, validated (lengths, finiteness)."""
        arrs = [np.asarray(d.get(k), dtype=np.float64) for k in ("mean", "scale", "weight")]
        bias = d.get("bias")
        if not isinstance(bias, int | float) or any(a.ndim != 1 for a in arrs) or \
                len({a.shape for a in arrs}) != 1 or \
                not all(np.isfinite(a).all() for a in arrs) or (arrs[1] <= 0).any():
            raise ValueError("probe dict needs equal-length finite mean/scale(>0)/weight and bias")
        return cls(mean=arrs[0], scale=arrs[1], weight=arrs[2], bias=float(bias))


def tpr_at_fpr(y: np.ndarray, s: np.ndarray, fpr: float = 0.01) -> float:
    """The largest true-positive rate at a threshold whose false-positive rate is <= ``fpr``."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(s, dtype=np.float64)
    neg = np.sort(s[~y])[::-1]
    allowed = int(np.floor(fpr * len(neg)))     # negatives allowed strictly above threshold
    thr = neg[allowed] if allowed < len(neg) else -np.inf
    return float((s[y] > thr).mean())


def _auroc(y: np.ndarray, s: np.ndarray) -> float:
    from scipy.stats import rankdata

    r = rankdata(s)
    n1 = int(y.sum())
    n0 = len(y) - n1
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def auroc_ci(y: np.ndarray, s: np.ndarray, *, n_boot: int = 1000,
             seed: int = 0) -> tuple[float, tuple[float, float]]:
    """AUROC and its percentile bootstrap 95 % interval (resampling examples, seeded)."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(s, dtype=np.float64)
    point = _auroc(y, s)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if 0 < y[idx].sum() < len(idx):
            boots.append(_auroc(y[idx], s[idx]))
    lo, hi = np.percentile(boots, [2.5, 97.5]) if boots else (point, point)
    return point, (float(lo), float(hi))


@dataclass(frozen=True)
class ProbeResult:
    """Out-of-fold quality of a probe (module doc)."""

    auroc: float
    auroc_ci: tuple[float, float]
    tpr_at_1pct_fpr: float
    n_pos: int
    n_neg: int
    folds: int
    label: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["auroc_ci"] = list(self.auroc_ci)
        return d


def cross_validate(x: np.ndarray, y: np.ndarray, *, groups: Sequence[Any] | None = None,
                   folds: int = 5, c: float = 0.05, seed: int = 0,
                   label: str = "") -> ProbeResult:
    """Out-of-fold probe quality; folds by ``groups`` when given (no group in two folds).

    Example::

        cross_validate(X, y, groups=[p.meta["phrasing"] for p in prompts]).auroc
    """
    from sklearn.model_selection import GroupKFold, StratifiedKFold

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y).astype(int)
    if groups is not None:
        g = np.asarray([str(v) for v in groups])
        k = min(folds, len(set(g.tolist())))
        splits = list(GroupKFold(n_splits=k).split(x, y, g))
    else:
        k = folds
        splits = list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(x, y))
    scores = np.full(len(y), np.nan)
    for train, test in splits:
        if len(set(y[train].tolist())) < 2:
            continue
        scores[test] = LinearProbe.fit(x[train], y[train], c=c).logit(x[test])
    ok = ~np.isnan(scores)
    yy, ss = y[ok].astype(bool), scores[ok]
    auc, ci = auroc_ci(yy, ss, seed=seed)
    return ProbeResult(auroc=auc, auroc_ci=ci, tpr_at_1pct_fpr=tpr_at_fpr(yy, ss),
                       n_pos=int(yy.sum()), n_neg=int((~yy).sum()), folds=k, label=label)
