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
    fix.interactions.pairs[0].label        # IS-C: redundant | synergistic | independent | ...

The package exports what a user of the search needs: :class:`CausalCCA`, the failure
predicates (:class:`Failure`, bound on a session: :class:`BoundFailure`) and the result types
(:class:`FixSet` with its :class:`Necessity`, :class:`VariantResult`, :class:`SideEffects`,
:class:`PermutationTest`, and IS-C: :class:`Interactions` of :class:`PairInteraction`, also
measured on any set of interventions by :func:`interaction_indices`). The algorithms are
private modules: :mod:`._attribution` (ranking), :mod:`._group_testing` (growth, adaptive
group testing, delta debugging, 1-minimality), :mod:`._strategies` (beam, exhaustive),
:mod:`._growth` (variants), :mod:`._interactions` (IS-C), statistics in
:mod:`._stats`, and the model behind the search's ``Oracle`` protocol in :mod:`._oracle`.
"""

from __future__ import annotations

from ._failure import BoundFailure, Failure
from ._fixset import FixSet, Necessity, VariantResult
from ._interactions import Interactions, PairInteraction
from ._isc import interaction_indices
from ._search import CausalCCA
from ._stats import PermutationTest, SideEffects

__all__ = [
    "BoundFailure",
    "CausalCCA",
    "Failure",
    "FixSet",
    "Interactions",
    "Necessity",
    "PairInteraction",
    "PermutationTest",
    "SideEffects",
    "VariantResult",
    "interaction_indices",
]
