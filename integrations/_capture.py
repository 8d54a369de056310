"""The recorder's hooks: what runs on the serving thread, inside the model's forward calls.

A model-level pre-hook counts forward calls (step 0 = prefill, one step per ``generate()``
forward), decides each request's pre-trigger at its first forward and keeps the request's
inputs; the site hooks copy the selected activations of capturing requests; a model-level hook
keeps the last-position logits. Copies go to the request's state, bounded by the byte cap.
Nothing here raises into the model call: a failure marks the batch's requests (their incidents
are dropped and counted as ``capture_error``).

Example::

    hooks = CaptureHooks(owner=rec, trigger=triggers.Always(), capture_logits=True,
                         max_bytes=50 * 2**20)
    hooks.install(model, resolve_sites(model, ["blocks.*.resid_post"]))
    ...                                   # forwards inside rec.request(...) are captured
    hooks.remove()
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._request import RequestContext, RequestState, _current
from .external import active_sandbox
from .incident import TensorRecord

if TYPE_CHECKING:
    import torch

    from .sites import BoundSite
    from .triggers import Trigger

__all__ = ["CaptureHooks"]

_log = logging.getLogger(__name__)

#: Top-level forward kwargs recorded as ``kind="input"`` rows (everything replay needs).
_INPUT_NAMES = ("input_ids", "attention_mask", "position_ids", "token_type_ids",
                "cache_position", "inputs_embeds")
#: Inputs without a batch dimension (stored whole for every request of a batch).
_UNBATCHED = frozenset({"cache_position"})


class CaptureHooks:
    """The hooks of one recorder (``owner``): select, copy, keep — never more.

    ``ambient`` is a request context used when the caller is in no request context at all (the
    seed facade's capture of every forward); it never applies inside a replay sandbox.
    """

    def __init__(self, *, owner: object, trigger: Trigger, capture_logits: bool,
                 max_bytes: int, flight_bytes: int = 0) -> None:
        self.owner = owner
        self.trigger = trigger
        self.capture_logits = capture_logits
        self.max_bytes = max_bytes
        self.flight_bytes = flight_bytes
        self.ambient: RequestContext | None = None
        self._handles: list[Any] = []
        self._attach: contextlib.AbstractContextManager[Any] | None = None

    # ------------------------------------------------------------------ install
    def install(self, model: torch.nn.Module, bound: Sequence[BoundSite]) -> None:
        """Hook ``bound`` sites and the model's forward (undone by :meth:`remove`)."""
        from .sites import attach

        self._attach = attach(model, list(bound), self._on_site)
        self._attach.__enter__()
        try:
            self._handles.append(model.register_forward_pre_hook(
                self._on_forward_pre, with_kwargs=True))
            self._handles.append(model.register_forward_hook(
                self._on_forward, with_kwargs=True))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._attach is not None:
            self._attach.__exit__(None, None, None)
            self._attach = None

    # -------------------------------------------------------------------- hooks
    def _active(self) -> RequestContext | None:
        act = _current.get()
        if act is None and self.ambient is not None and active_sandbox() is None:
            act = self.ambient  # never record a deterministic replay as served traffic
        if act is None or act.owner is not self.owner:
            return None
        return act

    def _on_forward_pre(self, module: Any, args: tuple[Any, ...],
                        kwargs: dict[str, Any]) -> None:
        act = self._active()
        if act is None:
            return None
        try:
            ctr = act.counter
            ctr.depth += 1
            if ctr.depth > 1:
                return None
            step = ctr.next_step
            ctr.next_step += 1
            inputs = dict(kwargs)
            if args and "input_ids" not in inputs:
                inputs["input_ids"] = args[0]
            cache_len, tokens = _call_shape(inputs)
            for st in act.states:
                st.episode.forward(step, cache_len=cache_len, tokens=tokens)
                if not st.decided:
                    st.decided = True
                    fire = self.trigger.pre(st.view())
                    if fire is not None:
                        st.fire, st.capturing, st.capture_from_step = fire, True, step
                    elif self.flight_bytes:    # flight recorder: capture, decide at the end
                        st.capturing, st.capture_from_step, st.provisional = True, step, True
                self._keep_inputs(st, inputs, step)
        except Exception as e:  # never into the model call
            _fail_all(act, e)
        return None

    def _keep_inputs(self, st: RequestState, inputs: dict[str, Any], step: int) -> None:
        for name in _INPUT_NAMES:
            t = inputs.get(name)
            if t is None or not hasattr(t, "detach"):
                continue
            if name == "inputs_embeds" and not st.capturing:
                continue  # float inputs are only kept for captured requests
            sel = t if name in _UNBATCHED else t[st.rows]
            self._keep(st, "input", name, "", step, sel)

    def _on_forward(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                    output: Any) -> None:
        act = self._active()
        if act is None:
            return None
        try:
            ctr = act.counter
            ctr.depth -= 1
            if ctr.depth > 0 or not self.capture_logits:
                return None
            caps = [st for st in act.states if st.capturing]
            if not caps:
                return None
            logits = _logits_of(output)
            if logits is None:
                return None
            last = logits[:, -1, :] if logits.dim() == 3 else logits  # [batch, vocab|labels]
            step = ctr.next_step - 1
            for st in caps:
                self._keep(st, "logits", "logits", "", step, last[st.rows])
        except Exception as e:
            _fail_all(act, e)
        return None

    def _on_site(self, b: BoundSite, value: torch.Tensor) -> None:
        act = self._active()
        if act is None:
            return None
        try:
            step = act.counter.next_step - 1
            for st in act.states:
                if st.capturing:
                    self._keep(st, "activation", b.site, b.module_path, step, value[st.rows])
        except Exception as e:
            _fail_all(act, e)
        return None

    def _keep(self, st: RequestState, kind: str, site: str, module_path: str, step: int,
              value: torch.Tensor) -> None:
        """Copy ``value`` into the request's records, within the byte cap (and, for a
        provisional flight-recorder capture, within the flight buffer's bound)."""
        if st.too_large:
            return
        size = value.element_size() * value.nelement()
        if st.provisional and st.nbytes + size > self.flight_bytes:
            _stop_flight(st)
            if kind != "input":
                return
        st.nbytes += size
        if st.nbytes > self.max_bytes:
            st.too_large = True
            st.records.clear()  # free memory now; the incident is dropped and counted at the end
            return
        copy = value.detach().to("cpu", copy=True)
        st.records.append(TensorRecord(kind, site, module_path, step, copy))


def _call_shape(inputs: dict[str, Any]) -> tuple[int | None, int]:
    """(KV-cache length before the call or None without a cache, new positions fed): how the
    episode log tells a decode step from the start of a model call."""
    cache = inputs.get("past_key_values", inputs.get("cache"))
    cache_len: int | None = None
    if cache is not None:
        get = getattr(cache, "get_seq_length", None)
        cache_len = int(get()) if callable(get) else (1 if cache else 0)  # legacy tuple cache
    x = inputs.get("input_ids", inputs.get("inputs_embeds"))
    shape: Any = getattr(x, "shape", ())
    return cache_len, int(shape[1]) if len(shape) > 1 else 1


def _stop_flight(st: RequestState) -> None:
    """The flight buffer is full: stop capturing this request, free its activations, keep its
    inputs (a flag raised later still makes an incident, materialised by replay)."""
    st.capturing = st.provisional = False
    st.flight_overflow = True
    st.records = [r for r in st.records if r.kind == "input"]
    st.nbytes = sum(r.tensor.element_size() * r.tensor.nelement() for r in st.records)


def _fail_all(act: RequestContext, e: Exception) -> None:
    _log.warning("forensics: capture failed (%s: %s); the incident will be dropped",
                 type(e).__name__, e)
    for st in act.states:
        if st.error is None:
            st.error = f"{type(e).__name__}: {e}"


def _logits_of(output: Any) -> torch.Tensor | None:
    import torch

    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None
