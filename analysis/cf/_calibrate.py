"""Levels 2 and 3 of the detector framework: site statistics → calibrated scores, p, q.

A site's statistic (max |unit z|, level 1 in :mod:`analysis.cf._detector`) is scored against
the same statistic of the baseline's benign incidents (cross-fitted, :mod:`._crossfit`): a
robust z with a tail-calibrated upper scale (:func:`~._score.tail_ref`), an empirical p-value and
Benjamini–Hochberg q across the incident's sites. The incident's score is the same robust z of
its max site score against the max leave-one-out site score of every baseline incident over
the same sites, its upper scale set so that z = 2 is at least a 90 % upper confidence bound of
those maxima's 97.7th percentile (:data:`INCIDENT_CONFIDENCE`): the benign flag rate at the
default threshold stays near or below nominal even for a small baseline.

Example::

    cal = Calibrator()
    sites, inc_ref, inc_values = cal.site_scores(base, rows, notes, threshold=3.0, fdr=0.05)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from integrations.errors import AnalysisError

from ._baseline import CFBaseline
from ._report import SiteScore, WorstUnit
from ._score import RobustRef, benjamini_hochberg, empirical_p, loo_tail_z, robust_z, tail_ref

__all__ = ["INCIDENT_CONFIDENCE", "Calibrator", "SiteRow"]

#: Scale floors (robust-z units) of the site- and incident-level references.
_SITE_FLOOR = 0.5
_INCIDENT_FLOOR = 0.5
#: The incident reference puts z = 2 at a 90 % upper confidence bound of the baseline's 97.7th
#: percentile (:func:`~._score.tail_ref`): the largest baseline incident below ~100 incidents.
#: The benign flag rate per planted model it gives is measured in benchmarks/RESULTS_rca.md.
INCIDENT_CONFIDENCE = 0.9


class SiteRow(NamedTuple):
    """One scored site of an incident, before calibration against the baseline."""

    site: str
    column: int     # the site's column in the baseline's site_stats
    stat: float     # max |unit z|
    n_units: int
    worst: WorstUnit
    clipped: int


class Calibrator:
    """The site and incident references of a baseline for a set of scored sites, cached for
    the last (baseline, sites) pair (consecutive incidents usually score the same sites)."""

    def __init__(self) -> None:
        self._cache: dict[Any, tuple[list[RobustRef], RobustRef, np.ndarray]] = {}

    def references(self, base: CFBaseline, cols: tuple[int, ...]
                   ) -> tuple[list[RobustRef], RobustRef, np.ndarray]:
        """Site references (tail-calibrated, from the cross-fitted baseline site statistics),
        the incident reference and its values: the max over ``cols`` of each baseline
        incident's leave-one-out site scores."""
        key = (id(base), cols)
        if key not in self._cache:
            site_refs = [tail_ref(base.site_stats[:, c], floor=_SITE_FLOOR) for c in cols]
            loo = np.column_stack([loo_tail_z(base.site_stats[:, c], floor=_SITE_FLOOR)
                                   for c in cols])  # [n_inc, n_scored]
            with np.errstate(invalid="ignore"):
                base_max = np.max(np.where(np.isfinite(loo), loo, -np.inf), axis=1)
            finite = base_max[np.isfinite(base_max)]
            if finite.size == 0:
                raise AnalysisError("the baseline has no usable site statistics for these sites;"
                                    " rebuild it from more benign incidents")
            self._cache.clear()
            self._cache[key] = (site_refs, tail_ref(finite, floor=_INCIDENT_FLOOR,
                                                    confidence=INCIDENT_CONFIDENCE), finite)
        return self._cache[key]

    def site_scores(self, base: CFBaseline, rows: list[SiteRow], notes: list[str], *,
                    threshold: float, fdr: float
                    ) -> tuple[dict[str, SiteScore], RobustRef, np.ndarray]:
        """Each site's score, p and BH q against the baseline incidents (flagged at
        ``threshold``, significant at ``fdr``); also the incident reference and its values."""
        n_ref = int(base.site_stats.shape[0])
        if len(rows) > fdr * (n_ref + 1):  # BH: smallest q is len(rows) / (n_ref + 1)
            notes.append(
                f"no site can be significant: with {n_ref} baseline incidents the smallest "
                f"empirical p is 1/{n_ref + 1}, and Benjamini-Hochberg over {len(rows)} sites "
                f"needs p <= {fdr / len(rows):.2g}; build the baseline from at least "
                f"{int(np.ceil(len(rows) / fdr))} benign incidents (scores and flags at "
                "the threshold are unaffected)")
        site_refs, inc_ref, inc_ref_values = self.references(base, tuple(r.column for r in rows))
        scores = np.array([float(robust_z(np.array([r.stat]), ref)[0])
                           for r, ref in zip(rows, site_refs)])
        pvals = np.array([empirical_p(r.stat, base.site_stats[:, r.column]) for r in rows])
        qvals = benjamini_hochberg(pvals)
        sites = {r.site: SiteScore(site=r.site, score=float(sc), stat=r.stat, p=float(p),
                                   q=float(q), flagged=bool(sc >= threshold),
                                   significant=bool(q <= fdr), n_units=r.n_units,
                                   worst=r.worst, clipped=r.clipped)
                 for r, sc, p, q in zip(rows, scores, pvals, qvals)}
        return sites, inc_ref, inc_ref_values
