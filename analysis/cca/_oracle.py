"""The search's only view of the model: an oracle that replays candidate sets and returns metrics.

The search algorithms (:mod:`._group_testing`, :mod:`._strategies`) see candidates as indices
``0..n-1`` and call two methods:

``evaluate_batch(sets) -> [metric]``  exploratory, many sets per batched forward (batching
    changes floating-point sums, so these values only steer the search);
``verify(set) -> metric``            one set at the incident's own shapes (batch 1): the only
    values any claim (a flip, 1-minimality, necessity) is based on.

A metric is > 0 while the failure persists (:mod:`._failure`). Every call is a real replay;
``forward_passes`` counts replays of the incident (one per evaluated set, batched or not —
the unit of the exhaustive count), ``model_calls`` the model forward calls that carried them.

:class:`SessionOracle` is the adapter onto :class:`~analysis.replay.ReplaySession`: candidate
``i`` is an :class:`~analysis.interventions.Intervention`; a set's interventions on the same base
site with single-index selectors (``blocks.2.mlp.post[neuron=17]``, ``[neuron=90]``) are merged
into one (``blocks.2.mlp.post[neuron=17|90]``), which is the same intervention applied with one
hook instead of many.

Example::

    oracle = SessionOracle(session, Failure.token(7).bind(session), interventions)
    oracle.verify([3, 17])            # metric with candidates 3 and 17 intervened jointly
    oracle.evaluate_batch([[0], [1], [0, 1]])
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

from analysis.interventions import Intervention
from analysis.replay import ReplaySession

from ._failure import BoundFailure

__all__ = ["Oracle", "SessionOracle", "flipped", "merge_interventions"]

_SINGLE = re.compile(r"^(?P<base>[^\[]+)\[(?P<key>neuron|head|pos)=(?P<idx>-?\d+)\]$")


def flipped(metric: float) -> bool:
    """A set flips the failure when the replayed metric is <= 0."""
    return metric <= 0.0


class Oracle(Protocol):
    """What the search needs (see the module doc)."""

    @property
    def n(self) -> int: ...

    @property
    def forward_passes(self) -> int: ...

    def evaluate_batch(self, sets: Sequence[Sequence[int]]) -> list[float]: ...

    def verify(self, s: Sequence[int]) -> float: ...


def merge_interventions(ivs: Sequence[Intervention]) -> list[Intervention]:
    """Merge interventions that differ only in a single-index selector of the same base site
    (kinds zero/mean/patch/scale with identical options; ``resample`` draws depend on the site
    string, so it is never merged)."""
    groups: dict[tuple[object, ...], list[tuple[int, Intervention]]] = {}
    out: list[Intervention] = []
    for iv in ivs:
        m = _SINGLE.match(iv.site)
        if m is None or iv.kind == "resample" or iv.value is not None:
            out.append(iv)
            continue
        key = (m["base"], m["key"], iv.kind, id(iv.donor), iv.factor, iv.steps, iv.seed)
        groups.setdefault(key, []).append((int(m["idx"]), iv))
    for (base, sel, *_), members in groups.items():
        if len(members) == 1:
            out.append(members[0][1])
            continue
        idx = "|".join(str(i) for i in sorted({i for i, _ in members}))
        first = members[0][1]
        out.append(Intervention(f"{base}[{sel}={idx}]", first.kind, donor=first.donor,
                                factor=first.factor, steps=first.steps, seed=first.seed))
    return out


class SessionOracle:
    """Candidate sets replayed on a :class:`~analysis.replay.ReplaySession` (module doc).

    Verified metrics are memoised per set (a set is never replayed twice at batch 1);
    ``max_batch`` sets share one batched forward.

    Example::

        o = SessionOracle(session, bound_failure, [Intervention(s, "zero") for s in sites])
        o.verify([])          # the unintervened metric (> 0: the incident fails)
    """

    def __init__(self, session: ReplaySession, failure: BoundFailure,
                 interventions: Sequence[Intervention], *, max_batch: int = 64) -> None:
        self.session = session
        self.failure = failure
        self.interventions = list(interventions)
        self.max_batch = max(1, int(max_batch))
        self._verified: dict[frozenset[int], float] = {}
        self.passes = 0           # replays (sets evaluated)
        self.verified_passes = 0  # of which at batch 1
        self._calls0 = session.forward_passes

    @property
    def n(self) -> int:
        return len(self.interventions)

    @property
    def forward_passes(self) -> int:
        return self.passes

    @property
    def model_calls(self) -> int:
        """Model forward calls made through this oracle's session since it was created
        (donor runs included)."""
        return self.session.forward_passes - self._calls0

    def interventions_for(self, s: Sequence[int]) -> list[Intervention]:
        """The (merged) interventions of candidate set ``s``."""
        return merge_interventions([self.interventions[i] for i in sorted(set(s))])

    def evaluate_batch(self, sets: Sequence[Sequence[int]]) -> list[float]:
        if not sets:
            return []
        results = self.session.run_batch([self.interventions_for(s) for s in sets],
                                         max_batch=self.max_batch)
        self.passes += len(sets)
        return [self.failure.value(r.logits) for r in results]

    def verify(self, s: Sequence[int]) -> float:
        key = frozenset(s)
        if key not in self._verified:
            r = self.session.verify(self.interventions_for(s))
            self.passes += 1
            self.verified_passes += 1
            self._verified[key] = self.failure.value(r.logits)
        return self._verified[key]

    def verified(self, s: Sequence[int]) -> float | None:
        """The memoised verified metric of ``s`` (None when never verified)."""
        return self._verified.get(frozenset(s))
