"""The Mahalanobis detector (diagonal, shrunk covariance): the Gaussian code length, and the
measured default (DESIGN §7, ``benchmarks/RESULTS_cf.md``).

Example::

    rep = MahalanobisDetector(baseline=MahalanobisDetector.build_baseline(benign)).analyze(inc)
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ._detector import Detector, pop_int_option
from ._units import SiteUnits

__all__ = ["MahalanobisDetector"]


class MahalanobisDetector(Detector):
    """Mahalanobis baseline detector with diagonal, shrunk covariance per cell.

    Per (site, step kind, position bucket) the benign mean and per-feature variance are
    estimated; each cell's variances are shrunk toward its site's pooled step-kind variances
    with ``shrinkage_units`` (default 50) pseudo-observations (the pooled ones toward their
    median), so thin cells stay stable. Unit statistic: mean over features of ``(x - mean)² / var``.

    Example::

        rep = MahalanobisDetector(baseline=MahalanobisDetector.build_baseline(benign)).analyze(inc)
    """

    name: ClassVar[str] = "mahalanobis"
    needs_fit: ClassVar[bool] = True

    @classmethod
    def _options(cls, **options: Any) -> dict[str, Any]:
        shrink = pop_int_option(options, "shrinkage_units", 50, 0, 10**9)
        return {**super()._options(**options), "shrinkage_units": shrink}

    @classmethod
    def _fit_start(cls, site: str, options: dict[str, Any]) -> Any:
        return {}

    @classmethod
    def _fit_add(cls, acc: Any, units: SiteUnits, options: dict[str, Any]) -> None:
        x = units.vectors.astype(np.float64)
        for k in np.unique(units.kind):
            mk = units.kind == k
            keys = [(int(k), -1)] + [(int(k), int(b)) for b in np.unique(units.bucket[mk])]
            for key in keys:
                m = mk if key[1] == -1 else mk & (units.bucket == key[1])
                xs = x[m]
                s = acc.setdefault(key, [0, np.zeros(x.shape[1]), np.zeros(x.shape[1])])
                s[0] += xs.shape[0]
                s[1] += xs.sum(axis=0)
                s[2] += (xs * xs).sum(axis=0)

    @classmethod
    def _fit_end(cls, acc: Any, options: dict[str, Any]) -> dict[str, np.ndarray]:
        n0 = float(options["shrinkage_units"])
        keys = sorted(acc)
        means, vars_, counts = [], [], []
        pooled: dict[int, np.ndarray] = {}
        for key in keys:  # pooled cells (bucket -1) sort first within a kind
            n, s1, s2 = acc[key]
            mu = s1 / n
            var = np.maximum(s2 / n - mu * mu, 0.0)
            target = pooled.get(key[0])
            if target is None:  # pooled cell: shrink toward its median variance
                target = np.full_like(var, float(np.median(var)))
            lam = n0 / (n + n0) if n + n0 > 0 else 1.0
            var = (1 - lam) * var + lam * target
            var = np.maximum(var, 1e-6 * float(np.mean(var)) + 1e-12)
            if key[1] == -1:
                pooled[key[0]] = var
            means.append(mu)
            vars_.append(var)
            counts.append(n)
        return {"cells": np.asarray(keys, dtype=np.int64).reshape(-1, 2),
                "mean": np.asarray(means, dtype=np.float32),
                "var": np.asarray(vars_, dtype=np.float32),
                "count": np.asarray(counts, dtype=np.int64)}

    @classmethod
    def _unit_stats(cls, units: SiteUnits, params: dict[str, np.ndarray],
                    options: dict[str, Any], state: dict[str, Any]) -> tuple[np.ndarray, int]:
        index = {(int(k), int(b)): i for i, (k, b) in enumerate(params["cells"])}
        min_n = int(options["min_cell_units"])
        out = np.full(len(units), np.nan)
        for j, (k, b) in enumerate(zip(units.kind, units.bucket)):
            i = index.get((int(k), int(b)))
            if i is None or params["count"][i] < min_n:
                i = index.get((int(k), -1))
            if i is None:
                continue
            d = units.vectors[j].astype(np.float64) - params["mean"][i]
            out[j] = float(np.mean(d * d / params["var"][i]))
        return out, 0

    @classmethod
    def _unit_floor(cls, n_features: int, options: dict[str, Any]) -> float:
        return 1e-3
