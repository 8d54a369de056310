"""Job attempts as Ray tasks: :class:`RayExecutor` (``jobs.executor: ray``, DESIGN §12).

Each attempt is one Ray task (``execute_job(kind.run, ctx)``) asking for ``jobs.ray.num_cpus``
/ ``num_gpus`` — or more when the kind's :class:`~sidecar.jobs.JobResources` hint says so. The
task ships only the :class:`~sidecar.jobs.JobContext` (the incident's reference as a string,
params, the config without its auth tokens): never the store, the catalog or a connection.
Ray's own retries are off (``max_retries=0``): a retry is the runner's, persisted in the
catalog, so it survives a restart of the sidecar too. What Ray raises is mapped
(:func:`job_error`): a ``JobFailed`` raised in the task keeps its message and ``retryable``;
any other exception of the kind is re-raised as itself; a worker, node or object lost with
the attempt is a retryable ``JobFailed``, so the job goes back to pending and runs again.
Ray is imported, and the cluster joined (``ray.init(address=jobs.ray.address)``), at the first
attempt; a sidecar that started Ray shuts it down in :meth:`RayExecutor.shutdown`.

Example::

    executor = RayExecutor(cfg.jobs.ray)                # nothing started yet
    runner = JobRunner(store, config=cfg, kinds=builtin_kinds(), executor=executor)
    # or simply jobs.executor: ray in the config (JobRunner builds the executor)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from .._config_sections import AuthConfig
from ._kind import JobContext, JobFailed, JobResources, RunFn, execute_job

if TYPE_CHECKING:
    from .._config_sections import RayConfig

__all__ = ["RayExecutor", "job_error"]

log = logging.getLogger("sidecar.jobs")

#: Ray's setting of how long a driver waits for a lost GCS before it exits, and ours (a day).
GCS_RECONNECT_ENV, GCS_RECONNECT_S = "RAY_gcs_rpc_server_reconnect_timeout_s", 86_400
#: How often a waiting attempt checks that the executor is still open (seconds).
_POLL_S = 0.25
#: How long :meth:`RayExecutor.shutdown` lets abandoned attempts notice before ``ray.shutdown``.
_DRAIN_S = 2.0


def job_error(error: Exception) -> Exception:
    """The exception the runner sees for what ``ray.get`` raised (module doc).

    Example::

        job_error(ray.exceptions.WorkerCrashedError())   # JobFailed(..., retryable=True)
    """
    from ray import exceptions as rx

    if isinstance(error, rx.RayTaskError):
        cause = error.cause
        if isinstance(cause, JobFailed):
            return JobFailed(str(cause), retryable=cause.retryable)
        if isinstance(cause, Exception) and not isinstance(cause, rx.RayError):
            return cause
        error = cause if isinstance(cause, Exception) else error
    if isinstance(error, rx.RuntimeEnvSetupError):
        return JobFailed(f"Ray could not set up the job's runtime environment ({_first_line(error)}"
                         "); the Ray workers need model-forensics installed in their image")
    if isinstance(error, rx.TaskCancelledError):
        return JobFailed("the attempt was cancelled on the Ray cluster; it runs again",
                         retryable=True)
    return JobFailed(f"the Ray worker running the attempt was lost ({type(error).__name__}: "
                     f"{_first_line(error)}); the job runs again", retryable=True)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else "no detail"


def _shut_down() -> JobFailed:
    return JobFailed("the job executor is shut down; the job runs at the next start of the "
                     "sidecar", retryable=True)


def _shippable(ctx: JobContext) -> JobContext:
    """The context as sent to the cluster: the config without the sidecar's auth tokens."""
    return dataclasses.replace(ctx, config=dataclasses.replace(ctx.config, auth=AuthConfig()))


class RayExecutor:
    """A :class:`~sidecar.jobs.JobExecutor` running each attempt as one Ray task (module doc).

    Thread-safe: the runner calls :meth:`run` from one thread per running attempt."""

    #: A task may run on another node: it opens incidents by reference (``sidecar._incident_refs``).
    remote = True

    def __init__(self, config: RayConfig) -> None:
        self.config = config
        self.request = JobResources(num_cpus=config.num_cpus, num_gpus=config.num_gpus)
        self._lock = threading.Condition()
        self._ray: Any = None
        self._task: Any = None
        self._owns_ray = False
        self._closed = False
        self._inflight: set[Any] = set()
        self._warned: set[JobResources] = set()

    def run(self, run: RunFn, ctx: JobContext, *,
            resources: JobResources | None = None) -> dict[str, Any]:
        ray, task = self._connect()
        want = self.request.at_least(resources)
        self._warn_if_unavailable(ray, want)
        with self._lock:   # submitted and tracked as one step: shutdown() cancels it
            if self._closed:
                raise _shut_down()
            ref = task.options(num_cpus=want.num_cpus, num_gpus=want.num_gpus,
                               name=f"forensics-job-{ctx.kind}").remote(run, _shippable(ctx))
            self._inflight.add(ref)
        try:
            return self._result(ray, ref)
        finally:
            with self._lock:
                self._inflight.discard(ref)
                self._lock.notify_all()

    def shutdown(self) -> None:
        """Cancel attempts still running (their jobs stay ``running`` in the catalog and are
        resumed at the next start), then shut Ray down if this executor started it."""
        with self._lock:
            self._closed = True
            ray, refs = self._ray, list(self._inflight)
        if ray is None:
            return
        for ref in refs:
            try:
                ray.cancel(ref, force=True)
            except Exception:   # already finished, or the cluster is gone
                log.debug("could not cancel a Ray task at shutdown", exc_info=True)
        deadline = time.monotonic() + _DRAIN_S
        with self._lock:
            while self._inflight and time.monotonic() < deadline:
                self._lock.wait(0.05)
        if self._owns_ray:
            ray.shutdown()

    # -- internals ---------------------------------------------------------------------------

    def _connect(self) -> tuple[Any, Any]:
        """(ray, the remote task), joining the cluster at the first call; a cluster that cannot
        be joined now is a retryable failure of the attempt."""
        with self._lock:
            if self._closed:
                raise _shut_down()
            if self._task is None:
                import ray

                if not ray.is_initialized():
                    self._init(ray)
                self._ray = ray
                self._task = ray.remote(max_retries=0, retry_exceptions=False)(execute_job)
            return self._ray, self._task

    def _init(self, ray: Any) -> None:
        address = self.config.address or "local"
        options: dict[str, Any] = {"namespace": self.config.namespace}
        if address == "local":
            options["include_dashboard"] = False
        else:
            # A Ray driver terminates its whole process when the cluster's GCS stays unreachable
            # for RAY_gcs_rpc_server_reconnect_timeout_s (60 s by default): for a sidecar that
            # would turn a Ray outage into an ingest outage. Wait for the cluster instead (jobs
            # stay in the catalog meanwhile); an operator's own setting wins.
            os.environ.setdefault(GCS_RECONNECT_ENV, str(GCS_RECONNECT_S))
        try:
            ray.init(address=address, **options)
        except Exception as e:
            raise JobFailed(f"cannot join the Ray cluster at jobs.ray.address "
                            f"{self.config.address!r} ({type(e).__name__}: {_first_line(e)}); "
                            "the job runs again", retryable=True) from e
        self._owns_ray = True
        log.info("joined Ray (jobs.ray.address %r, namespace %r)", self.config.address,
                 self.config.namespace)

    def _result(self, ray: Any, ref: Any) -> dict[str, Any]:
        """Wait for the task (never past a shutdown), then its result or the mapped error."""
        from ray import exceptions as rx

        try:
            while not ray.wait([ref], timeout=_POLL_S)[0]:
                if self._closed:
                    raise _shut_down()
            return dict(ray.get(ref))
        except rx.RayError as e:
            mapped = job_error(e)
            if isinstance(mapped, JobFailed) and mapped.retryable:
                log.warning("job attempt on Ray: %s", mapped)
            raise mapped from e

    def _warn_if_unavailable(self, ray: Any, want: JobResources) -> None:
        """Log once per request that no node of the cluster has it now (the task waits for an
        autoscaler to add one; without one it waits until the sidecar stops)."""
        if want in self._warned:
            return
        self._warned.add(want)
        try:
            total = ray.cluster_resources()
        except Exception:
            return
        for key, resource in (("num_cpus", "CPU"), ("num_gpus", "GPU")):
            have = float(total.get(resource, 0.0))
            if getattr(want, key) > have:
                log.warning("the Ray cluster has %s %s in all, a job attempt asks for %s "
                            "(jobs.ray.%s or the kind's resources): it waits until a node "
                            "that has them joins", have, key, getattr(want, key), key)
