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
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Fidelity", "TensorDiff", "compare"]


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
    per_site: dict[str, dict[str, Any]] = {}
    worst = 0.0
    exact = True
    steps: set[int] = set()
    for site, by_step in recorded_acts.items():
        got = replayed_acts.get(site, {})
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
        per_site[site] = {"max_abs_diff": s_diff, "exact": s_exact}
        exact &= s_exact
        worst = max(worst, s_diff)
    logits_info: dict[str, Any] | None = None
    agree = total = 0
    if recorded_logits:
        l_exact, l_diff = True, 0.0
        for step, rec in recorded_logits.items():
            steps.add(step)
            rep = replayed_logits[step] if step < len(replayed_logits) else None
            if rep is None:
                l_exact, l_diff = False, math.inf
                notes.append(f"logits step {step}: the replay produced none")
                continue
            d = compare(rep, rec)
            l_exact &= d.exact
            l_diff = max(l_diff, d.max_abs_diff)
            if rep.shape == rec.shape:
                rows = int(rec.shape[0]) if rec.dim() > 1 else 1
                # identical bits have identical argmax: skip the reduction on the exact path
                agree += rows if d.exact else int((rep.argmax(-1) == rec.argmax(-1)).sum())
                total += rows
        logits_info = {"max_abs_diff": l_diff, "exact": l_exact}
        exact &= l_exact
        worst = max(worst, l_diff)
    t_agree = t_total = 0
    for step, tok in next_tokens.items():
        rep = replayed_logits[step] if step < len(replayed_logits) else None
        if rep is None or rep.dim() != 2 or rep.shape[0] != tok.numel():
            continue
        steps.add(step)
        t_agree += int((rep.argmax(-1).cpu() == tok.reshape(-1)).sum())
        t_total += tok.numel()
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
    top1 = agree / total if total else token_agreement
    return Fidelity(exact=exact, max_abs_diff=worst, top1_agreement=top1, per_site=per_site,
                    steps_compared=len(steps), sites_compared=len(per_site), logits=logits_info,
                    token_agreement=token_agreement, compared=compared, mode=mode,
                    notes=tuple(notes))
