"""Detector baselines: per-model-fingerprint reference distributions, saved without pickle.

A :class:`CFBaseline` holds everything a detector learned from benign incidents: the model
fingerprint it is valid for, the sites and position buckets, per-site parameters (CF's fixed
quantisation scales; Mahalanobis means/variances), the per-cell reference distributions of the
unit statistic (cell = site × step kind × position bucket; bucket -1 = pooled over buckets) and
the per-incident site statistics used to calibrate site and incident scores.

On disk: one ``.npz`` (numpy arrays only, read with ``allow_pickle=False``) whose ``meta`` entry
is UTF-8 JSON (format version, detector, fingerprint, sites, buckets, options, created_at, ...).
:func:`benign_sample` is what a baseline is learned from: benign incidents of one model.

(Not to be confused with :class:`analysis.interventions.DonorBaseline`, the per-site means and
pools that ``mean``/``resample`` interventions take their values from.)

Example::

    base = CompressionForensics.build_baseline(benign_incidents)
    base.save("baselines/smollm2.cf.npz")
    base = CFBaseline.load("baselines/smollm2.cf.npz")
    base.model_fingerprint, base.sample_count
"""

from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from integrations.errors import AnalysisError, FingerprintMismatchError
from integrations.incident import Incident

from ._score import RobustRef
from ._units import as_incident, fingerprint_of

__all__ = ["BASELINE_FORMAT_VERSION", "CFBaseline", "benign_sample"]

BASELINE_FORMAT_VERSION = 1
_ARRAYS = ("cells", "cell_ref", "cell_values", "cell_offsets", "site_stats")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(eq=False)
class CFBaseline:
    """Reference distributions of one detector for one model (see module doc).

    ``cells``: ``[n_cells, 3]`` int64 (site index, kind index, bucket index or -1 for pooled);
    ``cell_ref``: ``[n_cells, 3]`` (median, lower scale, upper scale) of the unit statistic;
    ``cell_values``/``cell_offsets``: the reference values of cell i are
    ``cell_values[cell_offsets[i]:cell_offsets[i+1]]``; ``site_stats``: ``[n_incidents, n_sites]``
    site statistic of each baseline incident (NaN where it lacked the site); ``params``:
    ``{site: {name: array}}``.
    """

    detector: str
    model_fingerprint: str | None
    sites: list[str]
    position_buckets: tuple[int, ...]
    cells: np.ndarray
    cell_ref: np.ndarray
    cell_values: np.ndarray
    cell_offsets: np.ndarray
    site_stats: np.ndarray
    params: dict[str, dict[str, np.ndarray]]
    incident_ids: list[str]
    options: dict[str, Any] = field(default_factory=dict)
    model_name: str | None = None
    created_at: str = field(default_factory=_now)
    format_version: int = BASELINE_FORMAT_VERSION

    def __post_init__(self) -> None:
        self._check()
        self._refs = {
            (int(s), int(k), int(b)): RobustRef(median=float(r[0]), lo=float(r[1]),
                                                hi=float(r[2]), n=int(o1 - o0))
            for (s, k, b), r, o0, o1 in zip(self.cells, self.cell_ref, self.cell_offsets[:-1],
                                            self.cell_offsets[1:])
        }
        self._site_index = {s: i for i, s in enumerate(self.sites)}

    # ----------------------------------------------------------------- queries
    @property
    def sample_count(self) -> int:
        """Number of benign incidents the baseline was built from."""
        return len(self.incident_ids)

    def site_index(self, site: str) -> int | None:
        """Column of ``site`` in :attr:`site_stats` (None if not in the baseline)."""
        return self._site_index.get(site)

    @property
    def refs(self) -> dict[tuple[int, int, int], RobustRef]:
        """Unit-statistic references by cell ``(site index, kind index, bucket or -1)``."""
        return self._refs

    def cell_reference_values(self, site: str, kind: int, bucket: int) -> np.ndarray:
        """The raw reference values of one cell (empty if absent)."""
        i = self._site_index.get(site)
        for j, (s, k, b) in enumerate(self.cells):
            if (int(s), int(k), int(b)) == (i, kind, bucket):
                return self.cell_values[self.cell_offsets[j]:self.cell_offsets[j + 1]]
        return np.empty(0, dtype=np.float32)

    def __repr__(self) -> str:
        return (f"CFBaseline(detector={self.detector!r}, fingerprint={self.model_fingerprint!r}, "
                f"sites={len(self.sites)}, samples={self.sample_count}, "
                f"created_at={self.created_at!r})")

    # ----------------------------------------------------------------- persistence
    def _meta(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version, "detector": self.detector,
            "model_fingerprint": self.model_fingerprint, "model_name": self.model_name,
            "sites": self.sites, "position_buckets": list(self.position_buckets),
            "incident_ids": self.incident_ids, "sample_count": self.sample_count,
            "options": self.options, "created_at": self.created_at,
            "params": [[site, name] for site, d in self.params.items() for name in sorted(d)],
        }

    def to_bytes(self) -> bytes:
        """The ``.npz`` bytes (see module doc)."""
        arrays: dict[str, np.ndarray] = {name: getattr(self, name) for name in _ARRAYS}
        for i, (site, name) in enumerate(self._meta()["params"]):
            arrays[f"param_{i}"] = np.asarray(self.params[site][name])
        meta = json.dumps(self._meta(), sort_keys=True).encode()
        arrays["meta"] = np.frombuffer(meta, dtype=np.uint8)
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
        return buf.getvalue()

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the baseline to ``path`` atomically (an ``.npz`` file; no pickle)."""
        from integrations.incident import atomic_write

        atomic_write(path, self.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes) -> CFBaseline:
        """Parse and validate baseline bytes written by :meth:`to_bytes` (never unpickles)."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            meta = json.loads(bytes(arrays.pop("meta")).decode())
        except (OSError, ValueError, KeyError, UnicodeDecodeError) as e:
            raise AnalysisError(f"not a readable detector baseline ({e}); rebuild it with "
                                "build_baseline(benign_incidents)") from e
        if not isinstance(meta, dict) or meta.get("format_version") != BASELINE_FORMAT_VERSION:
            got = meta.get("format_version") if isinstance(meta, dict) else None
            raise AnalysisError(f"baseline format version {got!r} is not supported (this code "
                                f"reads {BASELINE_FORMAT_VERSION}); rebuild the baseline")
        missing = [k for k in _ARRAYS if k not in arrays]
        if missing:
            raise AnalysisError(f"baseline is missing arrays {missing}; rebuild it")
        params: dict[str, dict[str, np.ndarray]] = {}
        try:
            for i, (site, name) in enumerate(meta["params"]):
                params.setdefault(str(site), {})[str(name)] = arrays[f"param_{i}"]
            return cls(detector=str(meta["detector"]),
                       model_fingerprint=meta["model_fingerprint"], sites=list(meta["sites"]),
                       position_buckets=tuple(int(b) for b in meta["position_buckets"]),
                       params=params, incident_ids=list(meta["incident_ids"]),
                       options=dict(meta["options"]), model_name=meta.get("model_name"),
                       created_at=str(meta["created_at"]),
                       **{k: arrays[k] for k in _ARRAYS})
        except (KeyError, TypeError, ValueError) as e:
            raise AnalysisError(f"baseline metadata is malformed ({e!r}); rebuild it") from e

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CFBaseline:
        """Read a baseline written by :meth:`save`."""
        with open(path, "rb") as f:
            return cls.from_bytes(f.read())

    # ----------------------------------------------------------------- validation
    def _check(self) -> None:
        n_cells = self.cells.shape[0] if self.cells.ndim == 2 else -1
        problems = []
        if self.cells.ndim != 2 or self.cells.shape[1] != 3:
            problems.append(f"cells shape {self.cells.shape} (want [n, 3])")
        if self.cell_ref.shape != (n_cells, 3):
            problems.append(f"cell_ref shape {self.cell_ref.shape} (want [{n_cells}, 3])")
        offs = self.cell_offsets
        if (offs.shape != (n_cells + 1,) or (offs.size and (offs[0] != 0
                                                          or offs[-1] != self.cell_values.size
                                                          or np.any(np.diff(offs) < 0)))):
            problems.append("cell_offsets inconsistent with cell_values")
        if self.site_stats.shape != (len(self.incident_ids), len(self.sites)):
            problems.append(f"site_stats shape {self.site_stats.shape} (want "
                            f"[{len(self.incident_ids)}, {len(self.sites)}])")
        if n_cells > 0 and (self.cells[:, 0].min() < 0 or self.cells[:, 0].max() >= len(self.sites)):
            problems.append("cell site index out of range")
        if problems:
            raise AnalysisError("baseline is inconsistent: " + "; ".join(problems)
                                + "; rebuild it with build_baseline(benign_incidents)")


def benign_sample(items: Iterable[Any], *, max_samples: int, seed: int
                  ) -> tuple[list[Any], str | None, list[str]]:
    """The benign incidents a baseline is learned from: ``items`` (incidents, replay sessions
    or paths), at most ``max_samples`` of them (a deterministic sample, ``seed``), all of one
    model. Returns (incidents, their model fingerprint, the activation sites all of them
    recorded, sorted)."""
    if max_samples < 2:
        raise AnalysisError(f"max_samples={max_samples}: a baseline needs at least 2")
    incs = [Incident.open(x) if isinstance(x, (str, os.PathLike)) else as_incident(x)
            for x in items]
    if len(incs) < 2:
        raise AnalysisError(f"build_baseline got {len(incs)} benign incident(s); give at "
                            "least 2 (hundreds for calibrated p-values)")
    if len(incs) > max_samples:
        keep = sorted(random.Random(seed).sample(range(len(incs)), max_samples))
        incs = [incs[i] for i in keep]
    fps = {fingerprint_of(i) for i in incs}
    if len(fps) != 1:
        raise FingerprintMismatchError(
            f"benign incidents come from {len(fps)} different models (fingerprints "
            f"{sorted(str(f) for f in fps)}); build one baseline per model")
    common = set(incs[0].sites("activation"))
    for inc in incs[1:]:
        common &= set(inc.sites("activation"))
    if not common:
        raise AnalysisError("the benign incidents share no activation site; record the "
                            "same sites for every request (Recorder(sites=...))")
    return incs, next(iter(fps)), sorted(common)
