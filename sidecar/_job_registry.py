"""Job kinds: the registry, the context a kind gets, and the errors it raises.

A job kind is a function ``fn(ctx: JobContext) -> dict`` (JSON-able result) registered by name,
plus optional runner-side hooks (:class:`JobKind`): ``prepare`` (pick inputs from the index),
``record`` (write result tables in the same transaction that marks the job done), ``after``
(enqueue follow-up jobs). The context is plain data (paths, params, config) so the executor seam
can be a thread pool (default), a process pool, or Ray tasks later (DESIGN §12).

Example::

    @register_job_kind("norms", record=my_record)
    def norms(ctx: JobContext) -> dict:
        inc = ctx.open_incident()
        return {"n_sites": len(inc.sites())}
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from integrations.errors import SidecarError

if TYPE_CHECKING:
    from integrations.incident import Incident

    from ._config import SidecarConfig
    from ._jobs import JobRecord, JobRunner

__all__ = [
    "AfterFn",
    "JobContext",
    "JobFailed",
    "JobFn",
    "JobKind",
    "PrepareFn",
    "RecordFn",
    "UnknownJobKindError",
    "execute_job",
    "job_kind",
    "job_kinds",
    "register_job_kind",
]

JobFn = Callable[["JobContext"], Mapping[str, Any]]
#: ``prepare(runner, job, params) -> params``: runs in the runner before an attempt, with index
#: access (e.g. to pick benign incidents); the returned params go into the JobContext.
PrepareFn = Callable[["JobRunner", "JobRecord", dict[str, Any]], dict[str, Any]]
#: ``record(con, job, result)``: inside the transaction that marks the job done (result tables).
RecordFn = Callable[[Any, "JobRecord", dict[str, Any]], None]
#: ``after(runner, job, result)``: after that commit (follow-up jobs); errors are logged.
AfterFn = Callable[["JobRunner", "JobRecord", dict[str, Any]], None]


@dataclasses.dataclass(frozen=True)
class JobKind:
    """A registered job kind: the (picklable) computation plus runner-side hooks."""

    fn: JobFn
    prepare: PrepareFn | None = None
    record: RecordFn | None = None
    after: AfterFn | None = None


_KINDS: dict[str, JobKind] = {}
_KINDS_LOCK = threading.Lock()


class JobFailed(SidecarError):
    """Raised by a job kind: the message is the job's recorded error."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class _Stopped(Exception):
    """The runner was stopped: runner threads no longer touch the index."""


class UnknownJobKindError(SidecarError, ValueError):
    """No job kind of that name is registered."""


def register_job_kind(name: str, fn: JobFn | None = None, *, replace: bool = False,
                      prepare: PrepareFn | None = None, record: RecordFn | None = None,
                      after: AfterFn | None = None) -> Any:
    """Register ``fn`` as job kind ``name`` (also usable as a decorator); see :class:`JobKind`
    for the optional runner-side hooks."""
    def deco(f: JobFn) -> JobFn:
        with _KINDS_LOCK:
            if name in _KINDS and not replace and _KINDS[name].fn is not f:
                raise ValueError(f"job kind {name!r} is already registered; pass replace=True")
            _KINDS[name] = JobKind(f, prepare=prepare, record=record, after=after)
        return f
    return deco(fn) if fn is not None else deco


def _builtin() -> None:
    from . import _kinds  # noqa: F401  (registers stats, replay, cf, baseline, cca)


def job_kinds() -> list[str]:
    """Registered job kind names, sorted."""
    _builtin()
    with _KINDS_LOCK:
        return sorted(_KINDS)


def job_kind(name: str) -> JobKind:
    """The registered kind ``name`` (:class:`UnknownJobKindError` when there is none)."""
    _builtin()
    with _KINDS_LOCK:
        kind = _KINDS.get(name)
    if kind is None:
        raise UnknownJobKindError(f"unknown analysis kind {name!r}; registered kinds: "
                                  f"{', '.join(sorted(_KINDS))}")
    return kind


@dataclasses.dataclass(frozen=True)
class JobContext:
    """Everything a job kind gets (picklable: no store, no connections)."""

    job_id: str
    incident_id: str
    kind: str
    attempt: int
    params: Mapping[str, Any]
    incident_path: Path
    config: SidecarConfig

    def open_incident(self) -> Incident:
        """The job's incident, memory-mapped and validated."""
        from integrations.incident import Incident

        return Incident.open(self.incident_path)


def execute_job(ctx: JobContext) -> dict[str, Any]:
    """Run one job attempt (top-level so process pools can pickle it); returns the result."""
    result = dict(job_kind(ctx.kind).fn(ctx))
    json.dumps(result, allow_nan=False)   # fail here, not when storing
    return result
