"""External calls (tools, retrieval, APIs): recorded while serving, replayed from the recording.

Wrap every call that leaves the process::

    from integrations.external import recorded, external_call

    @recorded("search")
    def search(query: str, k: int = 3) -> list[str]: ...

    docs = search("refund policy")                        # or: external_call("search", fn, q)

* Inside a recorder request (``rec.request(...)``/``rec.batch(...)``) the JSON form of the
  arguments and of the result (or of the exception raised) is appended, in call order, to every
  request of the context; the incident's manifest carries them as ``external_calls``. A call
  whose arguments or result are not JSON-serialisable is recorded as *unrecordable* (the real
  result is still returned; nothing raises into the serving path).
* Outside any request the function is simply called.
* Inside a replay :func:`sandbox` the function is **never called**: the next recorded call must
  have the same name and arguments, and its recorded result is returned (a recorded exception
  is raised as :class:`RecordedCallError`). Anything else — a call that was not recorded, in
  another order or with other arguments — raises :class:`~integrations.errors.ReplayError`.

* A sandbox given ``standins`` (name -> a *local* stand-in of the external system, e.g. a
  function running SQL on an in-process copy of the recorded database) serves a counterfactual
  re-run whose calls may change: while the calls match the recording they are answered from it
  (and also applied to the stand-in, which so follows the recorded state); from the first call
  that differs (:attr:`ExternalCallSandbox.diverged_at`) every call goes to its stand-in —
  never to the real function; a call without a stand-in still raises ``ReplayError``.

Example (replay)::

    with sandbox(inc.manifest["external_calls"]) as box:
        agent_step(...)                  # search(...) answers from the recording
    box.served, box.remaining            # 1, 0
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar, cast

from .errors import ReplayError

__all__ = ["ExternalCallSandbox", "RecordedCallError", "active_sandbox", "external_call",
           "recorded", "sandbox"]

_log = logging.getLogger(__name__)
_F = TypeVar("_F", bound=Callable[..., Any])

_sandbox: contextvars.ContextVar[ExternalCallSandbox | None] = contextvars.ContextVar(
    "forensics_external_sandbox", default=None)


class RecordedCallError(ReplayError):
    """A replayed external call whose recorded outcome was an exception.

    ``type_name`` and ``message`` are those of the original exception.
    """

    def __init__(self, name: str, type_name: str, message: str) -> None:
        super().__init__(f"external call {name!r} raised {type_name}: {message} when it was "
                         "recorded; the replay raises it again")
        self.type_name = type_name
        self.message = message


def _json(x: Any) -> Any:
    return json.loads(json.dumps(x, allow_nan=False))


class ExternalCallSandbox:
    """Serves recorded external calls in order; never calls the outside world."""

    def __init__(self, calls: Sequence[Mapping[str, Any]], *,
                 incident_id: str | None = None,
                 standins: Mapping[str, Callable[..., Any]] | None = None) -> None:
        self._calls = [dict(c) for c in calls]
        self._cursor = 0
        self.incident_id = incident_id
        self.standins = dict(standins or {})
        #: index of the first call that differed from the recording (stand-ins serve from there)
        self.diverged_at: int | None = None
        #: calls answered by a stand-in after the divergence
        self.local_calls = 0

    @property
    def served(self) -> int:
        """Calls answered from the recording so far."""
        return self._cursor

    @property
    def remaining(self) -> int:
        """Recorded calls not (yet) made by the replay."""
        return len(self._calls) - self._cursor

    def serve(self, name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        """The recorded result of the next call, which must be ``name(*args, **kwargs)``
        (with stand-ins: see the module doc)."""
        if self.standins:
            return self._serve_or_standin(name, args, kwargs)
        return self._serve_recorded(name, args, kwargs)

    def _serve_or_standin(self, name: str, args: Sequence[Any],
                          kwargs: Mapping[str, Any]) -> Any:
        local = self.standins.get(name)
        if self.diverged_at is None:
            if self._matches_next(name, args, kwargs):
                result = self._serve_recorded(name, args, kwargs)
                if local is not None:
                    local(*args, **kwargs)  # keep the stand-in in the recorded state
                return result
            self.diverged_at = self._cursor
        if local is None:
            raise ReplayError(
                f"external call {name!r} differs from the recording (from call "
                f"#{self.diverged_at} on) and has no local stand-in: pass standins={{{name!r}: "
                "...}} to run it against a local copy; the sandbox never calls out")
        self.local_calls += 1
        return local(*args, **kwargs)

    def _matches_next(self, name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> bool:
        if self._cursor >= len(self._calls):
            return False
        rec = self._calls[self._cursor]
        try:
            got_args, got_kwargs = _json(list(args)), _json(dict(kwargs))
        except (TypeError, ValueError):
            return False
        return bool(rec.get("name") == name and rec.get("args") == got_args and
                    (rec.get("kwargs") or {}) == got_kwargs)

    def _serve_recorded(self, name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        where = f" of incident {self.incident_id!r}" if self.incident_id else ""
        try:
            got_args, got_kwargs = _json(list(args)), _json(dict(kwargs))
        except (TypeError, ValueError) as e:
            raise ReplayError(f"external call {name!r} during replay has arguments that are not "
                              f"JSON-serialisable ({e}); it cannot match a recording") from e
        if self._cursor >= len(self._calls):
            raise ReplayError(
                f"external call {name!r}({_short(got_args, got_kwargs)}) during replay was not "
                f"recorded{where} (all {len(self._calls)} recorded calls were already served); "
                "the replay never reaches the outside world")
        rec = self._calls[self._cursor]
        if rec.get("name") != name or rec.get("args") != got_args or \
                (rec.get("kwargs") or {}) != got_kwargs:
            raise ReplayError(
                f"external call #{self._cursor} during replay is {name!r}"
                f"({_short(got_args, got_kwargs)}) but the recording{where} has "
                f"{rec.get('name')!r}({_short(rec.get('args'), rec.get('kwargs'))}): the replay "
                "diverged from the incident")
        if "unrecordable" in rec:
            raise ReplayError(f"external call {name!r} #{self._cursor} was not recordable "
                              f"({rec['unrecordable']}); its result cannot be replayed")
        self._cursor += 1
        if "error" in rec:
            err = rec["error"] or {}
            raise RecordedCallError(name, str(err.get("type")), str(err.get("message")))
        return _json(rec.get("result"))


def _short(args: Any, kwargs: Any) -> str:
    text = ", ".join([*(json.dumps(a) for a in (args or [])),
                      *(f"{k}={json.dumps(v)}" for k, v in (kwargs or {}).items())])
    return text if len(text) <= 120 else text[:117] + "..."


def active_sandbox() -> ExternalCallSandbox | None:
    """The replay sandbox of the current context, if any."""
    return _sandbox.get()


@contextlib.contextmanager
def sandbox(calls: Sequence[Mapping[str, Any]] | None, *, incident_id: str | None = None,
            standins: Mapping[str, Callable[..., Any]] | None = None
            ) -> Iterator[ExternalCallSandbox]:
    """Serve external calls from ``calls`` (a manifest's ``external_calls``) in this context;
    ``standins``: local stand-ins for a counterfactual re-run (see the module doc)."""
    box = ExternalCallSandbox(list(calls or []), incident_id=incident_id, standins=standins)
    token = _sandbox.set(box)
    try:
        yield box
    finally:
        _sandbox.reset(token)


def _record(name: str, args: Sequence[Any], kwargs: Mapping[str, Any], *,
            result: Any = None, error: BaseException | None = None) -> None:
    from ._request import _current

    act = _current.get()
    if act is None:
        return
    try:
        entry: dict[str, Any] = {"name": name}
        try:
            entry["args"], entry["kwargs"] = _json(list(args)), _json(dict(kwargs))
            if error is not None:
                entry["error"] = {"type": type(error).__name__, "message": str(error)}
            else:
                entry["result"] = _json(result)
        except (TypeError, ValueError) as e:
            entry = {"name": name, "args": entry.get("args"), "kwargs": entry.get("kwargs"),
                     "unrecordable": f"not JSON-serialisable: {e}"}
        for st in act.states:
            st.episode.tool(len(st.external_calls), name)
            st.external_calls.append(dict(entry))
    except Exception:  # pragma: no cover - never into the serving path
        _log.exception("forensics: recording external call %r failed", name)


def external_call(name: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn(*args, **kwargs)`` as the external call ``name`` (see the module doc)."""
    box = _sandbox.get()
    if box is not None:
        return box.serve(name, args, kwargs)
    try:
        result = fn(*args, **kwargs)
    except Exception as e:
        _record(name, args, kwargs, error=e)
        raise
    _record(name, args, kwargs, result=result)
    return result


async def _external_call_async(name: str, fn: Callable[..., Any], /, *args: Any,
                               **kwargs: Any) -> Any:
    box = _sandbox.get()
    if box is not None:
        return box.serve(name, args, kwargs)
    try:
        result = await fn(*args, **kwargs)
    except Exception as e:
        _record(name, args, kwargs, error=e)
        raise
    _record(name, args, kwargs, result=result)
    return result


def recorded(name: str | None = None) -> Callable[[_F], _F]:
    """Decorator: make every call of the function an :func:`external_call` named ``name``
    (default: the function's qualified name). Works on ``async def`` functions too."""
    def deco(fn: _F) -> _F:
        call_name: str = name or str(getattr(fn, "__qualname__", repr(fn)))
        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def awrapper(*args: Any, **kwargs: Any) -> Any:
                return await _external_call_async(call_name, fn, *args, **kwargs)
            return cast(_F, awrapper)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return external_call(call_name, fn, *args, **kwargs)
        return cast(_F, wrapper)
    return deco
