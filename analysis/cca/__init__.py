"""Causal minimal fix sets (CCA, DESIGN §8): the smallest set of activation interventions that
makes a replayed failure go away, verified by real forward passes, with its statistics.

Example::

    from analysis.cca import CausalCCA, Failure
    fix = CausalCCA(max_fix_set_size=8, search_strategy="greedy").search_fix_set(
        session, guided_by=cf_report, benign=benign_incidents,
        failure=Failure.token(token_id, position=-1),
        candidates=["blocks.*.attn", "blocks.*.mlp"], intervention="mean")
    fix.flip, fix.interventions[0].site, fix.flip_rate, fix.flip_rate_ci
    fix.side_effects.mean_kl, fix.p_value, fix.forward_passes, fix.exhaustive_forward_passes

Algorithms: :mod:`._attribution` (ranking), :mod:`._group_testing` (growth, adaptive group
testing, delta debugging, 1-minimality), :mod:`._strategies` (beam, exhaustive), statistics in
:mod:`._stats`, the model behind the :class:`Oracle` protocol in :mod:`._oracle`.
"""

from __future__ import annotations

from ._failure import REASON_TEXT, BoundFailure, Failure
from ._fixset import FixSet, Necessity, VariantResult
from ._group_testing import Reduction, ddmin, minimise, progressive_reduce
from ._oracle import Oracle, SessionOracle, flipped
from ._search import DEFAULT_CANDIDATES, CausalCCA
from ._stats import PermutationTest, SideEffects, wilson_ci
from ._strategies import beam_search, exhaustive_count, exhaustive_search

__all__ = [
    "DEFAULT_CANDIDATES",
    "REASON_TEXT",
    "BoundFailure",
    "CausalCCA",
    "Failure",
    "FixSet",
    "Necessity",
    "Oracle",
    "PermutationTest",
    "Reduction",
    "SessionOracle",
    "SideEffects",
    "VariantResult",
    "beam_search",
    "ddmin",
    "exhaustive_count",
    "exhaustive_search",
    "flipped",
    "minimise",
    "progressive_reduce",
    "wilson_ci",
]
