"""A recorded failing incident of a planted-fault model with what a fix-set search needs (the
IS-C tests in the analysis and report suites share it).

Example::

    c = planted_case(GPT2_OR)
    fix = CausalCCA().search_fix_set(c.session, benign=c.benign, baseline=c.baseline,
                                     failure=c.failure, variants=c.variants)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from analysis.cca import Failure
from analysis.interventions import DonorBaseline
from analysis.replay import Replayer, ReplaySession
from analysis.scenarios.planted import PlantedModel, build_planted
from integrations.incident import Incident
from tests.unit.analysis._traced import traced


@dataclass
class PlantedCase:
    """The model, the failing incident's session, a mean baseline (MLP neurons and outputs),
    the failure, 6 other failing prompts (variants) and 4 benign incidents."""

    pm: PlantedModel
    session: ReplaySession
    baseline: DonorBaseline
    failure: Failure
    variants: list[list[int]]
    benign: list[Incident]


def record(pm: PlantedModel, ids: list[int]) -> Incident:
    """One forward of ``ids`` as a traced incident."""
    return traced(pm.model, lambda: pm.model(input_ids=torch.tensor([ids])), request_id="r")


def planted_case(spec: dict[str, Any]) -> PlantedCase:
    """Build ``spec``'s model and record its case (prompts verified by running the model)."""
    pm = build_planted(spec)
    bad, *variants = pm.failing_prompts(7, seed=21)
    ok = pm.benign_prompts(12, seed=22)
    base = DonorBaseline.from_incidents([record(pm, p) for p in ok[:8]],
                                        sites=["blocks.*.mlp.post", "blocks.*.mlp"],
                                        model=pm.model)
    failure = Failure.token(pm.target_token) if pm.failure_kind == "token" else \
        Failure.label(pm.target_token)
    return PlantedCase(pm, Replayer(pm.model).load(record(pm, bad)), base, failure, variants,
                       [record(pm, p) for p in ok[8:]])
