"""Where in a site the detector saw the anomaly: the robust z of every scored unit (one token
position of one forward step), for the report's site × step and layer × position heatmaps.

A CF report keeps one number per site (and its worst unit); the heatmaps need every unit. The
unit z is computed exactly as the detector scores (its own units, unit statistics and reference
cells, against the same baseline), through the detector framework's building blocks in
:mod:`analysis.cf`. Should those change shape, the map is left out with a note — the score, the
flag and the ranking never depend on it.

Example::

    det = MahalanobisDetector(baseline=base)
    report = det.analyze(inc)
    unit_z_map(det, inc)["sites"]["blocks.3.resid_post"]   # [[step, position, z], ...]
"""

from __future__ import annotations

import logging
import math
from typing import Any

__all__ = ["unit_z_map"]

_log = logging.getLogger(__name__)


def _site_units(det: Any, inc: Any, site: str, state: dict[str, Any]) -> list[list[float]]:
    import numpy as np

    from analysis.cf._cells import min_cell_units, unit_z
    from analysis.cf._units import site_units

    base = det.baseline
    si = base.site_index(site)
    if si is None:
        return []
    opts = base.options
    u = det._scoring_units(site_units(inc, site, buckets=base.position_buckets), opts)
    stats, _ = det._unit_stats(u, base.params.get(site, {}), opts, state)
    z, _, _ = unit_z(base.refs, si, u, stats, min_cell_units(opts))
    return [[int(s), int(p), round(float(v), 3)]
            for s, p, v in zip(u.step, u.position, np.asarray(z)) if math.isfinite(float(v))]


def unit_z_map(det: Any, incident: Any, *, sites: list[str] | None = None) -> dict[str, Any]:
    """``{"sites": {site: [[step, position, z], ...]}}`` for the scored sites of ``incident``
    (``sites``: default every baseline site the incident has), or ``{"note": why}``."""
    todo = sites if sites is not None else [
        s for s in det.baseline.sites if s in set(incident.sites("activation"))]
    out: dict[str, list[list[float]]] = {}
    state: dict[str, Any] = {}
    try:
        for site in todo:
            out[site] = _site_units(det, incident, site, state)
    except Exception as e:   # never fail a CF job over its picture
        _log.warning("unit z map left out: %s: %s", type(e).__name__, e)
        return {"note": f"unit map not available ({type(e).__name__}: {e})"}
    return {"sites": out}
