"""How much of a planted fault each detector's unit statistic can see, in its own site.

Why does Compression Forensics rank the planted site low while Mahalanobis ranks it high
(``benchmarks/RESULTS_cf.md``)? This measures it directly. For every planted model and every
failing incident, take the unit (token position) of the planted site where the fault's own
coordinates (the planted neuron, or the planted head's slice of ``attn.z``) deviate most from
their benign median, and score it twice with each detector: as recorded, and with ONLY the
fault's coordinates reset to their benign median (the counterfactual unit; all other features
unchanged). Reported per detector, median over incidents:

* ``fault z`` — the unit's robust z as recorded (what the site score is built from);
* ``z from fault coords`` — recorded minus counterfactual z: how much of it the fault explains;
* for CF, ``Δ frame bits`` (the zstd frame's size change caused by the fault's coordinates) and
  ``benign σ bits`` (the cell's upper robust scale of frame size, in bits per frame);
* ``downstream z`` — the same position's unit z at the component's output (``blocks.L.mlp`` /
  ``blocks.L.attn``), where the fault's write is spread over every feature.

Run (~2 min on 2 CPU cores)::

    python benchmarks/cf_snr.py [--models 12] [--out benchmarks/cf_snr.json]
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cf_eval  # a sibling script (benchmarks/ is not a package)

log = logging.getLogger("cf_snr")

DETECTORS = ("cf_raw", "cf_std", "mahalanobis")
_FAULT = re.compile(r"^(?P<site>[\w.]+)\[(?P<what>neuron|head)=(?P<i>\d+)\]$")


def fault_columns(fault: str, width: int, n_head: int) -> tuple[str, np.ndarray]:
    """(recorded site, feature columns) of a planted fault string such as
    ``blocks.2.mlp.post[neuron=17]`` or ``blocks.1.attn.z[head=3]``."""
    m = _FAULT.match(fault)
    if m is None:
        raise ValueError(f"unrecognised fault site {fault!r}")
    i = int(m["i"])
    if m["what"] == "neuron":
        return m["site"], np.array([i])
    d_head = width // n_head
    return m["site"], np.arange(i * d_head, (i + 1) * d_head)


def _unit(u: Any, rows: np.ndarray, j: int) -> Any:
    from analysis.cf._units import SiteUnits

    return SiteUnits(site=u.site, vectors=rows.astype(np.float32), kind=u.kind[[j, j]],
                     bucket=u.bucket[[j, j]], step=u.step[[j, j]],
                     position=u.position[[j, j]])


def unit_z_pair(cls: Any, base: Any, inc: Any, site: str, cols: np.ndarray,
                median: np.ndarray) -> dict[str, float] | None:
    """Recorded vs counterfactual z (and statistic) of the unit where ``cols`` deviate most."""
    from analysis.cf._cells import min_cell_units, unit_z
    from analysis.cf._units import site_units

    u = cls._scoring_units(site_units(inc, site, buckets=base.position_buckets), base.options)
    if len(u) == 0 or u.offsets is not None:
        return None
    dev = np.abs(u.vectors[:, cols] - median).max(axis=1)  # [n_units]
    j = int(np.argmax(dev))
    row = u.vectors[j]
    cf = row.copy()
    cf[cols] = median
    pair = _unit(u, np.stack([row, cf]), j)
    stats, _ = cls._unit_stats(pair, base.params.get(site, {}), base.options, {})
    z, _, _ = unit_z(base.refs, base.site_index(site), pair, stats, min_cell_units(base.options))
    return {"z": float(z[0]), "z_cf": float(z[1]), "stat": float(stats[0]),
            "stat_cf": float(stats[1]), "position": int(u.position[j]),
            "width": int(u.vectors.shape[1]), "kind": int(u.kind[j]), "bucket": int(u.bucket[j])}


def downstream_z(cls: Any, base: Any, inc: Any, site: str, position: int) -> float:
    """Unit z at ``site`` for the unit at ``position`` (NaN if absent)."""
    from analysis.cf._cells import min_cell_units, unit_z
    from analysis.cf._units import site_units

    u = cls._scoring_units(site_units(inc, site, buckets=base.position_buckets), base.options)
    m = np.flatnonzero(u.position == position)
    if m.size == 0 or u.offsets is not None:
        return float("nan")
    stats, _ = cls._unit_stats(u, base.params.get(site, {}), base.options, {})
    z, _, _ = unit_z(base.refs, base.site_index(site), u, stats, min_cell_units(base.options))
    return float(z[m[0]])


def measure_model(spec: dict[str, Any], n_base: int, n_fail: int,
                  detectors: Sequence[str]) -> dict[str, Any]:
    from analysis.cf._units import site_units

    pm, base_incs, _, fail_incs = cf_eval.planted_recordings(spec, n_base, 0, n_fail)
    n_head = int(getattr(pm.model.config, "n_head", 0) or pm.model.config.num_attention_heads)
    out: dict[str, Any] = {"seed": spec["seed"], "kind": cf_eval.planted_kind(pm),
                           "fault_sites": pm.fault_sites, "detectors": {}}
    for name in detectors:
        cls, opts = cf_eval.make(name)
        base = cls.build_baseline(base_incs, **opts)
        rows = []
        for fault in pm.fault_sites:
            width = site_units(base_incs[0], fault.split("[")[0],
                               buckets=base.position_buckets).vectors.shape[1]
            site, cols = fault_columns(fault, width, n_head)
            ref = np.concatenate([site_units(i, site, buckets=base.position_buckets).vectors
                                  for i in base_incs])  # [benign units, width]
            median = np.median(ref[:, cols], axis=0).astype(np.float32)
            down = site.rsplit(".", 1)[0]  # blocks.L.mlp | blocks.L.attn
            for inc in fail_incs:
                r = unit_z_pair(cls, base, inc, site, cols, median)
                if r is None:
                    continue
                ref_cell = base.refs.get((base.site_index(site), r["kind"], r["bucket"]))
                r["hi"] = float(ref_cell.hi) if ref_cell is not None else float("nan")
                r["downstream_z"] = downstream_z(cls, base, inc, down, r["position"])
                r["fault"] = fault
                rows.append(r)
        out["detectors"][name] = rows
    return out


def summarise(models: list[dict[str, Any]]) -> str:
    lines = ["| detector | fault-unit z | z from fault coords | downstream z (same position) "
             "| Δ frame bits | benign σ bits/frame |", "|---|---|---|---|---|---|"]
    for name in models[0]["detectors"]:
        rows = [r for m in models for r in m["detectors"][name]]
        if not rows:
            continue
        z = np.median([r["z"] for r in rows])
        dz = np.median([r["z"] - r["z_cf"] for r in rows])
        dn = np.nanmedian([r["downstream_z"] for r in rows])
        if name.startswith("cf"):
            bits = np.median([(r["stat"] - r["stat_cf"]) * r["width"] for r in rows])
            sig = np.median([r["hi"] * r["width"] for r in rows])
            extra = f"{bits:.1f} | {sig:.1f} |"
        else:
            extra = "– | – |"
        lines.append(f"| {name} | {z:.1f} | {dz:.1f} | {dn:.1f} | {extra}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=int, default=12)
    ap.add_argument("--base", type=int, default=50, help="benign baseline incidents per model")
    ap.add_argument("--fail", type=int, default=20, help="failing incidents per model")
    ap.add_argument("--detectors", default=",".join(DETECTORS))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from analysis.scenarios.planted import planted_suite

    t0 = time.perf_counter()
    models = [measure_model(spec, args.base, args.fail, args.detectors.split(","))
              for spec in planted_suite(args.models)]
    return cf_eval.finish(summarise(models),
                          f"{len(models)} planted models, {time.perf_counter() - t0:.0f} s",
                          args.out, models)


if __name__ == "__main__":
    raise SystemExit(main())
