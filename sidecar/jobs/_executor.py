"""Where a job attempt's ``run`` executes: the :class:`JobExecutor` seam (DESIGN §12).

The runner prepares an attempt (its :class:`~sidecar.jobs.JobContext`: the incident reference,
params, config — no store, no connections), hands ``run(ctx)`` to an executor and records the
outcome in the catalog itself, so retries and resumption never depend on the executor.
:class:`LocalExecutor` (a thread pool, the default) runs it in the sidecar's process;
:class:`~sidecar.jobs.RayExecutor` as one Ray task with resource requests. The executor of a
sidecar is chosen by ``jobs.executor`` (:func:`make_executor`).

Example::

    executor = make_executor(cfg)            # LocalExecutor unless jobs.executor: ray
    result = executor.run(kind.run, ctx, resources=kind.resources)
    executor.shutdown()
"""

from __future__ import annotations

import concurrent.futures as cf
from typing import TYPE_CHECKING, Any, Protocol

from ._kind import JobContext, JobResources, RunFn, execute_job

if TYPE_CHECKING:
    from .._config import SidecarConfig

__all__ = ["JobExecutor", "LocalExecutor", "make_executor"]


class JobExecutor(Protocol):
    """Runs one job attempt and returns its JSON-able result (blocking the calling runner
    thread). A failure is raised: :class:`~sidecar.jobs.JobFailed` keeps its message and
    ``retryable``; an attempt lost with its worker is a retryable ``JobFailed``."""

    #: Whether attempts may run on another machine: their contexts then carry incident
    #: references (:mod:`sidecar._incident_refs`) instead of this machine's paths.
    remote: bool

    def run(self, run: RunFn, ctx: JobContext, *,
            resources: JobResources | None = None) -> dict[str, Any]:
        """``run(ctx)`` somewhere; ``resources``: the kind's hint (may raise the request)."""
        ...

    def shutdown(self) -> None:
        """Stop: attempts still running are abandoned (the catalog resumes them)."""
        ...


class LocalExecutor:
    """A :class:`JobExecutor` running attempts on a thread pool of this process (``workers``
    threads; or the given ``pool``). Resource hints are ignored.

    Example::

        LocalExecutor(workers=2).run(stats_job, ctx)      # {'n_tensors': ...}
    """

    remote = False

    def __init__(self, *, workers: int = 2, pool: cf.Executor | None = None) -> None:
        self._pool = pool or cf.ThreadPoolExecutor(max_workers=workers,
                                                   thread_name_prefix="forensics-job")

    def run(self, run: RunFn, ctx: JobContext, *,
            resources: JobResources | None = None) -> dict[str, Any]:
        return self._pool.submit(execute_job, run, ctx).result()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def make_executor(config: SidecarConfig) -> JobExecutor:
    """The executor ``jobs.executor`` names: ``local`` (``jobs.workers`` threads) or ``ray``
    (``jobs.ray``; Ray is imported only then, and joined at the first attempt)."""
    if config.jobs.executor == "ray":
        from ._ray import RayExecutor

        return RayExecutor(config.jobs.ray)
    return LocalExecutor(workers=config.jobs.workers)
