"""The forward calls of a replay: the incident's recorded calls, reproduced argument for argument.

An incident stores the tensor keyword arguments of every top-level forward call (``kind="input"``
rows per step: ``input_ids``, ``attention_mask``, ``position_ids``, ``token_type_ids``,
``cache_position``, ``inputs_embeds``). Two call modes reproduce how they were made:

``generate``  what ``transformers`` 5.x ``generate()`` passes on every step: a
              ``DynamicCache(config=<text config>)`` shared by the steps (keyword ``cache``, or
              ``past_key_values`` on models whose forward still takes that), ``use_cache=True``,
              ``logits_to_keep=1`` (when the forward accepts it — it changes the unembedding's
              floating-point sums) and ``return_dict=True``, plus the recorded tensors of the step.
              Decode steps are therefore KV-cached calls with one new position each, teacher-
              forced on the recorded ``input_ids``.
``forward``   a plain ``model(**recorded tensors)`` call (encoders, classifiers, single forwards).

An episode (several model calls in one incident: an agent loop, a conversation; the manifest's
``episode``, :mod:`integrations.incident._episode`) is replayed call for call as it was served: a
new KV cache at every model call that started with an empty one (``resets``), the cache carried
where the turn carried it; greedy continuations never cross a model call's start (``starts``).

Example::

    plan = CallPlan.from_incident(inc, model)
    cache = plan.new_cache(model)
    for call in plan.steps:
        out = model(**plan.kwargs(call, repeat=1, cache=cache))
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from integrations.errors import ReplayError
from integrations.incident import Episode, Incident

__all__ = ["CallMode", "CallPlan", "StepCall", "last_logits", "to_device"]

CallMode = Literal["generate", "forward"]
#: Recorded inputs without a batch dimension (never replicated along the batch).
_UNBATCHED = frozenset({"cache_position"})


@dataclass(frozen=True)
class StepCall:
    """The recorded tensor kwargs of one forward call (step 0 = prefill)."""

    step: int
    tensors: Mapping[str, torch.Tensor]

    @property
    def batch(self) -> int:
        t = self.tensors.get("input_ids", self.tensors.get("inputs_embeds"))
        assert t is not None
        return int(t.shape[0])

    @property
    def seq_len(self) -> int:
        t = self.tensors.get("input_ids", self.tensors.get("inputs_embeds"))
        assert t is not None
        return int(t.shape[1]) if t.dim() > 1 else 1


@dataclass(frozen=True)
class CallPlan:
    """Every forward call of an incident and how to make it on a given model."""

    mode: CallMode
    steps: tuple[StepCall, ...]
    cache_arg: str | None
    logits_to_keep: bool
    #: forward calls that start with a new (empty) KV cache / that start a model call
    resets: frozenset[int] = frozenset({0})
    starts: frozenset[int] = frozenset({0})

    @property
    def episode(self) -> bool:
        """True when the incident holds several model calls (an agent loop, a conversation)."""
        return len(self.starts) > 1

    @property
    def batch(self) -> int:
        """Batch rows of the incident's own calls."""
        return self.steps[0].batch

    @classmethod
    def from_incident(cls, incident: Incident, model: torch.nn.Module, *,
                      mode: CallMode | None = None) -> CallPlan:
        """Collect the recorded calls; ``mode=None`` infers it (several steps => generate)."""
        by_step: dict[int, dict[str, torch.Tensor]] = {}
        for r in incident.records(kind="input"):
            by_step.setdefault(r.step, {})[r.site] = r.tensor
        if not by_step:
            raise ReplayError(
                f"incident {incident.id!r} has no recorded inputs (kind='input' rows), so it "
                "cannot be replayed; record it with integrations.Recorder")
        steps = sorted(by_step)
        if steps != list(range(len(steps))):
            raise ReplayError(
                f"incident {incident.id!r} has inputs for steps {steps}; a replay needs every "
                "forward call from step 0 on (the recorder stores each one)")
        calls = []
        for s in steps:
            t = by_step[s]
            if "input_ids" not in t and "inputs_embeds" not in t:
                raise ReplayError(f"incident {incident.id!r} step {s} has neither input_ids nor "
                                  "inputs_embeds recorded; it cannot be replayed")
            calls.append(StepCall(s, t))
        params = _forward_params(model)
        cache_arg = "cache" if "cache" in params else (
            "past_key_values" if "past_key_values" in params else None)
        ep = Episode.from_manifest(incident.manifest, forward_steps=len(calls))
        resets, starts = ep.cache_resets(), ep.starts()
        independent = len(resets) == len(calls)  # every call on its own (no KV cache shared)
        if mode is None:
            mode = "generate" if (len(calls) > 1 and not independent) or \
                incident.manifest.get("generation") else "forward"
        if mode == "forward" and not independent:
            raise ReplayError(
                f"incident {incident.id!r} has {len(calls)} forward calls (a KV-cached "
                "generation); it can only be replayed in 'generate' mode")
        if mode == "generate" and cache_arg is None:
            if len(calls) > 1:
                raise ReplayError(
                    f"incident {incident.id!r} has {len(calls)} KV-cached forward calls but "
                    f"{type(model).__name__}.forward takes no cache argument: replay it with the "
                    "model class that served it")
            mode = "forward"
        return cls(mode=mode, steps=tuple(calls), cache_arg=cache_arg,
                   logits_to_keep="logits_to_keep" in params, resets=resets, starts=starts)

    def with_mode(self, mode: CallMode) -> CallPlan:
        return dataclasses.replace(self, mode=mode)

    def with_prompt(self, ids: torch.Tensor) -> CallPlan:
        """The same forward calls for another prompt ``ids`` (``[n]`` or ``[batch, n]``): the
        prefill feeds ``ids``, each decode call the incident's recorded token (teacher-forced;
        replay with ``greedy=True`` for a free continuation), with attention mask, position ids
        and token types rebuilt for the new length. Counterfactual prompts (donors, input
        attribution) run this way.

        Example::

            plan = session.plan.with_prompt(torch.tensor([ids_without_span]))
            session.run_edited(plan=plan, greedy=True)
        """
        if self.episode:
            raise ReplayError(
                "a counterfactual prompt replaces the prompt of one model call; this incident is "
                f"an episode of {len(self.starts)} model calls: re-run the episode instead "
                "(analysis.replay.rerun_episode)")
        ids = ids if ids.dim() == 2 else ids[None, :]
        b = self.batch
        if ids.shape[0] not in (1, b):
            raise ReplayError(f"a prompt of batch {ids.shape[0]} for an incident of batch {b}")
        ids = ids.expand(b, -1).to(torch.long)
        n = int(ids.shape[1])
        first = self.steps[0].tensors
        calls: list[StepCall] = []
        for call in self.steps:
            t: dict[str, torch.Tensor] = {}
            if call.step == 0:
                t["input_ids"] = ids
                length, start = n, 0
            else:
                rec = call.tensors.get("input_ids")
                if rec is None:
                    raise ReplayError("another prompt needs the incident's decode input_ids")
                t["input_ids"] = rec
                length, start = int(rec.shape[1]), n + call.step - 1
            if "attention_mask" in first:
                t["attention_mask"] = torch.ones(b, start + length,
                                                 dtype=first["attention_mask"].dtype)
            if "position_ids" in first:
                t["position_ids"] = torch.arange(start, start + length).repeat(b, 1)
            if "token_type_ids" in first:
                t["token_type_ids"] = torch.zeros(b, length, dtype=first["token_type_ids"].dtype)
            calls.append(StepCall(call.step, t))
        return dataclasses.replace(self, steps=tuple(calls))

    def new_cache(self, model: torch.nn.Module) -> Any:
        """A fresh cache as ``generate`` builds it (None in ``forward`` mode)."""
        if self.mode != "generate":
            return None
        from transformers import DynamicCache

        cfg = getattr(model, "config", None)
        get_text = getattr(cfg, "get_text_config", None)
        text_cfg = get_text(decoder=True) if callable(get_text) else cfg
        return DynamicCache(config=text_cfg)

    def kwargs(self, call: StepCall, *, repeat: int, cache: Any,
               input_ids: torch.Tensor | None = None) -> dict[str, Any]:
        """Forward kwargs of ``call``, its batch replicated ``repeat`` times (set-major rows).

        ``input_ids`` replaces the recorded ids of the step (greedy continuation).
        """
        kw: dict[str, Any] = {}
        for name, t in call.tensors.items():
            if repeat > 1 and name not in _UNBATCHED:
                t = t.repeat(repeat, *([1] * (t.dim() - 1)))
            kw[name] = t
        if input_ids is not None:
            kw["input_ids"] = input_ids
        if self.mode == "generate":
            assert self.cache_arg is not None
            kw[self.cache_arg] = cache
            kw["use_cache"] = True
            if self.logits_to_keep:
                kw["logits_to_keep"] = 1
            kw["return_dict"] = True
        return kw

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "mode": self.mode, "steps": len(self.steps), "cache_arg": self.cache_arg,
            "logits_to_keep": 1 if (self.mode == "generate" and self.logits_to_keep) else None}
        if self.episode:
            d["model_calls"] = sorted(self.starts)
            d["cache_resets"] = sorted(self.resets)
        return d


def _forward_params(model: torch.nn.Module) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover - builtin forwards
        return frozenset()


def to_device(kw: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move the tensors of ``kw`` to ``device`` (no-op on the same device)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) and v.device != device else v
            for k, v in kw.items()}


def last_logits(output: Any) -> torch.Tensor | None:
    """Last-position logits of a model output (``[batch, vocab]``; classifiers as they are)."""
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0] if isinstance(output[0], torch.Tensor) else None
    if not isinstance(logits, torch.Tensor):
        return None
    return logits[:, -1, :] if logits.dim() == 3 else logits
