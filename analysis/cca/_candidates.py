"""The candidates of a fix-set search: the sites, and one intervention of the chosen kind each.

Candidate site patterns expand on the model (``*`` selectors included: ``[pos=*]`` covers every
position of every forward call); the intervention kind takes its donor from the caller or from
the benign inputs (``mean``/``resample``: a :class:`~analysis.interventions.DonorBaseline` built
from them; ``patch``: the first benign incident).

Example::

    sites = candidate_sites(session, ["blocks.*.mlp.post[neuron=*]"])
    ivs = candidate_interventions(sites, "mean", benign_sessions, baseline=None, donor=None,
                                  factor=None, model=session.model)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from analysis.interventions import INTERVENTION_KINDS, DonorBaseline, Intervention
from analysis.replay import ReplaySession
from integrations.errors import AnalysisError
from integrations.sites import resolve_sites

__all__ = ["DEFAULT_CANDIDATES", "candidate_interventions", "candidate_sites"]

#: Attention and MLP outputs of every block (DESIGN §8's default candidates).
DEFAULT_CANDIDATES: tuple[str, ...] = ("blocks.*.attn", "blocks.*.mlp")


def candidate_sites(session: ReplaySession, patterns: Sequence[str] | None) -> list[str]:
    """The concrete sites of ``patterns`` (default :data:`DEFAULT_CANDIDATES`) on the model."""
    patterns = list(patterns) if patterns else list(DEFAULT_CANDIDATES)
    seq_len = sum(c.seq_len for c in session.plan.steps)  # [pos=*] over every position
    sites = list(dict.fromkeys(b.site for b in resolve_sites(session.model, patterns,
                                                             seq_len=seq_len)))
    if not sites:
        raise AnalysisError(f"candidates {patterns} resolve to no site on this model")
    return sites


def candidate_interventions(sites: list[str], kind: str, benign: list[ReplaySession], *,
                            baseline: DonorBaseline | None, donor: Any, factor: float | None,
                            model: torch.nn.Module) -> list[Intervention]:
    """One ``kind`` intervention per site, with its donor (module doc)."""
    if kind not in INTERVENTION_KINDS:
        raise AnalysisError(f"intervention={kind!r}: use one of {', '.join(INTERVENTION_KINDS)}")
    if kind in ("mean", "resample"):
        if baseline is None:
            if not benign:
                raise AnalysisError(
                    f"intervention={kind!r} needs a baseline of benign traffic: pass "
                    "benign=[incidents] or baseline=DonorBaseline.from_incidents(...), or use "
                    "intervention='zero'")
            bases = sorted({s.split("[", 1)[0] for s in sites})
            baseline = DonorBaseline.from_incidents([s.incident for s in benign], sites=bases,
                                                    model=model)
        return [Intervention(s, kind, donor=baseline) for s in sites]  # type: ignore[arg-type]
    if kind == "patch":
        if donor is None:
            if not benign:
                raise AnalysisError("intervention='patch' needs donor= (a benign incident "
                                    "or counterfactual prompt ids) or benign=[...]")
            donor = benign[0].incident
        return [Intervention(s, "patch", donor=donor) for s in sites]
    if kind == "scale":
        if factor is None:
            raise AnalysisError("intervention='scale' needs factor=, e.g. factor=0.0")
        return [Intervention(s, "scale", factor=factor) for s in sites]
    return [Intervention(s, "zero") for s in sites]
