"""Replay fidelity: how closely a replay reproduced what the incident recorded (measured).

Compared on every replay (DESIGN §6): each recorded activation (per site, per step) and the
recorded last-position logits, bit for bit (``exact``) and as the largest absolute difference;
the top-1 agreement of the replayed logits with the recorded logits — or, for incidents recorded
without logits (``activations: "replay"``), with the recorded next tokens (the ``input_ids`` of the
following step; the last token of ``output_ids`` for the last step).

Example::

    fid = session.fidelity()
    fid.exact, fid.max_abs_diff, fid.top1_agreement      # True, 0.0, 1.0 on CPU
    fid.per_site["blocks.0.resid_post"]                  # {'max_abs_diff': 0.0, 'exact': True}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from integrations.errors import TensorNotFoundError
from integrations.incident import Incident

from ._calls import CallPlan

__all__ = ["Fidelity", "FidelityMeter", "TensorDiff", "compare", "measure", "recorded_logits",
           "recorded_next_tokens"]


@dataclass(frozen=True)
class TensorDiff:
    """One comparison: bit-exact or not, and the largest absolute difference."""

    exact: bool
    max_abs_diff: float


def compare(replayed: torch.Tensor, recorded: torch.Tensor) -> TensorDiff:
    """Bitwise equality (same dtype, shape and bits) and the max absolute difference.

    A shape or dtype mismatch is never exact; a shape mismatch has ``max_abs_diff = inf``.
    NaNs at the same places with the same bits count as equal.
    """
    a, b = replayed.detach().cpu(), recorded.detach().cpu()
    if a.shape != b.shape:
        return TensorDiff(False, math.inf)
    if a.numel() == 0:
        return TensorDiff(a.dtype == b.dtype, 0.0)
    same_bits = a.dtype == b.dtype and _bits_equal(a, b)
    if same_bits:
        return TensorDiff(True, 0.0)
    if a.is_floating_point() or b.is_floating_point():
        a64, b64 = a.double(), b.double()
        d = (a64 - b64).abs()
        both_nan = a64.isnan() & b64.isnan()
        d = torch.where(both_nan, torch.zeros_like(d), d.nan_to_num(nan=math.inf))
        diff = float(d.max())
    else:
        diff = float((a.long() - b.long()).abs().max())
    return TensorDiff(False, diff)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_floating_point() or a.is_complex():
        size = a.element_size()
        as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}.get(size)
        if as_int is None or a.is_complex():
            return bool(torch.equal(a, b))
        return bool(torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int)))
    return bool(torch.equal(a, b))


@dataclass(frozen=True)
class Fidelity:
    """The measured fidelity of one replay against its incident.

    ``exact``: everything compared was bit-identical (and something was compared);
    ``max_abs_diff``: over every compared activation and logit (0.0 when only tokens were
    compared); ``top1_agreement``: fraction of (step, row) pairs whose replayed argmax equals the
    recorded one (logits, else recorded next tokens; ``None`` when neither exists);
    ``per_site``: ``{site: {"max_abs_diff", "exact"}}`` for recorded activations;
    ``logits``: the same for the recorded logits (``None`` when not recorded);
    ``token_agreement``: replayed argmax vs recorded next tokens (greedy incidents);
    ``compared``: what was compared (``activations``, ``logits``, ``tokens``);
    ``mode``: the replay call mode; ``notes``: anything a reader must know.
    """

    exact: bool
    max_abs_diff: float
    top1_agreement: float | None
    per_site: dict[str, dict[str, Any]]
    steps_compared: int
    sites_compared: int
    logits: dict[str, Any] | None = None
    token_agreement: float | None = None
    compared: tuple[str, ...] = ()
    mode: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (non-finite numbers become ``None``), as stored in manifests."""
        def num(x: float | None) -> float | None:
            return x if x is None or math.isfinite(x) else None

        return {
            "exact": self.exact,
            "max_abs_diff": num(self.max_abs_diff),
            "top1_agreement": self.top1_agreement,
            "per_site": {s: {"max_abs_diff": num(v["max_abs_diff"]), "exact": v["exact"]}
                         for s, v in self.per_site.items()},
            "steps_compared": self.steps_compared,
            "sites_compared": self.sites_compared,
            "logits": None if self.logits is None else {
                "max_abs_diff": num(self.logits["max_abs_diff"]),
                "exact": self.logits["exact"]},
            "token_agreement": self.token_agreement,
            "compared": list(self.compared),
            "mode": self.mode,
            "notes": list(self.notes),
        }


def measure(
    *,
    recorded_acts: dict[str, dict[int, torch.Tensor]],
    replayed_acts: dict[str, dict[int, torch.Tensor]],
    recorded_logits: dict[int, torch.Tensor],
    replayed_logits: list[torch.Tensor | None],
    next_tokens: dict[int, torch.Tensor],
    sampled: bool,
    mode: str,
    notes: list[str],
) -> Fidelity:
    """Build a :class:`Fidelity` from recorded vs replayed values (see the class doc)."""
    steps: set[int] = set()
    acts = _compare_activations(recorded_acts, replayed_acts, steps, notes)
    logits = _compare_logits(recorded_logits, replayed_logits, steps, notes)
    t_agree, t_total = _token_agreement(next_tokens, replayed_logits, steps)
    exact = acts.exact and logits.exact
    token_agreement = t_agree / t_total if t_total else None
    compared = tuple(name for name, on in (("activations", bool(recorded_acts)),
                                           ("logits", bool(recorded_logits)),
                                           ("tokens", t_total > 0)) if on)
    if token_agreement is not None and not sampled:
        exact &= token_agreement == 1.0
    elif token_agreement is not None and sampled:
        notes.append("generation was sampled: the recorded tokens need not be the argmax, so "
                     "token agreement is reported but not part of `exact`")
    if not recorded_acts and not recorded_logits and (t_total == 0 or sampled):
        exact = False
        notes.append("nothing bitwise comparable was recorded (no activations, no logits)")
    top1 = logits.agree / logits.total if logits.total else token_agreement
    return Fidelity(exact=exact, max_abs_diff=max(acts.max_abs_diff, logits.max_abs_diff),
                    top1_agreement=top1, per_site=acts.per_site, steps_compared=len(steps),
                    sites_compared=len(acts.per_site), logits=logits.info,
                    token_agreement=token_agreement, compared=compared, mode=mode,
                    notes=tuple(notes))


@dataclass
class _Comparison:
    """What one kind of recorded value (activations or logits) contributed to a fidelity."""

    exact: bool = True
    max_abs_diff: float = 0.0
    per_site: dict[str, dict[str, Any]] = field(default_factory=dict)
    info: dict[str, Any] | None = None  # logits: {"max_abs_diff", "exact"}
    agree: int = 0  # logits: (step, row) pairs whose argmax agrees
    total: int = 0


def _compare_activations(recorded: dict[str, dict[int, torch.Tensor]],
                         replayed: dict[str, dict[int, torch.Tensor]], steps: set[int],
                         notes: list[str]) -> _Comparison:
    out = _Comparison()
    for site, by_step in recorded.items():
        got = replayed.get(site, {})
        s_exact, s_diff = True, 0.0
        for step, rec in by_step.items():
            steps.add(step)
            rep = got.get(step)
            if rep is None:
                d = TensorDiff(False, math.inf)
                notes.append(f"{site} step {step}: not produced by the replay")
            else:
                d = compare(rep, rec)
            s_exact &= d.exact
            s_diff = max(s_diff, d.max_abs_diff)
        out.per_site[site] = {"max_abs_diff": s_diff, "exact": s_exact}
        out.exact &= s_exact
        out.max_abs_diff = max(out.max_abs_diff, s_diff)
    return out


def _compare_logits(recorded: dict[int, torch.Tensor], replayed: list[torch.Tensor | None],
                    steps: set[int], notes: list[str]) -> _Comparison:
    out = _Comparison()
    if not recorded:
        return out
    for step, rec in recorded.items():
        steps.add(step)
        rep = replayed[step] if step < len(replayed) else None
        if rep is None:
            out.exact, out.max_abs_diff = False, math.inf
            notes.append(f"logits step {step}: the replay produced none")
            continue
        d = compare(rep, rec)
        out.exact &= d.exact
        out.max_abs_diff = max(out.max_abs_diff, d.max_abs_diff)
        if rep.shape == rec.shape:
            rows = int(rec.shape[0]) if rec.dim() > 1 else 1
            # identical bits have identical argmax: skip the reduction on the exact path
            out.agree += rows if d.exact else int((rep.argmax(-1) == rec.argmax(-1)).sum())
            out.total += rows
    out.info = {"max_abs_diff": out.max_abs_diff, "exact": out.exact}
    return out


def _token_agreement(next_tokens: dict[int, torch.Tensor], replayed: list[torch.Tensor | None],
                     steps: set[int]) -> tuple[int, int]:
    """(agreeing, compared) (step, row) pairs of replayed argmax vs recorded next tokens."""
    agree = total = 0
    for step, tok in next_tokens.items():
        rep = replayed[step] if step < len(replayed) else None
        if rep is None or rep.dim() != 2 or rep.shape[0] != tok.numel():
            continue
        steps.add(step)
        agree += int((rep.argmax(-1).cpu() == tok.reshape(-1)).sum())
        total += tok.numel()
    return agree, total


def recorded_logits(incident: Incident) -> dict[int, torch.Tensor]:
    """The recorded last-position logits per step (``kind="logits"`` rows of site ``logits``)."""
    return {r.step: r.tensor for r in incident.records(kind="logits") if r.site == "logits"}


def recorded_next_tokens(incident: Incident, plan: CallPlan) -> dict[int, torch.Tensor]:
    """Recorded next token per step: the next step's input_ids; output_ids for the last."""
    out: dict[int, torch.Tensor] = {}
    steps = plan.steps
    for k in range(len(steps) - 1):
        ids = steps[k + 1].tensors.get("input_ids")
        if ids is not None and ids.dim() == 2 and ids.shape[1] == 1:
            out[k] = ids[:, 0]
    try:
        full = incident.tensor("output_ids", step=len(steps) - 1, kind="output")
    except TensorNotFoundError:
        return out
    first = steps[0].tensors.get("input_ids")
    if first is not None and full.dim() == 2 and \
            full.shape[1] == first.shape[1] + len(steps) and steps[0].seq_len > 0:
        out[len(steps) - 1] = full[:, -1]
    return out


class FidelityMeter:
    """Measures replays of one incident against what it recorded (read once, on first use).

    ``overridden``: the replay model's fingerprint differs from the recorded one (noted in
    every fidelity).

    Example::

        meter = FidelityMeter(inc, plan, overridden=False)
        fid = meter.measure(replayed_acts, replayed_logits, mode="generate", sites=sites)
    """

    def __init__(self, incident: Incident, plan: CallPlan, *, overridden: bool) -> None:
        self.incident = incident
        self._plan = plan
        self._overridden = overridden
        self._sampled = bool((incident.manifest.get("generation") or {}).get("do_sample"))
        self._expected: tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]] | None = None

    def measure(self, replayed_acts: dict[str, list[torch.Tensor]],
                replayed_logits: list[torch.Tensor | None], *, mode: str,
                sites: Sequence[str], notes: Sequence[str] = ()) -> Fidelity:
        """The fidelity of a replay's activations of ``sites`` and logits (see :func:`measure`)."""
        inc = self.incident
        rec_acts = {s: {st: inc.tensor(s, step=st, kind="activation")
                        for st in inc.steps(s, kind="activation")} for s in sites}
        rep_acts = {s: dict(enumerate(v)) for s, v in replayed_acts.items()}
        if self._expected is None:
            self._expected = (recorded_logits(inc), recorded_next_tokens(inc, self._plan))
        rec_logits, next_tokens = self._expected
        out = list(notes)
        if self._overridden:
            out.append("fingerprint mismatch overridden: the replay model's weights differ "
                       "from the recorded model's")
        return measure(recorded_acts=rec_acts, replayed_acts=rep_acts,
                       recorded_logits=rec_logits, replayed_logits=replayed_logits,
                       next_tokens=next_tokens, sampled=self._sampled, mode=mode, notes=out)

    def measure_recorded(self, replayed_acts: dict[str, list[torch.Tensor]],
                         replayed_logits: list[torch.Tensor | None], *, mode: str) -> Fidelity:
        """:meth:`measure` over the replayed sites the incident recorded."""
        recorded = set(self.incident.sites())
        return self.measure(replayed_acts, replayed_logits, mode=mode,
                            sites=[s for s in replayed_acts if s in recorded])
