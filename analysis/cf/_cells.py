"""Reference cells of the detector framework: (site, step kind, position bucket) -> benign values.

A unit (one position, or a position group) is z-scored against the robust reference of its
cell; a cell with fewer than ``min_cell_units`` reference values falls back to its site's
pooled step-kind cell (bucket ``-1``). Used by :mod:`analysis.cf._detector`.

Example::

    cells, values = cell_values(sites, meta, stats, range(n))
    z, used_bucket, unscored = unit_z(refs, site_index, units, unit_stats, min_n=8)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ._score import RobustRef, robust_z
from ._units import SiteUnits

__all__ = ["cell_values", "min_cell_units", "n_features", "strip", "unit_z"]


def min_cell_units(opts: dict[str, Any]) -> int:
    return int(opts.get("min_cell_units", 8))


def n_features(u: SiteUnits) -> int:
    return int(u.vectors.shape[1])


def strip(u: SiteUnits) -> SiteUnits:
    """Drop the vectors (keep the width) once statistics are computed, to bound memory."""
    return SiteUnits(site=u.site, vectors=np.empty((0, u.vectors.shape[1]), np.float32),
                     kind=u.kind, bucket=u.bucket, step=u.step, position=u.position)


def cell_values(sites: Sequence[str], meta: list[dict[str, SiteUnits]],
                 stats: list[dict[str, np.ndarray]], which: Iterable[int],
                 ) -> tuple[list[tuple[int, int, int]], list[np.ndarray]]:
    """Reference values per cell (site index, kind, bucket; bucket -1 = pooled over buckets)
    from the unit statistics of the incidents ``which``."""
    which = list(which)
    cells: list[tuple[int, int, int]] = []
    values: list[np.ndarray] = []
    for si, site in enumerate(sites):
        by_cell: dict[tuple[int, int], list[np.ndarray]] = {}
        for i in which:
            u, st = meta[i][site], stats[i][site]
            for k in np.unique(u.kind):
                mk = u.kind == k
                by_cell.setdefault((int(k), -1), []).append(st[mk])
                for b in np.unique(u.bucket[mk]):
                    by_cell.setdefault((int(k), int(b)), []).append(st[mk & (u.bucket == b)])
        for (k, b), vs in sorted(by_cell.items()):
            cells.append((si, k, b))
            values.append(np.concatenate(vs).astype(np.float32))
    return cells, values


def _lookup(refs: dict[tuple[int, int, int], RobustRef], si: int, kind: int, bucket: int,
            min_n: int) -> tuple[RobustRef | None, int]:
    r = refs.get((si, kind, bucket))
    if r is not None and r.n >= min_n:
        return r, bucket
    return refs.get((si, kind, -1)), -1


def unit_z(refs: dict[tuple[int, int, int], RobustRef], si: int, u: SiteUnits,
            stats: np.ndarray, min_n: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Unit robust z against the cell references (NaN where the step kind has no reference),
    the bucket actually used per unit (-1 = pooled) and the count of unscored units."""
    z = np.full(stats.shape, np.nan)
    used = np.full(stats.shape, -1, dtype=np.int64)
    for k in np.unique(u.kind):
        for b in np.unique(u.bucket[u.kind == k]):
            m = (u.kind == k) & (u.bucket == b)
            ref, b_used = _lookup(refs, si, int(k), int(b), min_n)
            if ref is None:
                continue
            z[m] = robust_z(stats[m], ref)
            used[m] = b_used
    return z, used, int(np.count_nonzero(~np.isfinite(z)))
