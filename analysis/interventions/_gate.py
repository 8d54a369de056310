"""A gate decided once per sequence: act only on requests a probe recognises (DESIGN §14).

A :class:`PromptGate` reads a linear probe off one site's value at the *last prompt position*
of the forward call that feeds the prompt (the prefill: step 0 of a replay, or a live call with
more than one position), and its decision holds for that sequence's later decode calls. A
``project`` / ``steer`` intervention gated by it acts only on the rows where it fired, and
only from the last prompt position on: positions of the prompt before it are never changed,
and a request the probe does not recognise is not touched at all. The gate's site must come no
later in the forward pass than the site it gates (it is observed in the same forward).

:class:`GateTracker` holds the decisions during one run (a replay, or one ``with applied(...)``
block) for the plan and the live hooks.

Example::

    gate = PromptGate(site="blocks.12.resid_post", weight=w, bias=-thr)
    Intervention("blocks.16.resid_post", "project", direction=sub, gate=gate)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from integrations.errors import InterventionError

from ._direction import check_vector

__all__ = ["GateTracker", "PromptGate"]


@dataclass(frozen=True, eq=False)
class PromptGate:
    """Fires for a sequence when ``weight . h + bias > 0`` at the last prompt position of
    ``site`` (module doc)."""

    site: str
    weight: torch.Tensor   # [d]
    bias: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.site, str) or not self.site or "[" in self.site:
            raise InterventionError("PromptGate.site must be a site without selectors, e.g. "
                                    "'blocks.12.resid_post'")
        object.__setattr__(self, "weight", check_vector(self.weight, what="PromptGate.weight"))
        object.__setattr__(self, "bias", float(self.bias))

    def fires(self, last: torch.Tensor) -> torch.Tensor:
        """Boolean ``[batch]`` from the last prompt position's vectors ``[batch, d]``."""
        if last.shape[-1] != self.weight.numel():
            raise InterventionError(f"PromptGate weight has length {self.weight.numel()}, "
                                    f"{self.site} has {last.shape[-1]} entries")
        return (last.float() @ self.weight.to(last.device) + self.bias) > 0


class GateTracker:
    """The decisions of the prompt gates in one run (module doc)."""

    def __init__(self, gates: Iterable[PromptGate]) -> None:
        self._by_site: dict[str, list[PromptGate]] = {}
        for g in gates:
            if all(g is not x for x in self._by_site.get(g.site, [])):
                self._by_site.setdefault(g.site, []).append(g)
        self._fired: dict[int, torch.Tensor] = {}

    @property
    def sites(self) -> list[str]:
        return list(self._by_site)

    def observe(self, site: str, value: torch.Tensor, *, prefill: bool) -> None:
        """Decide the gates of ``site`` from its value when this call feeds the prompt."""
        if not prefill or value.dim() < 3:
            return
        for g in self._by_site.get(site, ()):
            self._fired[id(g)] = g.fires(value[:, -1])

    def fired(self, gate: PromptGate) -> torch.Tensor | None:
        """The last decision of ``gate`` (``[batch]``), or None before any prompt was seen."""
        return self._fired.get(id(gate))

    def apply(self, gate: PromptGate, sub: torch.Tensor, rows: slice | torch.Tensor, *,
              prefill: bool,
              transform: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``sub`` (the selected rows ``[r, pos, ...]``) with ``transform`` applied on the rows
        where ``gate`` fired, at the last position when ``prefill``, else at every position."""
        fired = self.fired(gate)
        if fired is None:
            return sub
        f = fired.to(sub.device)[rows]
        if not bool(f.any()):
            return sub
        new = sub.clone()
        idx = f.nonzero().reshape(-1)
        if prefill:
            new[idx, -1:] = transform(sub[idx, -1:])
        else:
            new[idx] = transform(sub[idx])
        return new
