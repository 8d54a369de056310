"""Interventions on sites during deterministic replay: patch, mean, zero, resample, scale.

Built on replay's one primitive (an edit function hooked on sites during the incident's own
forward calls, :meth:`analysis.replay.ReplaySession.run_edited`); this package imports
:mod:`analysis.replay`, never the reverse. Several interventions apply jointly in one forward
pass; many candidate sets are evaluated in batched forwards
(:meth:`~analysis.replay.ReplaySession.run_batch`), and final claims are re-verified at the
incident's own shapes (:meth:`~analysis.replay.ReplaySession.verify`): the session hands each
set to :meth:`Intervention.bind_sets`, which runs the donors (:class:`DonorCache`) and compiles
the sets into one :class:`InterventionPlan`.

Example::

    from analysis.interventions import DonorBaseline, Intervention
    baseline = DonorBaseline.from_incidents(benign_incidents, sites=["blocks.*.mlp"], model=model)
    result = session.run([
        Intervention("blocks.1.mlp", "mean", donor=baseline),
        Intervention("blocks.0.attn.z[head=2]", "zero"),
    ])
    result.logits[-1]            # [batch, vocab] at the last step
"""

from __future__ import annotations

from ._direction import LinearGate, Subspace, SubspaceRule
from ._donor_baseline import DonorBaseline, site_base, site_vectors
from ._donors import DonorCache, resample_generator
from ._gate import GateTracker, PromptGate
from ._intervention import INTERVENTION_KINDS, Intervention, InterventionKind, normalize_sets
from ._live import applied, check_portable
from ._plan import DonorFn, InterventionPlan, localize

__all__ = [
    "INTERVENTION_KINDS",
    "DonorBaseline",
    "DonorCache",
    "DonorFn",
    "GateTracker",
    "Intervention",
    "InterventionKind",
    "InterventionPlan",
    "LinearGate",
    "PromptGate",
    "Subspace",
    "SubspaceRule",
    "applied",
    "check_portable",
    "localize",
    "normalize_sets",
    "resample_generator",
    "site_base",
    "site_vectors",
]
