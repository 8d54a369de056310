"""IS-C: pairwise interaction indices among the components of a fix set, from replays.

The game: the players are a fix set's interventions (its components); a coalition ``S`` is the
set of components *applied*; its value ``v(S)`` is the failure metric (:mod:`._failure`: > 0
while the failure persists) of a real replay with ``S`` applied, at the incident's own shapes
(batch 1, memoised per input). The pairwise **Shapley–Taylor interaction index** (Sundararajan,
Dhamdhere & Agarwal 2020, order 2) of components ``i`` and ``j`` among ``n``::

    I_ij = (2/n) * sum_{S ⊆ N \\ {i,j}} delta_ij(S) / C(n-1, |S|)
    delta_ij(S) = v(S+i+j) - v(S+i) - v(S+j) + v(S)

equivalently ``E_pi[delta_ij(S_pi)]`` with ``S_pi`` the components before the first of ``i, j``
in a uniformly random order ``pi`` (for ``n = 2``: ``delta_ij(∅)``). With ``n <= max_exact``
every coalition is replayed and the index is exact per input; above it, ``n_permutations``
random orders are sampled per input (every coalition a draw needs is replayed).

Sign and labels. ``delta_ij`` is the same whether "present" means applied (a fix component) or
left intact (a cause), so the sign reads in the language of causes. **Negative: redundant** —
either component alone sustains the failure (a two-site OR: fixing one does nothing, fixing both
removes it; neither cause is necessary, together they are sufficient). **Positive:
synergistic** — the failure needs both (fixing either one alone already removes most of it).
Near zero: the components' effects add up (**independent**).

Inputs and intervals. The index is measured on every given input that fails when replayed clean
(the incident and its failing variants) and pooled as a ratio of means, normalised by the fix's
total effect: ``index = sum_x I_ij(x) / sum_x (v_x(∅) - v_x(N))`` (``-1``: perfectly redundant,
``+1``: perfectly synergistic, ``0``: additive). The confidence interval is a percentile
bootstrap over inputs (and, when sampled, over each input's permutation draws); with one input
and exact enumeration there is no sampling uncertainty and the interval is the point. A pair is
``redundant`` when the whole interval is below ``-threshold``, ``synergistic`` when above
``+threshold``, ``independent`` when inside ``[-threshold, threshold]``, else ``inconclusive``.
``needs_both`` is the flip-level check beside the index: the share of inputs where, with the rest
of the fix applied, adding either component alone leaves the failure and adding both removes it.

This module is the estimator over :class:`~._oracle.Oracle` s (one per input) and the result
types; :func:`~._isc.interaction_indices` runs it on a replay session and its variants, and
:class:`~analysis.cca.CausalCCA` on every fix set of 2 or more components.

Example::

    isc = pairwise_interactions([oracle, *variant_oracles], fix_items, sites=fix.sites)
    isc.pairs[0].a, isc.pairs[0].b, isc.pairs[0].index, isc.pairs[0].ci, isc.pairs[0].label
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from analysis._results import JsonRecord

from ._oracle import Oracle, flipped

__all__ = ["LABELS", "Interactions", "PairInteraction", "pairwise_interactions"]

#: The classification of a pair (module doc).
LABELS = ("redundant", "synergistic", "independent", "inconclusive")

Pair = tuple[int, int]
Value = Callable[[frozenset[int]], float]


@dataclass(frozen=True)
class PairInteraction(JsonRecord):
    """One pair's interaction (module doc): normalised Shapley–Taylor ``index`` with its
    bootstrap ``ci`` (None when the fix has no effect to normalise by), ``raw`` (mean index in
    metric units), ``label`` and ``needs_both`` (share of inputs)."""

    a: str
    b: str
    index: float | None
    ci: tuple[float, float] | None
    raw: float
    label: str
    needs_both: float


@dataclass(frozen=True)
class Interactions(JsonRecord):
    """IS-C of one fix set (module doc): a :class:`PairInteraction` per pair of components.

    ``method``: ``exact`` (every coalition replayed) or ``sampled`` (``n_permutations`` random
    orders per input); ``coalitions``: distinct coalitions replayed per input (most);
    ``forward_passes``: replays this cost (memoised ones not counted twice).

    Example::

        isc.pair("blocks.1.mlp.post[neuron=40]", "blocks.3.mlp.post[neuron=200]").label
    """

    pairs: list[PairInteraction]
    method: str
    n_components: int
    n_inputs: int
    n_permutations: int | None
    coalitions: int
    n_bootstrap: int
    confidence: float
    threshold: float
    forward_passes: int
    notes: list[str] = field(default_factory=list)

    def pair(self, a: str, b: str) -> PairInteraction | None:
        """The pair of sites ``a`` and ``b`` (either order), or None."""
        return next((p for p in self.pairs if {p.a, p.b} == {a, b}), None)

    def summary_lines(self) -> list[str]:
        """One line per pair, for logs and the CLI."""
        out = [f"interactions (IS-C, pairwise Shapley–Taylor, {self.method}, {self.n_inputs} "
               f"input(s), {self.confidence:.0%} bootstrap CI; < 0 redundant, > 0 synergistic):"]
        for p in self.pairs:
            ci = "—" if p.ci is None else f"[{p.ci[0]:+.2f}, {p.ci[1]:+.2f}]"
            idx = "—" if p.index is None else f"{p.index:+.2f}"
            out.append(f"  {p.a} × {p.b}: {idx} {ci} {p.label} (needs both in "
                       f"{p.needs_both:.0%} of inputs)")
        return out


def _exact_index(value: Value, n: int, i: int, j: int) -> float:
    """Shapley–Taylor pair index of ``i, j`` by enumeration (module doc)."""
    rest = [k for k in range(n) if k not in (i, j)]
    total = 0.0
    for size in range(len(rest) + 1):
        w = 2.0 / (n * math.comb(n - 1, size))
        for s in itertools.combinations(rest, size):
            base = frozenset(s)
            total += w * (value(base | {i, j}) - value(base | {i}) - value(base | {j})
                          + value(base))
    return total


def _permutation_draws(value: Value, n: int, pairs: list[Pair], n_permutations: int,
                       rng: random.Random) -> dict[Pair, list[float]]:
    """``delta_ij`` at the components before the first of ``i, j`` in random orders."""
    draws: dict[Pair, list[float]] = {p: [] for p in pairs}
    for _ in range(n_permutations):
        order = list(range(n))
        rng.shuffle(order)
        pos = {c: k for k, c in enumerate(order)}
        for i, j in pairs:
            base = frozenset(order[:min(pos[i], pos[j])])
            draws[(i, j)].append(value(base | {i, j}) - value(base | {i}) - value(base | {j})
                                 + value(base))
    return draws


def _bootstrap(draws: np.ndarray, totals: np.ndarray, *, n_bootstrap: int, confidence: float,
               rng: np.random.Generator) -> tuple[float | None, tuple[float, float] | None]:
    """Ratio-of-means index and its percentile interval; ``draws`` [inputs, draws]."""
    if totals.sum() <= 0:
        return None, None
    point = float(draws.mean(1).sum() / totals.sum())
    m, k = draws.shape
    rows = rng.integers(0, m, size=(n_bootstrap, m))  # [boot, inputs]
    if k > 1:
        cols = rng.integers(0, k, size=(n_bootstrap, m, k))  # [boot, inputs, draws]
        means = draws[rows[..., None], cols].mean(-1)  # [boot, inputs]
    else:
        means = draws[rows, 0]
    den = totals[rows].sum(1)  # [boot]
    ratios = np.where(den > 0, means.sum(1) / np.where(den > 0, den, 1.0), np.nan)
    a = (1.0 - confidence) / 2.0
    lo, hi = np.nanquantile(ratios, [a, 1.0 - a])
    return point, (min(float(lo), point), max(float(hi), point))


def _label(ci: tuple[float, float] | None, threshold: float) -> str:
    if ci is None:
        return "inconclusive"
    lo, hi = ci
    if hi < -threshold:
        return "redundant"
    if lo > threshold:
        return "synergistic"
    if -threshold <= lo and hi <= threshold:
        return "independent"
    return "inconclusive"


class _Game:
    """``v(S)``: the oracle's batch-1 metric with the components ``S`` (positions into
    ``items``) applied, memoised; ``len(game)`` is the number of coalitions replayed."""

    def __init__(self, oracle: Oracle, items: Sequence[int]) -> None:
        self.oracle, self.items = oracle, list(items)
        self.cache: dict[frozenset[int], float] = {}

    def __call__(self, s: frozenset[int]) -> float:
        if s not in self.cache:
            self.cache[s] = self.oracle.verify([self.items[k] for k in sorted(s)])
        return self.cache[s]

    def __len__(self) -> int:
        return len(self.cache)


def _needs_both(value: Value, n: int, i: int, j: int) -> bool:
    full = frozenset(range(n))
    return flipped(value(full)) and not flipped(value(full - {j})) and \
        not flipped(value(full - {i}))


@dataclass
class _Measured:
    """Per input: each pair's draws of its index, whether it needs both, the total effect."""

    draws: dict[Pair, list[list[float]]]
    both: dict[Pair, int]
    totals: list[float] = field(default_factory=list)
    coalitions: int = 0


def _measure(oracles: Sequence[Oracle], items: Sequence[int], pairs: list[Pair], *,
             exact: bool, n_permutations: int, seed: int) -> _Measured:
    n, rng = len(items), random.Random(seed)
    out = _Measured(draws={p: [] for p in pairs}, both=dict.fromkeys(pairs, 0))
    for o in oracles:
        game = _Game(o, items)
        if exact:
            for p in pairs:
                out.draws[p].append([_exact_index(game, n, *p)])
        else:
            for p, d in _permutation_draws(game, n, pairs, n_permutations, rng).items():
                out.draws[p].append(d)
        out.totals.append(game(frozenset()) - game(frozenset(range(n))))
        for p in pairs:
            out.both[p] += _needs_both(game, n, *p)
        out.coalitions = max(out.coalitions, len(game))
    return out


def pairwise_interactions(oracles: Sequence[Oracle], items: Sequence[int], *,
                          sites: Sequence[str], max_exact: int = 5, n_permutations: int = 32,
                          n_bootstrap: int = 2000, confidence: float = 0.95,
                          threshold: float = 0.2, seed: int = 0) -> Interactions:
    """IS-C over ``oracles`` (one per failing input: the incident, its variants) for the
    components ``items`` (candidate indices of the oracles; ``sites`` names them), module doc.

    Example::

        pairwise_interactions([oracle, *variant_oracles], fix_items, sites=fix.sites)
    """
    n = len(items)
    if n < 2 or len(sites) != n or not oracles:
        raise ValueError(f"IS-C needs >= 2 components named by as many sites and >= 1 input "
                         f"(got {n} components, {len(sites)} sites, {len(oracles)} inputs)")
    exact = n <= max_exact
    pairs = list(itertools.combinations(range(n), 2))
    passes0 = sum(o.forward_passes for o in oracles)
    m = _measure(oracles, items, pairs, exact=exact, n_permutations=n_permutations, seed=seed)
    gen = np.random.default_rng(seed)
    tot = np.asarray(m.totals, dtype=np.float64)  # [inputs]
    out = []
    for (i, j), d in m.draws.items():
        arr = np.asarray(d, dtype=np.float64)  # [inputs, draws]
        index, ci = _bootstrap(arr, tot, n_bootstrap=n_bootstrap, confidence=confidence,
                               rng=gen)
        out.append(PairInteraction(a=sites[i], b=sites[j], index=index, ci=ci,
                                   raw=float(arr.mean()), label=_label(ci, threshold),
                                   needs_both=m.both[(i, j)] / len(oracles)))
    notes = []
    if exact and len(oracles) == 1:
        notes.append("one input, every coalition replayed: no sampling uncertainty (the "
                     "interval is the point); pass failing variants for an interval over inputs")
    if tot.sum() <= 0:
        notes.append("the fix does not lower the failure metric on these inputs: no index")
    return Interactions(pairs=out, method="exact" if exact else "sampled", n_components=n,
                        n_inputs=len(oracles), n_permutations=None if exact else n_permutations,
                        coalitions=m.coalitions, n_bootstrap=n_bootstrap, confidence=confidence,
                        threshold=threshold,
                        forward_passes=sum(o.forward_passes for o in oracles) - passes0,
                        notes=notes)
