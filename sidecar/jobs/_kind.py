"""What a job kind is, what it sees, and the errors it raises.

A kind is data (:class:`JobKind`): a name, ``run`` — a plain, picklable function of the job's
:class:`JobContext` (incident path, params, config) returning a JSON-able result, so the
executor seam can be a thread pool (default), a process pool or Ray tasks (DESIGN §12) — and
optional runner-side hooks that see a narrow :class:`JobHost` (config, read access to the index,
the job's incident, submitting follow-ups, metrics), never the runner:

* ``prepare(host, job, params) -> params`` before an attempt (e.g. pick benign incidents);
* ``record(con, job, result)`` inside the transaction that marks the job done (result tables);
* ``after(host, job, result)`` after that commit (the kind's metrics, follow-up jobs).

Kinds are listed in one place (:func:`sidecar.jobs.builtin_kinds`) and injected into the
runner; tests and deployments pass their own tuple.

Example::

    def norms(ctx: JobContext) -> dict:
        return {"n_sites": len(ctx.open_incident().sites())}

    NORMS = JobKind("norms", run=norms)
    runner = JobRunner(store, config=cfg, kinds=(*builtin_kinds(), NORMS))
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from integrations.errors import SidecarError

if TYPE_CHECKING:
    from integrations.incident import Incident

    from .._config import SidecarConfig
    from .._observer import Metric
    from .._store_index import IncidentRow
    from ._queue import JobRecord

__all__ = [
    "AfterFn",
    "JobContext",
    "JobFailed",
    "JobHost",
    "JobKind",
    "JobKinds",
    "JobOptionsError",
    "JobResources",
    "PrepareFn",
    "RecordFn",
    "RunFn",
    "UnknownJobKindError",
    "execute_job",
]


class JobFailed(SidecarError):
    """Raised by a job kind: the message is the job's recorded error."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class UnknownJobKindError(SidecarError, ValueError):
    """The runner has no job kind of that name."""


class JobOptionsError(SidecarError, ValueError):
    """A caller's job params are not an object of the kind's declared options."""


@dataclasses.dataclass(frozen=True)
class JobContext:
    """Everything ``run`` gets (picklable: no store, no connections)."""

    job_id: str
    incident_id: str
    kind: str
    attempt: int
    params: Mapping[str, Any]
    #: Where the worker opens the incident: a string (a path today), never the store itself.
    incident_path: str
    config: SidecarConfig
    #: The tenant the job runs for (its incident's owner): scopes what the kind may use.
    tenant: str = ""

    def open_incident(self) -> Incident:
        """The job's incident, memory-mapped and validated within ``limits`` (the decode
        limits: a stored incident is still untrusted bytes)."""
        return self.open_path(self.incident_path)

    def open_path(self, path: str | Path) -> Incident:
        """An incident file the runner resolved for this job (e.g. ``benign_paths``), opened
        with the sidecar's decode limits."""
        from integrations.incident import Incident

        from .._incident_refs import is_ref, open_ref

        if is_ref(path):      # a remote attempt: fetch the object, checked against its digest
            path = open_ref(str(path), self.config)
        return Incident.open(path, limits=self.config.limits.decode_limits())


class JobHost(Protocol):
    """What a kind's runner-side hooks see of the sidecar (one per job attempt)."""

    @property
    def config(self) -> SidecarConfig:
        """The sidecar configuration."""
        ...

    def incident(self, incident_id: str) -> IncidentRow | None:
        """An incident's index row, in the job's tenant (None when absent or another's)."""
        ...

    def incident_path(self, incident_id: str, *, tenant: str | None = None) -> str:
        """Where the job opens an incident of the job's tenant (for a JobContext's params): a
        local path, or for an attempt on a remote executor a reference
        (:mod:`sidecar._incident_refs`) — either way :meth:`JobContext.open_path` opens it.
        ``tenant``: of that tenant instead — only for ids the kind's own index query found
        (an operator-declared shared baseline), never for a caller's id."""
        ...

    def read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """A read-only query on the index."""
        ...

    def read_dicts(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Like :meth:`read`, each row as a dict."""
        ...

    def submit(self, incident_id: str, kind: str, *, tenant: str | None = None,
               params: Mapping[str, Any] | None = None,
               request_id: str | None = None) -> None:
        """Enqueue a follow-up job (``tenant`` defaults to the job's)."""
        ...

    def observe(self, metric: Metric, value: float = 1.0, *,
                labels: Mapping[str, str] | None = None) -> None:
        """Report a metric; the exemplar is the trace of the job's incident."""
        ...


@dataclasses.dataclass(frozen=True)
class JobResources:
    """What one attempt of a job asks a distributed executor for (Ray's ``num_cpus`` /
    ``num_gpus``; the local thread pool ignores it). A kind's hint only raises the configured
    request (``jobs.ray``), never lowers it.

    Example::

        REPLAY_GPU = dataclasses.replace(REPLAY, resources=JobResources(num_gpus=1))
        JobResources(num_cpus=1).at_least(REPLAY_GPU.resources)   # num_cpus=1, num_gpus=1
    """

    num_cpus: float = 0.0
    num_gpus: float = 0.0

    def __post_init__(self) -> None:
        for name in ("num_cpus", "num_gpus"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or \
                    not 0 <= value < float("inf"):
                raise ValueError(f"JobResources.{name} must be a finite number >= 0, "
                                 f"got {value!r}")

    def at_least(self, hint: JobResources | None) -> JobResources:
        """The larger of this request and a kind's ``hint``, resource by resource."""
        if hint is None:
            return self
        return JobResources(num_cpus=max(self.num_cpus, hint.num_cpus),
                            num_gpus=max(self.num_gpus, hint.num_gpus))


RunFn = Callable[[JobContext], Mapping[str, Any]]
PrepareFn = Callable[[JobHost, "JobRecord", dict[str, Any]], dict[str, Any]]
RecordFn = Callable[[Any, "JobRecord", dict[str, Any]], None]
AfterFn = Callable[[JobHost, "JobRecord", dict[str, Any]], None]


@dataclasses.dataclass(frozen=True)
class JobKind:
    """One kind of analysis job: ``run`` plus the optional hooks of the module doc, and the
    metrics its hooks observe (declared so they are exported from the first scrape)."""

    name: str
    run: RunFn
    prepare: PrepareFn | None = None
    record: RecordFn | None = None
    after: AfterFn | None = None
    metrics: tuple[Metric, ...] = ()
    #: The params a caller may pass (RunAnalysis); ``None``: not declared, anything goes.
    #: What ``prepare`` adds for ``run`` (resolved file paths, rankings) is never among them:
    #: a caller names incidents by id, the runner resolves them in the caller's tenant.
    options: frozenset[str] | None = None
    #: What one attempt needs beyond ``jobs.ray``'s request (e.g. ``num_gpus=1`` for replays
    #: of a large model); ``None``: the configured request.
    resources: JobResources | None = None
    #: ``run`` reads or writes files under the sidecar's ``data_dir`` (baselines, probes, result
    #: files), which stays on the sidecar (DESIGN §12): the runner runs it on its own thread
    #: pool whatever ``jobs.executor`` says (a remote worker would see another disk).
    uses_data_dir: bool = False
    #: The only ``data_dir`` files ``run`` reads are baselines/probes fetched by reference from
    #: the store (:mod:`sidecar._artefacts`) and it writes none: with a shared store
    #: (``store.uri`` set) it runs on any executor despite :attr:`uses_data_dir`.
    reads_store_artefacts: bool = False

    def on_sidecar(self, config: SidecarConfig) -> bool:
        """Whether an attempt must run on the sidecar's own thread pool under ``config``."""
        return self.uses_data_dir and not (self.reads_store_artefacts and
                                           not config.store.is_local)

    def check_options(self, params: Mapping[str, Any] | None) -> None:
        """Refuse params that are not among :attr:`options` (:class:`JobOptionsError`)."""
        unknown = sorted(set(params or ()) - self.options) if self.options is not None else []
        if unknown:
            allowed = ", ".join(sorted(self.options or ())) or "none"
            raise JobOptionsError(f"job kind {self.name!r} has no option(s) "
                                  f"{', '.join(map(repr, unknown))}; its options: {allowed}")


class JobKinds:
    """The kinds one runner knows, by name (names must be unique)."""

    def __init__(self, kinds: Iterable[JobKind]) -> None:
        self._kinds: dict[str, JobKind] = {}
        for kind in kinds:
            if kind.name in self._kinds:
                raise ValueError(f"two job kinds are named {kind.name!r}")
            self._kinds[kind.name] = kind

    def __getitem__(self, name: str) -> JobKind:
        """The kind ``name`` (:class:`UnknownJobKindError` when there is none)."""
        kind = self._kinds.get(name)
        if kind is None:
            raise UnknownJobKindError(f"unknown analysis kind {name!r}; registered kinds: "
                                      f"{', '.join(self.names())}")
        return kind

    def __iter__(self) -> Iterator[JobKind]:
        return iter(self._kinds.values())

    def names(self) -> list[str]:
        """Every kind's name, sorted."""
        return sorted(self._kinds)


def execute_job(run: RunFn, ctx: JobContext) -> dict[str, Any]:
    """Run one job attempt (top-level so process pools can pickle it); returns the result,
    checked to be strict JSON."""
    result = dict(run(ctx))
    json.dumps(result, allow_nan=False)   # fail here, not when storing
    return result
