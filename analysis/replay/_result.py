"""What one replay produced: logits per step, tokens, optional activations.

A result is generic in the edit specifications it was run with (``ReplayResult[Intervention]``
from ``session.run([Intervention(...)])``); :meth:`~ReplaySession.run_edited` results carry none.

Example::

    r = session.run([Intervention("blocks.0.mlp", "zero")], capture=["blocks.1.mlp"])
    r.logits[-1]                 # [batch, vocab]: last-position logits of the last step
    r.predicted[-1]              # [batch]: their argmax
    r.activations["blocks.1.mlp"][0]   # [batch, pos, d_model] at the prefill step
    r.input_ids[1]               # [batch, 1]: the token fed at step 1 (teacher-forced)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

import torch

from integrations.errors import ReplayError

from ._fidelity import Fidelity

__all__ = ["ReplayResult"]

#: The edit specifications a result was replayed with (``Intervention`` for interventions).
S = TypeVar("S")


@dataclass
class ReplayResult(Generic[S]):
    """The outcome of one replay, e.g. of one intervention set (see the module doc).

    ``logits[k]``: last-position logits of step ``k`` (``[batch, vocab]``; classifiers
    ``[batch, n_labels]``; ``None`` for models without logits); ``predicted[k]``: their argmax;
    ``input_ids[k]``: the ids fed at step ``k`` (recorded ones when teacher-forced, the previous
    argmax in ``greedy`` mode); ``activations``: ``{site: [tensor per step]}`` for the sites
    asked with ``capture=`` (after interventions); ``batch_size``: how many candidate sets shared
    the forward passes (1 = the incident's own shapes, a verified result); ``fidelity``: measured
    against the incident when no intervention was applied; ``interventions``: the set replayed.
    """

    logits: list[torch.Tensor | None]
    input_ids: list[torch.Tensor | None]
    activations: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    interventions: tuple[S, ...] = ()
    mode: Literal["teacher_forced", "greedy"] = "teacher_forced"
    batch_size: int = 1
    fidelity: Fidelity | None = None

    @property
    def verified(self) -> bool:
        """True when computed at the incident's own shapes (batch of one candidate set)."""
        return self.batch_size == 1

    @property
    def predicted(self) -> list[torch.Tensor | None]:
        """Argmax of each step's logits, ``[batch]`` per step."""
        return [None if lg is None else lg.argmax(-1) for lg in self.logits]

    @property
    def steps(self) -> int:
        """Forward calls replayed."""
        return len(self.logits)

    def rows(self, start: int, stop: int) -> ReplayResult[S]:
        """The batch rows ``start:stop`` of every tensor (one set's block of a batched replay)."""
        sl = slice(start, stop)
        return ReplayResult(
            logits=[None if lg is None else lg[sl] for lg in self.logits],
            input_ids=[None if t is None else t[sl] for t in self.input_ids],
            activations={s: [t[sl] for t in v] for s, v in self.activations.items()},
            interventions=self.interventions, mode=self.mode, batch_size=self.batch_size,
            fidelity=self.fidelity)

    def tokens(self) -> torch.Tensor:
        """Predicted next tokens of every step, ``[batch, steps]`` (the continuation)."""
        preds = self.predicted
        if any(p is None for p in preds):
            raise ReplayError("the model produced no logits; there are no predicted tokens")
        return torch.stack([p for p in preds if p is not None], dim=-1)

    def logprobs(self, step: int = -1) -> torch.Tensor:
        """Log-softmax of the last-position logits at ``step`` (float32), ``[batch, vocab]``."""
        lg = self.logits[step]
        if lg is None:
            raise ReplayError("the model produced no logits at this step")
        return torch.log_softmax(lg.float(), dim=-1)
