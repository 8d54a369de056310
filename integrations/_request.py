"""The request context: per-request capture state, the request/batch handles, ``flag()`` and
``outside_request()``.

The state of the request being served lives in a :class:`contextvars.ContextVar`, so concurrent
requests on threads or asyncio tasks never see each other's context. Hooks read it on every
forward call; when nothing fires they return after one ``ContextVar.get``.

Example::

    with rec.request(request_id="r-1", tenant="acme") as req:
        out = model.generate(**inputs)
        if bad(out):
            req.flag("prompt_injection")     # or integrations.flag("prompt_injection")
        with outside_request():              # e.g. a replay inside a served request
            model(**probe)                   # not recorded by any recorder
"""

from __future__ import annotations

import contextlib
import contextvars
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .incident._episode import EpisodeLog
from .triggers import Fire, RequestView

if TYPE_CHECKING:
    import torch

    from .incident import TensorRecord

__all__ = [
    "BatchHandle",
    "RequestContext",
    "RequestHandle",
    "RequestState",
    "StepCounter",
    "current_request",
    "flag",
    "new_state",
    "outside_request",
]


@dataclass
class RequestState:
    """Everything recorded for one request (one future incident). Internal."""

    request_id: str
    tenant: str | None
    headers: Mapping[str, str]
    traceparent: str | None
    rows: slice                      # which batch rows of every tensor belong to this request
    started_at: float = field(default_factory=time.time)
    flags: list[str] = field(default_factory=list)
    flag_step: int | None = None     # last forward step completed when first flagged
    fire: Fire | None = None         # set when activations are being captured
    decided: bool = False            # pre-trigger evaluated (at the first forward)
    capturing: bool = False
    capture_from_step: int | None = None
    # Flight recorder: captured although no trigger fired yet; kept only if one fires by the
    # end of the request (a post-hoc flag), else discarded. ``flight_overflow``: the buffer
    # outgrew its bound, so capture stopped (a later flag makes a replay incident).
    provisional: bool = False
    flight_overflow: bool = False
    records: list[TensorRecord] = field(default_factory=list)
    nbytes: int = 0
    too_large: bool = False
    error: str | None = None         # capture error (never raised into the model call)
    output_ids: torch.Tensor | None = None
    output_text: str | None = None
    input_text: str | None = None
    generation: dict[str, Any] | None = None
    rng_state: torch.Tensor | None = None
    request_error: str | None = None
    incident_id: str | None = None   # set to choose the incident id (seed facade bundles)
    # External calls (tools, retrieval) made while serving, in order: JSON-able dicts
    # {"name", "args", "result"} appended by ``integrations.external``; replayed from here.
    external_calls: list[dict[str, Any]] = field(default_factory=list)
    # Model calls and tool calls in the order they happened (the manifest's ``episode``).
    episode: EpisodeLog = field(default_factory=EpisodeLog)

    def view(self, *, with_output: bool = False) -> RequestView:
        return RequestView(request_id=self.request_id, tenant=self.tenant, headers=self.headers,
                           flags=tuple(self.flags),
                           output_text=self.output_text if with_output else None)


class StepCounter:
    """Forward-call counter shared by all requests of one batch (0 = prefill)."""

    def __init__(self) -> None:
        self.next_step = 0
        self.depth = 0      # nested top-level forwards (re-entrancy guard)


@dataclass
class RequestContext:
    """What the hooks see: the requests of the batch being served and its step counter.

    ``owner`` is the recorder serving them (hooks of other recorders ignore the context);
    ``tokenizer`` decodes output ids for :meth:`RequestHandle.set_output`.
    """

    owner: object
    states: list[RequestState]
    counter: StepCounter
    tokenizer: Any = None


_current: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "forensics_request", default=None)

#: The context of :func:`outside_request`: no requests, owned by no recorder.
_OUTSIDE = RequestContext(owner=None, states=[], counter=StepCounter())


@contextlib.contextmanager
def outside_request() -> Iterator[None]:
    """Detach the current request context: nothing run inside is recorded by any recorder.

    Inside, there is no current request (``flag()`` returns False, ``current_request()`` is
    None) and an ambient capture does not apply either; on exit the request context that was
    current is restored. Deterministic replay runs the model this way.

    Example::

        with rec.request(request_id="r-1"):
            out = model(x)                  # recorded
            with integrations.outside_request():
                model(x_probe)              # not recorded
    """
    token = _current.set(_OUTSIDE)
    try:
        yield
    finally:
        _current.reset(token)


def current_request() -> RequestHandle | None:
    """The handle of the request being served in this context, if exactly one."""
    act = _current.get()
    if act is None or len(act.states) != 1:
        return None
    return RequestHandle(act.states[0], act)


def flag(reason: str, *, request_id: str | None = None) -> bool:
    """Flag the current request (anywhere inside ``rec.request(...)``) as a failure.

    Returns False — never raises — when there is no request to flag (forensics never breaks the
    serving path). Inside ``rec.batch(...)`` pass ``request_id``.
    """
    act = _current.get()
    if act is None:
        return False
    for st in act.states:
        if (request_id is None and len(act.states) == 1) or st.request_id == request_id:
            _add_flag(st, act, reason)
            return True
    return False


def _add_flag(st: RequestState, act: RequestContext, reason: str) -> None:
    if st.flag_step is None:
        st.flag_step = act.counter.next_step - 1
    st.flags.append(str(reason))


class RequestHandle:
    """Handle of one request: flag it, attach its output / generation config."""

    def __init__(self, state: RequestState, active: RequestContext) -> None:
        self._state = state
        self._active = active

    @property
    def request_id(self) -> str:
        return self._state.request_id

    @property
    def capturing(self) -> bool:
        """True when this request's activations are being captured."""
        return self._state.capturing

    def flag(self, reason: str) -> None:
        """Mark this request as a failure with ``reason`` (e.g. ``"prompt_injection"``)."""
        _add_flag(self._state, self._active, reason)

    def set_output(self, *, ids: Any = None, text: str | None = None) -> None:
        """Attach the request's output: token ids (any int tensor/list) and/or decoded text.

        Text is used by ``OutputContains`` and stored only when content capture is on.
        """
        import torch

        if ids is not None:
            t = ids if isinstance(ids, torch.Tensor) else torch.as_tensor(ids)
            t = t.detach().to("cpu")
            if self._state.rows != slice(None) and t.dim() >= 1 and t.shape[0] > 1:
                t = t[self._state.rows]
            self._state.output_ids = t.clone()
            if text is None:
                text = _decode(self._active.tokenizer, self._state.output_ids)
        if text is not None:
            self._state.output_text = text

    def set_input(self, *, text: str | None = None) -> None:
        """Attach the raw input text (stored only when content capture is on)."""
        self._state.input_text = text

    def set_generation(self, **config: Any) -> None:
        """Record the generation config used (``max_new_tokens``, ``do_sample``, ...)."""
        self._state.generation = {k: _jsonable(v) for k, v in config.items()}


class BatchHandle:
    """Handle of a served batch: one :class:`RequestHandle` per request, by id or row."""

    def __init__(self, active: RequestContext) -> None:
        self._active = active
        self._handles = {st.request_id: RequestHandle(st, active) for st in active.states}

    def __getitem__(self, key: str | int) -> RequestHandle:
        if isinstance(key, int):
            return self._handles[self._active.states[key].request_id]
        return self._handles[key]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._handles.values())

    def __len__(self) -> int:
        return len(self._handles)

    def flag(self, request_id: str, reason: str) -> None:
        self._handles[request_id].flag(reason)

    def set_output(self, *, ids: Any = None, texts: Sequence[str] | None = None) -> None:
        """Attach the batch's outputs, row by row."""
        for i, h in enumerate(self._handles.values()):
            h.set_output(ids=None if ids is None else ids[i:i + 1],
                         text=None if texts is None else texts[i])


def new_state(*, request_id: str | None, tenant: str | None, headers: Mapping[str, str] | None,
              traceparent: str | None, rows: slice) -> RequestState:
    return RequestState(request_id=request_id or uuid.uuid4().hex, tenant=tenant,
                        headers=dict(headers or {}),
                        traceparent=traceparent or _otel_traceparent(), rows=rows)


def _decode(tokenizer: Any, ids: torch.Tensor) -> str | None:
    """The text of output ids (the first row of a batch), or None without a tokenizer."""
    if tokenizer is None:
        return None
    try:
        seq = ids[0] if ids.dim() > 1 else ids
        return str(tokenizer.decode(seq.tolist(), skip_special_tokens=True))
    except Exception:  # never into the serving path
        return None


def _otel_traceparent() -> str | None:
    """W3C traceparent of the current OpenTelemetry span, if a valid one is active."""
    try:
        from opentelemetry import trace
    except ImportError:  # opentelemetry-api is optional at run time
        return None
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return repr(v)
