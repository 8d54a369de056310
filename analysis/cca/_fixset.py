"""The result of a fix-set search: the interventions, and the measurements that back them.

Every number in a :class:`FixSet` comes from replaying the model (see :mod:`._search`); when no
set within ``max_fix_set_size`` flips the failure, ``flip`` is False, ``interventions`` is empty,
``reason`` says what was tried, and no rate is reported.

Forward-pass accounting (``forward_passes`` and friends) counts *replays of an incident*: one
evaluated intervention set = one replay, whether it shared a batched forward with others or not
(a generate incident's replay is one model call per step up to the decision step). The
exhaustive baseline ``exhaustive_forward_passes`` is single-candidate exhaustive patching: one
replay per candidate.

Example::

    fix = CausalCCA().search_fix_set(session, benign=benign, failure=Failure.token(7))
    fix.flip, [iv.site for iv in fix.interventions], fix.flip_rate, fix.flip_rate_ci
    fix.necessity[0].metric_without, fix.side_effects.mean_kl, fix.p_value
    fix.forward_passes, fix.exhaustive_forward_passes
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from analysis._results import JsonRecord, rank_in
from analysis.interventions import Intervention

from ._interactions import Interactions
from ._stats import PermutationTest, SideEffects

__all__ = ["FixSet", "Necessity", "VariantResult"]


@dataclass(frozen=True)
class Necessity(JsonRecord):
    """One element's necessity: the verified metric of the fix set without it, and the change
    (``metric_without - metric_with``; > 0 means removing it brings the failure back closer)."""

    site: str
    metric_without: float
    delta: float
    flips_without: bool
    role: str = "core"  # core: needed for the incident; variants: added for variants


@dataclass(frozen=True)
class VariantResult(JsonRecord):
    """The fix set on one variant: its clean and fixed metric (both replayed, batch 1)."""

    id: str
    metric_clean: float
    metric_fixed: float
    flipped: bool


@dataclass
class FixSet:
    """A verified minimal fix set, or an honest "none found" (module doc).

    ``flip``: the set's replay at the incident's own shapes flips the failure (metric <= 0).
    ``greedy_check`` (text failures): a free greedy continuation with the fix no longer contains
    the text (``greedy_output``); the flip itself is measured teacher-forced at the decision step.
    ``one_minimal``: removing any single element was replayed and un-flips the failure (for
    elements added for variants: lowers the variant flip rate). ``flip_rate`` /
    ``flip_rate_ci``: share of failing variants the set flips, Wilson 95 %. ``p_value``: vs
    random same-size candidate sets. ``total_flip_rate``: the seed's name for ``flip_rate``.
    ``interactions``: IS-C, the pairwise interaction of the set's components over the incident
    and its failing variants (:mod:`._interactions`; sets of 2 or more components).
    """

    flip: bool
    interventions: list[Intervention]
    reason: str
    failure: str
    incident_id: str
    strategy: str
    intervention_kind: str
    n_candidates: int
    metric_before: float
    metric_after: float | None = None
    one_minimal: bool = False
    necessity: list[Necessity] = field(default_factory=list)
    flip_rate: float | None = None
    flip_rate_ci: tuple[float, float] | None = None
    variants: list[VariantResult] = field(default_factory=list)
    variants_tried: int = 0
    side_effects: SideEffects | None = None
    permutation: PermutationTest | None = None
    forward_passes: int = 0
    exhaustive_forward_passes: int = 0
    statistics_forward_passes: int = 0
    model_calls: int = 0
    gradient_passes: int = 0
    greedy_check: bool | None = None
    greedy_output: str | None = None
    ranking: list[tuple[str, float]] = field(default_factory=list)
    trace: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    model: dict[str, Any] | None = None
    derivation: dict[str, Any] | None = None
    interactions: Interactions | None = None

    # -- the portable artefact (DESIGN §14) -------------------------------------------------

    def apply(self, model: torch.nn.Module) -> contextlib.AbstractContextManager[Any]:
        """Install the fix on a live ``model`` for any input inside a ``with`` block (hooks
        removed on exit); every intervention must be portable
        (:func:`analysis.interventions.check_portable`).

        Example::

            with fix.apply(model):
                model.generate(ids, max_new_tokens=16, do_sample=False)
        """
        from analysis.interventions import applied

        return applied(model, self.interventions)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the fix as ``path`` (JSON) + ``.safetensors`` beside it (no pickle)."""
        from ._fixset_io import write_fix

        return write_fix(path, interventions=self.interventions, measured=self.to_dict(),
                         model=self.model)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FixSet:
        """Read a fix written by :meth:`save` (validated; raises ``FixFileError``)."""
        from ._fixset_io import read_fix

        ivs, measured, model = read_fix(path)
        return cls.from_saved(ivs, measured, model=model)

    @classmethod
    def from_saved(cls, interventions: list[Intervention], measured: dict[str, Any], *,
                   model: dict[str, Any] | None = None) -> FixSet:
        """A loaded fix: its interventions, and the measurements saved with it kept as
        :attr:`derivation` (they were measured when the fix was derived, not now)."""
        def num(key: str, default: float = 0.0) -> float:
            v = measured.get(key)
            return float(v) if isinstance(v, int | float) and not isinstance(v, bool) \
                else default

        def text(key: str) -> str:
            v = measured.get(key)
            return v if isinstance(v, str) else ""

        return cls(flip=bool(measured.get("flip", True)), interventions=interventions,
                   reason=text("reason"), failure=text("failure"),
                   incident_id=text("incident_id"), strategy=text("strategy"),
                   intervention_kind=text("intervention_kind"),
                   n_candidates=int(num("n_candidates")),
                   metric_before=num("metric_before"), model=model,
                   derivation=dict(measured))

    @property
    def sites(self) -> list[str]:
        """The intervened sites, in fix-set order."""
        return [iv.site for iv in self.interventions]

    @property
    def size(self) -> int:
        return len(self.interventions)

    @property
    def total_flip_rate(self) -> float | None:
        """Alias of :attr:`flip_rate` (the seed README's name)."""
        return self.flip_rate

    @property
    def p_value(self) -> float | None:
        return None if self.permutation is None else self.permutation.p_value

    @property
    def search_fraction(self) -> float | None:
        """``forward_passes / exhaustive_forward_passes``."""
        if not self.exhaustive_forward_passes:
            return None
        return self.forward_passes / self.exhaustive_forward_passes

    def rank_of(self, site: str) -> int | None:
        """1-based position of ``site`` in the prior ranking (None when not ranked)."""
        return rank_in(self.ranking, site)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (DuckDB rows, gRPC, CLI)."""
        return {
            "flip": self.flip, "reason": self.reason, "failure": self.failure,
            "incident_id": self.incident_id, "strategy": self.strategy,
            "intervention_kind": self.intervention_kind, "n_candidates": self.n_candidates,
            "interventions": [iv.to_dict() for iv in self.interventions],
            "metric_before": self.metric_before, "metric_after": self.metric_after,
            "one_minimal": self.one_minimal,
            "necessity": [n.to_dict() for n in self.necessity],
            "flip_rate": self.flip_rate,
            "flip_rate_ci": None if self.flip_rate_ci is None else list(self.flip_rate_ci),
            "variants": [v.to_dict() for v in self.variants],
            "variants_tried": self.variants_tried,
            "side_effects": None if self.side_effects is None else self.side_effects.to_dict(),
            "permutation": None if self.permutation is None else self.permutation.to_dict(),
            "p_value": self.p_value,
            "forward_passes": self.forward_passes,
            "exhaustive_forward_passes": self.exhaustive_forward_passes,
            "statistics_forward_passes": self.statistics_forward_passes,
            "model_calls": self.model_calls, "gradient_passes": self.gradient_passes,
            "greedy_check": self.greedy_check, "greedy_output": self.greedy_output,
            "ranking_top": [[s, v] for s, v in self.ranking[:20]],
            "trace": list(self.trace), "notes": list(self.notes),
            "model": self.model, "derivation": self.derivation,
            "interactions": None if self.interactions is None else self.interactions.to_dict(),
        }

    def summary(self) -> str:
        """A few lines for logs and the CLI."""
        if not self.flip:
            return f"no fix set: {self.reason}"
        lines = [f"fix set ({self.size}, {self.intervention_kind}, strategy {self.strategy}): "
                 + ", ".join(self.sites)]
        if self.flip_rate is not None and self.flip_rate_ci is not None:
            lines.append(f"flip rate {self.flip_rate:.2f} "
                         f"[{self.flip_rate_ci[0]:.2f}, {self.flip_rate_ci[1]:.2f}] over "
                         f"{len(self.variants)} variants")
        if self.side_effects is not None:
            se = self.side_effects
            lines.append(f"benign: mean KL {se.mean_kl:.4f} nats, top-1 agreement "
                         f"{se.top1_agreement:.3f} ({se.n_incidents} incidents)")
        if self.permutation is not None:
            lines.append(f"p = {self.permutation.p_value:.3g} vs "
                         f"{self.permutation.n_permutations} random sets")
        lines.append(f"{self.forward_passes} replays vs {self.exhaustive_forward_passes} "
                     "for exhaustive single-candidate patching")
        if self.interactions is not None:
            lines.extend(self.interactions.summary_lines())
        return "\n".join(lines)

    def __repr__(self) -> str:
        if not self.flip:
            return f"FixSet(flip=False, reason={self.reason!r})"
        return (f"FixSet(flip=True, sites={self.sites}, flip_rate={self.flip_rate}, "
                f"forward_passes={self.forward_passes})")
