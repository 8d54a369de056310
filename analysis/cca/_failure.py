"""What "the failure" is, as a continuous metric at the decision step of a replay.

A :class:`Failure` is a specification; :meth:`Failure.bind` resolves it on one replay session
(which forward call decides, which token is the failing one) and returns a
:class:`BoundFailure` that turns replayed logits into the metric. **The failure occurs iff the
metric is > 0**; an intervention set *flips* the failure when the replayed metric is ``<= 0``.

Kinds:

``token(id, position=-1, expected=None)``  logit of ``id`` minus the largest other logit (or
    minus ``expected``'s logit) at the decision position: > 0 iff ``id`` is the top-1 (or beats
    ``expected``). ``position`` is an absolute sequence position whose next-token logits decide
    (``-1``: the newest position of the last forward call); ``step=`` picks a forward call
    directly (0 = prefill).
``text_contains(s, tokenizer=)``  the recorded output contains ``s``: the decision step is the
    forward call that produced the first token overlapping ``s``, and the metric is the
    ``token`` metric of that token there.
``label(k)``  classifier: logit of class ``k`` minus the largest other class logit.
``metric(fn)``  a callable ``fn(logits [batch, vocab]) -> [batch]`` at ``step`` (default the
    last); differentiable functions also drive the attribution ranking.
``from_incident(inc)``  the default: the flag reason mapped to a predicate
    (``prompt_injection`` -> ``text_contains("HACKED")`` when a tokenizer is given and the output
    contains it), else the recorded top-1 token (classifiers: label) at the flagged step.

Rows: an incident may carry several batch rows; the metric of a replay is the maximum over them
(the failure persists while any row fails).

Example::

    f = Failure.token(7)                               # "HACKED" is token 7
    bound = f.bind(session)
    bound.value(session.run().logits)                  # > 0: the incident fails
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from analysis.replay import ReplaySession
from integrations.errors import AnalysisError, TensorNotFoundError

__all__ = ["REASON_TEXT", "BoundFailure", "Failure", "FailureKind", "MetricFn", "decode", "failing",
           "generated_tokens"]

#: Flag reasons with a known failing text (used by :meth:`Failure.from_incident`).
REASON_TEXT: dict[str, str] = {"prompt_injection": "HACKED", "injection": "HACKED"}

FailureKind = Literal["token", "text", "label", "metric", "recorded"]
MetricFn = Callable[[torch.Tensor], Any]


@dataclass(frozen=True)
class Failure:
    """A failure predicate with a continuous metric (see the module doc). Build with the
    classmethods.

    Example::

        Failure.token(7, position=-1)
        Failure.text_contains("HACKED", tokenizer=tok)
        Failure.label(1)
        Failure.metric(lambda lg: lg[:, 7] - lg[:, 3])
    """

    kind: FailureKind
    token_id: int | None = None
    expected: int | None = None
    position: int = -1
    step: int | None = None
    text: str | None = None
    tokenizer: Any = None
    label_index: int | None = None
    fn: MetricFn | None = None
    name: str = ""

    # ------------------------------------------------------------------ constructors
    @classmethod
    def token(cls, token_id: int, position: int = -1, *, expected: int | None = None,
              step: int | None = None) -> Failure:
        """The failing token ``token_id`` is top-1 (or beats ``expected``) at ``position``."""
        return cls(kind="token", token_id=int(token_id), position=int(position),
                   expected=None if expected is None else int(expected),
                   step=None if step is None else int(step))

    @classmethod
    def text_contains(cls, text: str, *, tokenizer: Any = None) -> Failure:
        """The recorded output contains ``text`` (``tokenizer``: an object with ``decode`` or a
        callable ``ids -> str``; may also be given to :meth:`bind`)."""
        if not text:
            raise AnalysisError("text_contains needs a non-empty text, e.g. 'HACKED'")
        return cls(kind="text", text=text, tokenizer=tokenizer)

    @classmethod
    def label(cls, k: int) -> Failure:
        """A classifier predicts class ``k`` (metric: its logit margin)."""
        return cls(kind="label", label_index=int(k))

    @classmethod
    def metric(cls, fn: MetricFn, *, step: int = -1, name: str = "") -> Failure:
        """A custom metric ``fn(logits [batch, vocab]) -> [batch]`` (> 0 = failing) at ``step``."""
        if not callable(fn):
            raise AnalysisError(f"Failure.metric takes a callable, got {type(fn).__name__}")
        return cls(kind="metric", fn=fn, step=int(step), name=name or getattr(fn, "__name__", ""))

    @classmethod
    def recorded_top1(cls, *, step: int | None = None) -> Failure:
        """Whatever the recorded top-1 token (or class) is at ``step`` (default: flagged step)."""
        return cls(kind="recorded", step=step)

    @classmethod
    def from_incident(cls, incident: Any, *, tokenizer: Any = None) -> Failure:
        """The default predicate of an incident (module doc): its flag reason, else top-1."""
        m = incident.manifest
        trig = m.get("trigger") or {}
        reasons = [str(trig.get("reason") or ""), *(str(f) for f in trig.get("flags") or [])]
        for r in reasons:
            text = REASON_TEXT.get(r.lower())
            if text and tokenizer is not None and text in _output_text(incident, tokenizer):
                return cls.text_contains(text, tokenizer=tokenizer)
        step = trig.get("step")
        return cls.recorded_top1(step=int(step) if isinstance(step, int) else None)

    @classmethod
    def coerce(cls, failure: Failure | MetricFn | None, incident: Any, *,
               tokenizer: Any = None) -> Failure:
        """``failure`` as a :class:`Failure`: a callable becomes :meth:`metric`, None the
        incident's default (:meth:`from_incident`)."""
        if failure is None:
            return cls.from_incident(incident, tokenizer=tokenizer)
        if isinstance(failure, Failure):
            return failure
        if callable(failure):
            return cls.metric(failure)
        raise AnalysisError(f"failure= takes a Failure or a callable metric, got "
                            f"{type(failure).__name__}")

    def describe(self) -> str:
        """Short human-readable form."""
        if self.kind == "token":
            vs = f" vs token {self.expected}" if self.expected is not None else ""
            where = f"step {self.step}" if self.step is not None else f"position {self.position}"
            return f"token {self.token_id} top-1{vs} at {where}"
        if self.kind == "text":
            return f"output contains {self.text!r}"
        if self.kind == "label":
            return f"predicted label {self.label_index}"
        if self.kind == "recorded":
            return "recorded top-1 at the flagged step"
        return f"metric {self.name or 'custom'}"

    # ------------------------------------------------------------------ binding
    def bind(self, session: ReplaySession, *, tokenizer: Any = None,
             variant: bool = False) -> BoundFailure:
        """Resolve on ``session``: the decision step and the failing token.

        ``variant=True`` binds on a perturbed copy of the incident: an explicit step beyond its
        forward calls falls back to its last one.
        """
        n_steps = len(session.plan.steps)
        if self.kind == "token":
            assert self.token_id is not None
            step = _clamp(self.step, n_steps, variant=variant) if self.step is not None else \
                _step_of_position(session, self.position, variant=variant)
            return BoundFailure(step=step, token_id=self.token_id, expected=self.expected,
                                description=self.describe())
        if self.kind == "label":
            assert self.label_index is not None
            return BoundFailure(step=n_steps - 1, token_id=self.label_index,
                                description=self.describe())
        if self.kind == "metric":
            assert self.fn is not None
            return BoundFailure(step=self._step(n_steps, variant), fn=self.fn,
                                description=self.describe())
        if self.kind == "recorded":
            step = self._step(n_steps, variant)
            top = int(_recorded_logits(session, step).float().argmax(-1).reshape(-1)[0])
            what = "label" if _is_classifier(session.model) else "token"
            return BoundFailure(step=step, token_id=top,
                                description=f"recorded top-1 {what} {top} at step {step}")
        return self._bind_text(session, tokenizer if tokenizer is not None else self.tokenizer)

    def _step(self, n_steps: int, variant: bool) -> int:
        """The explicit step (default the last forward call), as an index."""
        return _clamp(self.step if self.step is not None else -1, n_steps, variant=variant)

    def _bind_text(self, session: ReplaySession, tok: Any) -> BoundFailure:
        """``text_contains``: the step that produced the first token of the text's first
        occurrence in the recorded output, and that token."""
        if tok is None:
            raise AnalysisError(f"Failure.text_contains({self.text!r}) needs a tokenizer to "
                                "find where the text was produced: pass tokenizer=")
        assert self.text is not None
        gen = generated_tokens(session)
        if not gen:
            raise AnalysisError(f"incident {session.incident.id!r} records no generated tokens "
                                f"(no decode steps, no output_ids): {self.text!r} cannot be "
                                "located; use Failure.token(id) instead")
        ids = [t for _, t in gen]
        end = next((j for j in range(len(ids)) if self.text in decode(tok, ids[:j + 1])), None)
        if end is None:
            raise AnalysisError(
                f"the recorded output of incident {session.incident.id!r} does not contain "
                f"{self.text!r} (output: {decode(tok, ids)!r}); choose another failure")
        # the first occurrence ends at token `end`; it starts at the last token whose suffix
        # (up to `end`) still contains the text
        start = max(i for i in range(end + 1) if self.text in decode(tok, ids[i:end + 1]))
        step, token = gen[start]
        return BoundFailure(step=step, token_id=token,
                            description=f"output contains {self.text!r}: token {token} "
                                        f"produced at step {step}")


@dataclass(frozen=True)
class BoundFailure:
    """A failure resolved on one session: ``step`` (index into a replay's ``logits`` list),
    the failing ``token_id`` (class for classifiers) and the metric (> 0 = failing).

    Example::

        bf = Failure.token(7).bind(session)
        bf.value(session.run().logits)     # float
    """

    step: int
    token_id: int | None = None
    expected: int | None = None
    fn: MetricFn | None = None
    description: str = ""

    def tensor(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-row metric ``[batch]`` from the decision step's logits ``[batch, vocab]``
        (differentiable; float32)."""
        lg = logits.float()
        if lg.dim() == 1:
            lg = lg.unsqueeze(0)
        if self.fn is not None:
            out = self.fn(lg)
            t = out if isinstance(out, torch.Tensor) else torch.tensor(float(out))
            return t.float().reshape(-1)
        assert self.token_id is not None
        if not 0 <= self.token_id < lg.shape[-1]:
            raise AnalysisError(f"failing token/class {self.token_id} is outside the logits' "
                                f"{lg.shape[-1]} entries")
        target = lg[:, self.token_id]
        if self.expected is not None:
            return target - lg[:, self.expected]
        others = lg.clone() if not lg.requires_grad else lg + 0.0
        mask = torch.zeros_like(others, dtype=torch.bool)
        mask[:, self.token_id] = True
        best_other = others.masked_fill(mask, float("-inf")).max(-1).values
        return target - best_other

    def value(self, logits: Sequence[torch.Tensor | None]) -> float:
        """The metric of one replay (``ReplayResult.logits``): max over batch rows."""
        if not -len(logits) <= self.step < len(logits):
            raise AnalysisError(f"the replay has {len(logits)} steps of logits; the decision "
                                f"step is {self.step}")
        lg = logits[self.step]
        if lg is None:
            raise AnalysisError("the model produced no logits at the decision step; give a "
                                "Failure.metric over another output")
        with torch.no_grad():
            return float(self.tensor(lg).max())


def failing(metric: float) -> bool:
    """The failure occurs iff the metric is > 0."""
    return metric > 0.0


def _clamp(s: int, n_steps: int, *, variant: bool) -> int:
    """Step ``s`` (negative from the end) as an index into the incident's forward calls."""
    s = s if s >= 0 else n_steps + s
    if not 0 <= s < n_steps:
        if variant:
            return n_steps - 1
        raise AnalysisError(f"step {s} is outside the incident's {n_steps} forward "
                            "calls (0 = prefill)")
    return s


def _is_classifier(model: Any) -> bool:
    return type(model).__name__.endswith(("ForSequenceClassification",
                                          "ForTokenClassification"))


def decode(tok: Any, ids: list[int]) -> str:
    """``ids`` as text with ``tok`` (an object with ``decode``, or a callable ``ids -> str``)."""
    dec = getattr(tok, "decode", None)
    out = dec(ids) if callable(dec) else tok(ids)
    return str(out)


def _step_of_position(session: ReplaySession, position: int, *, variant: bool) -> int:
    """The forward call whose newest position is ``position`` (absolute; negative from end)."""
    steps = session.plan.steps
    lengths = [c.seq_len for c in steps]
    offsets = [sum(lengths[:k]) for k in range(len(lengths))]
    last = [offsets[k] + steps[k].seq_len - 1 for k in range(len(steps))]
    total = last[-1] + 1
    p = position if position >= 0 else total + position
    if p in last:
        return last.index(p)
    if variant:
        return len(steps) - 1
    raise AnalysisError(
        f"position {position} has no recorded next-token logits: a replay keeps the newest "
        f"position of each forward call, i.e. positions {last} (use one of them or step=)")


def _recorded_logits(session: ReplaySession, step: int) -> torch.Tensor:
    try:
        return session.incident.tensor("logits", step=step, kind="logits")
    except TensorNotFoundError:
        lg = session.run().logits[step]
        if lg is None:
            raise AnalysisError("the model produces no logits; give failure=Failure.metric(...)"
                                ) from None
        return lg


def generated_tokens(session: ReplaySession) -> list[tuple[int, int]]:
    """``[(step, token)]``: the token each forward call produced (row 0), from the recorded
    inputs of the next call and, for the last call, the recorded ``output_ids``."""
    steps = session.plan.steps
    out: list[tuple[int, int]] = []
    for k in range(len(steps) - 1):
        ids = steps[k + 1].tensors.get("input_ids")
        if ids is not None and ids.dim() == 2 and ids.shape[1] == 1:
            out.append((k, int(ids[0, 0])))
    full = _output_ids(session.incident)
    if full is None:
        return out
    first = steps[0].tensors.get("input_ids")
    if first is not None and full.dim() == 2 and full.shape[1] == first.shape[1] + len(steps):
        out.append((len(steps) - 1, int(full[0, -1])))
    return out


def _output_ids(incident: Any) -> torch.Tensor | None:
    try:
        st = incident.steps("output_ids", kind="output")
        t: torch.Tensor = incident.tensor("output_ids", step=st[-1], kind="output")
    except TensorNotFoundError:
        return None
    return t


def _output_text(incident: Any, tokenizer: Any) -> str:
    full = _output_ids(incident)
    if full is None:
        return ""
    return decode(tokenizer, [int(x) for x in full.reshape(-1).tolist()])
