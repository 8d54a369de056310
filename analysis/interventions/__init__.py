"""Interventions on sites during deterministic replay: patch, mean, zero, resample, scale.

Several interventions apply jointly in one forward pass; many candidate sets are evaluated in
batched forwards (:meth:`analysis.replay.ReplaySession.run_batch`), and final claims are
re-verified at the incident's own shapes (:meth:`~analysis.replay.ReplaySession.verify`).

Example::

    from analysis.interventions import Baseline, Intervention
    baseline = Baseline.from_incidents(benign_incidents, sites=["blocks.*.mlp"], model=model)
    result = session.run(interventions=[
        Intervention("blocks.1.mlp", "mean", donor=baseline),
        Intervention("blocks.0.attn.z[head=2]", "zero"),
    ])
    result.logits[-1]            # [batch, vocab] at the last step
"""

from __future__ import annotations

from ._baseline import Baseline, MeanBaseline, site_base, site_vectors
from ._intervention import KINDS, Intervention, InterventionKind, normalize_sets
from ._plan import DonorFn, InterventionPlan, localize

__all__ = [
    "KINDS",
    "Baseline",
    "DonorFn",
    "Intervention",
    "InterventionKind",
    "InterventionPlan",
    "MeanBaseline",
    "localize",
    "normalize_sets",
    "site_base",
    "site_vectors",
]
