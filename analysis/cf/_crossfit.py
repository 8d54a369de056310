"""Cross-fitting: the baseline incidents' site statistics, scored as if they were new incidents.

A baseline's site and incident scores are calibrated on the site statistics of its own benign
incidents. Scored against references (and, for detectors that fit parameters, parameters) that
include them, they would look tamer than new benign incidents do (measured: 15–50 % false
positives with in-sample references, see :mod:`analysis.cf._detector`). So incident ``i`` is in
fold ``i % k``, and is scored against references built without its fold (:class:`Folds`,
:func:`cross_fitted_site_stats`); the references kept in the baseline are built from every
incident (:func:`reference_cells`).

Example::

    folds = Folds(n=len(incidents), k=5, refit=True)
    cells, refs, values = reference_cells(sites, meta, stats[folds.full], floors)
    site_stats = cross_fitted_site_stats(sites, meta, stats, folds, floors, min_n=8)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ._cells import cell_values, unit_z
from ._score import RobustRef
from ._units import SiteUnits

__all__ = ["Folds", "UnitStats", "cross_fitted_site_stats", "reference_cells"]

#: Unit statistics per parameter set (a fold key): for each incident, ``{site: [n_units]}``.
UnitStats = dict[int, list[dict[str, np.ndarray]]]


@dataclass(frozen=True)
class Folds:
    """``n`` incidents in ``min(k, n)`` folds (incident ``i`` in fold ``i % k``).

    Parameter sets are keyed by the fold they were fitted without, and :attr:`full` (fitted on
    every incident); ``refit=False`` (a robust fit) uses the full set for every fold.
    """

    n: int
    k: int
    refit: bool

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", min(int(self.k), self.n))

    @property
    def fold(self) -> np.ndarray:
        """The fold of each incident, ``[n]``."""
        return np.arange(self.n) % self.k

    @property
    def full(self) -> int:
        """The key of the parameters fitted on every incident."""
        return self.k

    @property
    def keys(self) -> list[int]:
        """Every parameter set to fit: the full one first, then one per fold when refitting."""
        return [self.full, *range(self.k)] if self.refit else [self.full]

    def key(self, f: int) -> int:
        """The parameter set incidents of fold ``f`` are scored with."""
        return f if self.refit else self.full


def reference_cells(sites: Sequence[str], meta: list[dict[str, SiteUnits]],
                    stats: list[dict[str, np.ndarray]], floors: dict[int, float]
                    ) -> tuple[list[tuple[int, int, int]], list[RobustRef], list[np.ndarray]]:
    """Every cell's reference from every incident: (cells, robust references, values)."""
    cells, values = cell_values(sites, meta, stats, range(len(meta)))
    refs = [RobustRef.fit(v, floor=floors[c[0]]) for c, v in zip(cells, values)]
    return cells, refs, values


def cross_fitted_site_stats(sites: Sequence[str], meta: list[dict[str, SiteUnits]],
                            stats: UnitStats, folds: Folds, floors: dict[int, float],
                            min_n: int) -> np.ndarray:
    """``[n_incidents, n_sites]``: each incident's site statistic (max |unit z|) against the
    references of the other folds (NaN where no unit could be scored)."""
    site_stats = np.full((folds.n, len(sites)), np.nan)
    fold = folds.fold
    for f in range(folds.k):
        k = folds.key(f)
        others = [j for j in range(folds.n) if fold[j] != f]
        fc, fv = cell_values(sites, meta, stats[k], others)
        fold_refs = {c: RobustRef.fit(v, floor=floors[c[0]]) for c, v in zip(fc, fv)}
        for i in map(int, np.flatnonzero(fold == f)):
            for si, site in enumerate(sites):
                z, _, _ = unit_z(fold_refs, si, meta[i][site], stats[k][i][site], min_n)
                if np.isfinite(z).any():
                    site_stats[i, si] = float(np.nanmax(np.abs(z)))
    return site_stats
