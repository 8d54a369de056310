"""Sidecar analysis jobs: a package of self-contained job kinds and the runner they are given to.

A kind (:class:`JobKind`) is a name, a plain picklable ``run(ctx) -> result`` and optional hooks
that see a narrow :class:`JobHost`; the built-in kinds (``stats``, ``replay``, ``cf``,
``baseline``, ``cca``, ``investigate``, ``probe``, ``probe_score``) are listed by
:func:`builtin_kinds` and injected into the :class:`JobRunner`, which persists jobs in the
store's DuckDB index (they survive restarts). There is no global registry: a runner knows
exactly the kinds it was given. Where ``run`` executes is the :class:`JobExecutor` seam:
:class:`LocalExecutor` (a thread pool, the default) or :class:`RayExecutor` (``jobs.executor:
ray``: one Ray task per attempt, with ``num_cpus`` / ``num_gpus`` requests).

Example::

    from sidecar.jobs import JobKind, JobRunner, builtin_kinds
    runner = JobRunner(store, config=cfg, kinds=builtin_kinds())
    runner.start()
    job = runner.submit("inc-1", "stats", tenant="acme")
    runner.wait(job.id, timeout_s=30).result["n_tensors"]
    runner.stop()
"""

from ._builtin import builtin_kinds
from ._executor import JobExecutor, LocalExecutor, make_executor
from ._kind import (
    JobContext,
    JobFailed,
    JobHost,
    JobKind,
    JobOptionsError,
    JobResources,
    UnknownJobKindError,
)
from ._queue import JOB_STATES, JobQuotaError, JobRecord
from ._ray import RayExecutor
from ._runner import JobRunner

__all__ = [
    "JOB_STATES",
    "JobContext",
    "JobExecutor",
    "JobFailed",
    "JobHost",
    "JobKind",
    "JobOptionsError",
    "JobQuotaError",
    "JobRecord",
    "JobResources",
    "JobRunner",
    "LocalExecutor",
    "RayExecutor",
    "UnknownJobKindError",
    "builtin_kinds",
    "make_executor",
]
