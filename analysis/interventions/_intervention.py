"""One intervention: what to do to a site (+ selector) during a replay.

Kinds (DESIGN §6):

``zero``      the selected entries become 0.
``scale``     the selected entries are multiplied by ``factor`` (``scale`` 1.0 is an exact no-op).
``patch``     the selected entries take a donor's values: ``value=`` (a tensor broadcastable to
              the site's full tensor at every step, or ``{step: tensor}``), or ``donor=`` another
              :class:`~integrations.incident.Incident` (its recorded activation at the same site and
              step, computed by replaying it when not recorded), or ``donor=`` a counterfactual
              prompt (token ids; the model is run on it, teacher-forced on the incident's decode
              tokens). Donor positions are aligned **from the end** at the prefill step (the
              donor's last position meets the incident's last position); a selected position with
              no donor counterpart is an error. Decode steps have one position each and match 1:1.
``mean``      the selected entries take the per-site baseline mean (``donor=`` a
              :class:`~analysis.interventions.DonorBaseline`): one position-agnostic vector per
              site.
``resample``  each selected position takes a vector drawn from the baseline pool of the site,
              with a generator seeded from ``seed``, the site and the step (never the global RNG).
``project``   each selected vector's component in a subspace (``direction=`` a
              :class:`~analysis.interventions.Subspace`) is removed, set to a benign coordinate,
              or clamped into a benign range (DESIGN §14; see :mod:`._direction`).
``steer``     ``factor * direction`` is added to each selected vector (``direction=`` a ``[d]``
              tensor; ``factor`` defaults to 1).

``project`` and ``steer`` act on the last dimension and take an optional ``gate=``: a
:class:`~analysis.interventions.LinearGate` (they then apply only to the vectors on which its
linear probe fires) or a :class:`~analysis.interventions.PromptGate` (decided once per sequence
at the last prompt position; they then act from that position on, only on the sequences where
it fired). They compose after the other kinds of the same set.

Selectors and steps: ``site`` is a site string (wildcards expand, selectors restrict); position
selectors are **absolute sequence positions** (prefill positions 0..n-1, decode step ``k`` adds
position n+k-1; negative positions count from the end of the sequence so far, so ``[pos=-1]`` is
the newest token of every step). ``steps`` restricts the intervention to some forward calls
(default: every step; negative steps count from the last one).

Replay (:mod:`analysis.replay`) knows nothing of interventions: a session's ``run`` /
``run_batch`` / ``verify`` hand the sets to :meth:`Intervention.bind_sets`, which runs the donors
they need and compiles them into one vectorised :class:`~._plan.InterventionPlan` — an edit the
replay calls on every hooked site.

Example::

    from analysis.interventions import Intervention
    ivs = [Intervention("blocks.1.mlp.post[neuron=7]", "zero"),
           Intervention("blocks.0.attn.z[head=2]", "scale", factor=0.5),
           Intervention("blocks.2.resid_post[pos=-1]", "mean", donor=baseline)]
    result = session.run(ivs)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any, Literal

import torch

from analysis.replay import BoundEdit, ReplaySession
from integrations.errors import InterventionError
from integrations.incident import Incident

from ._direction import LinearGate, Subspace, check_vector
from ._donor_baseline import DonorBaseline
from ._donors import DonorCache
from ._gate import PromptGate
from ._plan import VECTOR_KINDS, InterventionPlan

__all__ = ["INTERVENTION_KINDS", "Intervention", "InterventionKind", "normalize_sets"]

InterventionKind = Literal["patch", "mean", "zero", "resample", "scale", "project", "steer"]
#: Every intervention kind (DESIGN §6, §14), as :data:`InterventionKind` spells them.
INTERVENTION_KINDS: tuple[str, ...] = ("patch", "mean", "zero", "resample", "scale", "project",
                                       "steer")


@dataclass(frozen=True, eq=False)
class Intervention:
    """An intervention on ``site`` (see the module doc for kinds, donors and positions).

    Example::

        Intervention("blocks.0.mlp", "zero")
        Intervention("blocks.0.mlp", "scale", factor=2.0, steps=(0,))
        Intervention("blocks.1.resid_post[pos=-1]", "patch", donor=benign_prompt_ids)
        Intervention("blocks.1.attn", "resample", donor=baseline, seed=3)
        Intervention("blocks.9.resid_post", "project", direction=Subspace.from_directions(d))
        Intervention("blocks.9.resid_post", "steer", direction=-d, factor=2.0)
    """

    site: str
    kind: InterventionKind
    _: KW_ONLY
    value: torch.Tensor | Mapping[int, torch.Tensor] | None = None
    donor: Any = None
    factor: float | None = None
    steps: tuple[int, ...] | None = None
    seed: int = 0
    direction: Subspace | torch.Tensor | None = None
    gate: LinearGate | PromptGate | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.site, str) or not self.site:
            raise InterventionError(f"intervention site must be a site string, got {self.site!r}")
        if self.kind not in INTERVENTION_KINDS:
            raise InterventionError(f"unknown intervention kind {self.kind!r}; use one of "
                                    f"{', '.join(INTERVENTION_KINDS)}")
        if self.steps is not None:
            object.__setattr__(self, "steps", tuple(int(s) for s in self.steps))
        k = self.kind
        self._check_vector_kind()
        if k == "steer":
            object.__setattr__(self, "factor", 1.0 if self.factor is None else float(self.factor))
        elif k == "scale":
            if self.factor is None:
                raise InterventionError(f"scale on {self.site!r} needs factor=, e.g. factor=0.5")
            object.__setattr__(self, "factor", float(self.factor))
        elif self.factor is not None:
            raise InterventionError(f"factor= is only for kinds 'scale' and 'steer' (got kind "
                                    f"{k!r})")
        if k in ("mean", "resample") and not isinstance(self.donor, DonorBaseline):
            raise InterventionError(
                f"{k} on {self.site!r} needs donor=DonorBaseline.from_incidents("
                f"benign_incidents, ...), got {type(self.donor).__name__}")
        if k == "patch":
            if (self.value is None) == (self.donor is None):
                raise InterventionError(
                    f"patch on {self.site!r} needs exactly one of value= (a tensor or "
                    "{step: tensor}) or donor= (an Incident or counterfactual prompt token ids)")
            if self.donor is not None and not isinstance(self.donor, Incident):
                object.__setattr__(self, "donor", _prompt_ids(self.donor, self.site))
        elif k in ("zero", "scale", *VECTOR_KINDS) and (self.donor is not None
                                                        or self.value is not None):
            raise InterventionError(f"{k} on {self.site!r} takes no value= or donor=")
        if self.value is not None and k != "patch":
            raise InterventionError(f"value= is only for kind 'patch' (got kind {k!r})")

    def _check_vector_kind(self) -> None:
        k = self.kind
        if k not in VECTOR_KINDS:
            if self.direction is not None or self.gate is not None:
                raise InterventionError(f"direction= and gate= are only for kinds 'project' and "
                                        f"'steer' (got kind {k!r})")
            return
        if k == "project" and not isinstance(self.direction, Subspace):
            raise InterventionError(f"project on {self.site!r} needs direction=Subspace("
                                    "...), e.g. Subspace.from_directions(d)")
        if k == "steer":
            if not isinstance(self.direction, torch.Tensor):
                raise InterventionError(f"steer on {self.site!r} needs direction= a [d] tensor")
            object.__setattr__(self, "direction",
                               check_vector(self.direction, what=f"steer direction of {self.site}"))
        if self.gate is not None and not isinstance(self.gate, LinearGate | PromptGate):
            raise InterventionError(f"gate= must be a LinearGate or a PromptGate, got "
                                    f"{type(self.gate).__name__}")
        if isinstance(self.gate, PromptGate) and "[" in self.site:
            raise InterventionError(f"{self.site!r}: an intervention gated by a PromptGate acts "
                                    "from the last prompt position on; give no selector")

    @property
    def vector_dim(self) -> int | None:
        """The last-dimension size a ``project`` / ``steer`` intervention acts on."""
        if isinstance(self.direction, Subspace):
            return self.direction.dim
        if isinstance(self.direction, torch.Tensor):
            return int(self.direction.numel())
        return None

    def transform(self, h: torch.Tensor) -> torch.Tensor:
        """``project`` / ``steer``: the selected vectors ``h`` ``[..., d]`` after the
        intervention (with a :class:`LinearGate`, vectors where it does not fire are returned
        unchanged; a :class:`PromptGate` is applied by the caller, see :mod:`._gate`)."""
        if h.shape[-1] != self.vector_dim:
            raise InterventionError(f"{self.label}: the direction has length {self.vector_dim} "
                                    f"but the selected vectors have {h.shape[-1]} entries")
        if isinstance(self.direction, Subspace):
            new = self.direction.apply(h)
        else:
            assert isinstance(self.direction, torch.Tensor) and self.factor is not None
            new = (h.float() + self.factor * self.direction.to(h.device)).to(h.dtype)
        if not isinstance(self.gate, LinearGate):
            return new
        return torch.where(self.gate.fires(h)[..., None], new, h)

    @property
    def label(self) -> str:
        """Short human-readable form, e.g. ``zero(blocks.0.mlp)``."""
        extra = f", factor={self.factor:g}" if self.kind in ("scale", "steer") and \
            self.factor is not None else ""
        if isinstance(self.direction, Subspace):
            extra += f", k={self.direction.k}, to={self.direction.to}"
        if isinstance(self.gate, PromptGate):
            extra += f", gated at {self.gate.site}"
        elif self.gate is not None:
            extra += ", gated"
        steps = f", steps={list(self.steps)}" if self.steps is not None else ""
        return f"{self.kind}({self.site}{extra}{steps})"

    @property
    def prompt_donor(self) -> torch.Tensor | None:
        """The counterfactual prompt ids ``[1, n]`` when the donor is a prompt."""
        return self.donor if isinstance(self.donor, torch.Tensor) else None

    @property
    def baseline(self) -> DonorBaseline | None:
        """The donor baseline of a ``mean``/``resample`` intervention."""
        return self.donor if isinstance(self.donor, DonorBaseline) else None

    @classmethod
    def bind_sets(cls, session: ReplaySession, sets: Sequence[Sequence[Intervention]], *,
                  batched: bool) -> BoundEdit:
        """Compile intervention sets into one edit for a replay of ``session`` (row block
        ``r`` = set ``r``; ``batched``: several sets share the forward, so touched rows are
        written in place). Donor forwards run first (counted on the session, cached per donor
        and site). Called by ``session.run`` / ``run_batch`` / ``verify``.

        Example::

            bound = Intervention.bind_sets(session, [[Intervention("blocks.0.mlp", "zero")]],
                                           batched=False)
            session.run_edited(bound.edit, sites=bound.sites)
        """
        checked = normalize_sets(sets)
        donors = DonorCache.of(session)
        donors.prepare(checked)
        plan = InterventionPlan(session.model, checked, rows_per_set=session.plan.batch,
                                lengths=[c.seq_len for c in session.plan.steps],
                                donor_fn=donors, resolve=session.resolve, inplace=batched)
        return BoundEdit(sites=tuple(plan.bound), edit=plan.apply)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description (donors by identity, not by value)."""
        donor: Any = None
        if isinstance(self.donor, Incident):
            donor = {"incident": self.donor.id}
        elif isinstance(self.donor, torch.Tensor):
            donor = {"prompt_ids": self.donor.reshape(-1).tolist()}
        elif self.donor is not None:
            donor = {"baseline": getattr(self.donor, "describe", lambda: "baseline")()}
        return {"site": self.site, "kind": self.kind, "factor": self.factor,
                "steps": None if self.steps is None else list(self.steps), "seed": self.seed,
                "donor": donor, "value": None if self.value is None else "explicit",
                "direction": (self.direction.describe() if isinstance(self.direction, Subspace)
                              else None if self.direction is None
                              else f"vector(d={self.direction.numel()})"),
                "gated": self.gate is not None}

    def __repr__(self) -> str:
        return f"Intervention({self.label})"


def _prompt_ids(donor: Any, site: str) -> torch.Tensor:
    if isinstance(donor, torch.Tensor):
        t = donor
    elif isinstance(donor, Sequence) and not isinstance(donor, (str, bytes)):
        t = torch.tensor(list(donor), dtype=torch.long)
    else:
        raise InterventionError(
            f"patch donor for {site!r} must be an Incident or counterfactual prompt token ids "
            f"(a list or int tensor), got {type(donor).__name__}; tokenize text first")
    if t.is_floating_point() or t.is_complex():
        raise InterventionError(f"patch donor prompt for {site!r} must be integer token ids")
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.shape[0] != 1 or t.shape[1] == 0:
        raise InterventionError(
            f"patch donor prompt for {site!r} must be token ids of shape [n] or [1, n], got "
            f"{tuple(t.shape)}")
    return t.detach().to("cpu", torch.long).clone()


def normalize_sets(sets: Sequence[Sequence[Intervention]]) -> list[list[Intervention]]:
    """Check a list of intervention sets (each a sequence of :class:`Intervention`)."""
    out: list[list[Intervention]] = []
    for i, s in enumerate(sets):
        if isinstance(s, Intervention):
            raise InterventionError(
                "run_batch() takes a list of intervention *sets* (lists); wrap single "
                "interventions: run_batch([[iv1], [iv2]])")
        items = list(s)
        for iv in items:
            if not isinstance(iv, Intervention):
                raise InterventionError(
                    f"set {i} holds {type(iv).__name__}; build Intervention(site, kind, ...)")
        out.append(items)
    return out
