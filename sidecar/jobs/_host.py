"""The :class:`~sidecar.jobs.JobHost` the runner gives a kind's hooks: one per job attempt.

It exposes the configuration, read-only index queries, the job's tenant's incidents, a way to
submit follow-up jobs and to observe metrics (with the incident's trace as exemplar) — and
nothing else of the runner or the store.

Example::

    host = RunnerHost(store, config=cfg, job=job, submit=runner.submit, telemetry=tel,
                      traceparent=row.traceparent)
    host.incident(job.incident_id)          # tenant-scoped
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .._config import SidecarConfig
    from .._observer import Metric, Telemetry
    from .._store import IncidentStore
    from .._store_index import IncidentRow
    from ._queue import JobRecord

__all__ = ["RunnerHost"]


class RunnerHost:
    """A :class:`~sidecar.jobs.JobHost` bound to one job (``submit`` is the runner's)."""

    def __init__(self, store: IncidentStore, *, config: SidecarConfig, job: JobRecord,
                 submit: Callable[..., Any], telemetry: Telemetry,
                 traceparent: str | None) -> None:
        self._store, self._config, self._job = store, config, job
        self._submit, self._telemetry, self._traceparent = submit, telemetry, traceparent
        #: Whether the attempt may run on another machine (:meth:`incident_path` then gives
        #: references, ``sidecar._incident_refs``); set by the runner once it picked the executor.
        self.portable = False

    @property
    def config(self) -> SidecarConfig:
        return self._config

    def incident(self, incident_id: str) -> IncidentRow | None:
        # Exactly the job's tenant (its incident's owner), "" included: never every tenant.
        return self._store.get(incident_id, tenant=self._job.tenant)

    def incident_path(self, incident_id: str, *, tenant: str | None = None) -> str:
        # The job's tenant unless a kind's own query resolved another (a shared baseline).
        owner = self._job.tenant if tenant is None else tenant
        if self.portable:
            return self._store.ref(incident_id, tenant=owner)
        return str(self._store.path(incident_id, tenant=owner))

    def read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._store.index.read(sql, params)

    def read_dicts(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return self._store.index.read_dicts(sql, params)

    def submit(self, incident_id: str, kind: str, *, tenant: str | None = None,
               params: Mapping[str, Any] | None = None,
               request_id: str | None = None) -> None:
        self._submit(incident_id, kind, tenant=self._job.tenant if tenant is None else tenant,
                     params=params, request_id=request_id)

    def observe(self, metric: Metric, value: float = 1.0, *,
                labels: Mapping[str, str] | None = None) -> None:
        self._telemetry.observe(metric, value, labels=labels, traceparent=self._traceparent)
