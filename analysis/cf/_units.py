"""Turn an incident's activations into scoring *units*: one feature vector per token position.

A unit is one position of one forward step of one site, with its cell key (step kind, position
bucket). Step kinds: ``prefill`` (every prompt position but the last), ``last`` (the last prompt
position, where a causal LM computes its next-token decision) and ``decode`` (the single new
position of each KV-cached decode step). Positions are absolute: decode step ``s`` sits at
``sum(positions of steps < s)``, so a decode token is compared with baseline tokens at the same
depth into the sequence. Position buckets (boundaries, default powers of two) control for the
strong position dependence of activations (position 0 is an attention sink in most models; the
seed ranked a position table as its top "anomaly" because nothing controlled for this).

Example::

    units = site_units(inc, "blocks.0.resid_post", buckets=DEFAULT_POSITION_BUCKETS)
    units.vectors.shape     # [n_units, d_model]
"""

from __future__ import annotations

import bisect
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from integrations.errors import AnalysisError

__all__ = [
    "DEFAULT_POSITION_BUCKETS",
    "STEP_KINDS",
    "SiteUnits",
    "as_incident",
    "bucket_of",
    "check_buckets",
    "fingerprint_of",
    "group_units",
    "select_sites",
    "site_units",
]

#: Lower boundaries of the position buckets: [0], [1], [2,4), [4,8), ... [8192, inf).
DEFAULT_POSITION_BUCKETS: tuple[int, ...] = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024,
                                             2048, 4096, 8192)
#: Step kinds, in the order their integer codes use.
STEP_KINDS: tuple[str, ...] = ("prefill", "last", "decode")


@dataclass(frozen=True)
class SiteUnits:
    """The units of one site of one incident (row i of every array is unit i)."""

    site: str
    vectors: np.ndarray   # [n_units, features] float32
    kind: np.ndarray      # [n_units] int64, index into STEP_KINDS
    bucket: np.ndarray    # [n_units] int64, index into the position buckets
    step: np.ndarray      # [n_units] int64
    position: np.ndarray  # [n_units] int64, absolute position in the sequence (a group's first)
    #: ``None``: unit i is row i of ``vectors``. Otherwise units are position GROUPS (see
    #: :func:`group_units`): unit i is rows ``offsets[i]:offsets[i + 1]``. [n_units + 1] int64
    offsets: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.kind.shape[0])

    def rows(self, i: int) -> np.ndarray:
        """The feature rows of unit ``i`` ``[n_rows, features]`` (one row for a position unit)."""
        if self.offsets is None:
            return self.vectors[i:i + 1]
        return self.vectors[int(self.offsets[i]):int(self.offsets[i + 1])]


def check_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
    """Validate position-bucket boundaries: ints, strictly increasing, starting at 0."""
    b = tuple(int(x) for x in buckets)
    if not b or b[0] != 0 or any(y <= x for x, y in itertools.pairwise(b)):
        raise AnalysisError(
            f"position_buckets={list(buckets)!r} must be strictly increasing lower boundaries "
            "starting at 0, e.g. (0, 1, 2, 4, 8, 16)"
        )
    return b


def bucket_of(positions: np.ndarray, buckets: Sequence[int]) -> np.ndarray:
    """Bucket index of each absolute position (``buckets`` are lower boundaries)."""
    return np.asarray([bisect.bisect_right(buckets, int(p)) - 1 for p in positions],
                      dtype=np.int64)


def as_incident(x: Any) -> Any:
    """The incident behind ``x``: a replay session (anything with ``.incident``) or an Incident."""
    inc = getattr(x, "incident", x)
    if not all(hasattr(inc, a) for a in ("sites", "steps", "tensor", "manifest")):
        raise AnalysisError(
            f"cannot analyse a {type(x).__name__}: pass an integrations.incident.Incident "
            "(Incident.open(path)) or a replay session with an .incident attribute"
        )
    return inc


def fingerprint_of(inc: Any) -> str | None:
    """The model fingerprint recorded in an incident's manifest (None if not recorded)."""
    model = inc.manifest.get("model") or {}
    fp = model.get("fingerprint") if isinstance(model, dict) else None
    return str(fp) if fp else None


def _pattern(p: str) -> re.Pattern[str]:
    return re.compile("^" + ".*".join(re.escape(part) for part in p.split("*")) + "$")


def select_sites(available: Sequence[str], patterns: Sequence[str] | None) -> list[str]:
    """The available sites matching any pattern (``*`` is a wildcard, all else literal).

    Example: ``select_sites(inc.sites(), ["blocks.*.resid_post"])``
    """
    if patterns is None:
        return sorted(available)
    if isinstance(patterns, str):
        patterns = [patterns]
    regs = [_pattern(p.replace(" ", "")) for p in patterns]
    chosen = sorted(s for s in available if any(r.match(s) for r in regs))
    if not chosen:
        raise AnalysisError(
            f"no site matches {list(patterns)!r}; available: {sorted(available)[:20]!r}"
        )
    return chosen


def site_units(inc: Any, site: str, *, buckets: Sequence[int]) -> SiteUnits:
    """Every position of every recorded step of ``site`` as a unit (see module doc).

    Canonical tensors are ``[batch, pos, *features]`` (features flattened); ``[batch, features]``
    (e.g. classifier logits) counts as one position. Batch rows are separate sequences.
    """
    import torch

    vecs: list[np.ndarray] = []
    kinds: list[np.ndarray] = []
    steps: list[np.ndarray] = []
    poss: list[np.ndarray] = []
    offset = 0
    step_list = inc.steps(site, kind="activation")
    for step in step_list:
        t = inc.tensor(site, step=step, kind="activation")
        if t.ndim == 0:
            raise AnalysisError(f"site {site!r} step {step} holds a scalar; nothing to score")
        if t.ndim == 1:
            t = t.reshape(1, 1, -1)
        elif t.ndim == 2:
            t = t.unsqueeze(1)  # [batch, 1, features]
        batch, n_pos = int(t.shape[0]), int(t.shape[1])
        x = t.detach().to(torch.float32).reshape(batch * n_pos, -1).numpy()  # [batch*pos, feat]
        pos = np.tile(np.arange(offset, offset + n_pos, dtype=np.int64), batch)
        if step == step_list[0]:
            kind = np.zeros(n_pos, dtype=np.int64)
            kind[-1] = 1
        else:
            kind = np.full(n_pos, 2, dtype=np.int64)
        vecs.append(x)
        kinds.append(np.tile(kind, batch))
        steps.append(np.full(batch * n_pos, step, dtype=np.int64))
        poss.append(pos)
        offset += n_pos
    widths = {v.shape[1] for v in vecs}
    if len(widths) != 1:
        raise AnalysisError(f"site {site!r} changes its feature size across steps: {widths}")
    position = np.concatenate(poss)
    return SiteUnits(site=site, vectors=np.ascontiguousarray(np.concatenate(vecs)),
                     kind=np.concatenate(kinds), bucket=bucket_of(position, buckets),
                     step=np.concatenate(steps), position=position)


def group_units(u: SiteUnits) -> SiteUnits:
    """The same rows as ``u`` grouped into (step, step kind, position bucket) units: each unit
    is a maximal run of consecutive positions of one sequence that share step, kind and bucket
    (DESIGN §7 scores per (site, step, position bucket)). A decode step is one position, so it
    stays its own unit; a prefill of 40 tokens with the default buckets becomes 7 units
    ([0], [1], [2,4), [4,8), [8,16), [16,32), [32,39)) plus its last position (kind ``last``).

    Example::

        g = group_units(site_units(inc, "blocks.0.resid_post", buckets=DEFAULT_POSITION_BUCKETS))
        g.rows(0).shape     # [n_positions_in_group, d_model]
    """
    if u.offsets is not None:
        return u
    n = int(u.vectors.shape[0])
    if n == 0:
        return SiteUnits(site=u.site, vectors=u.vectors, kind=u.kind, bucket=u.bucket,
                         step=u.step, position=u.position, offsets=np.zeros(1, np.int64))
    brk = np.ones(n, dtype=bool)  # brk[i]: row i starts a new unit
    brk[1:] = ((u.step[1:] != u.step[:-1]) | (u.kind[1:] != u.kind[:-1])
               | (u.bucket[1:] != u.bucket[:-1]) | (u.position[1:] != u.position[:-1] + 1))
    starts = np.flatnonzero(brk)
    return SiteUnits(site=u.site, vectors=u.vectors, kind=u.kind[starts],
                     bucket=u.bucket[starts], step=u.step[starts],
                     position=u.position[starts],
                     offsets=np.append(starts, n).astype(np.int64))
