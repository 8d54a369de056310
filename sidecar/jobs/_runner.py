"""The job runner: claims pending jobs from the queue and runs at most ``jobs.workers`` at once.

The runner knows kinds only through :class:`~sidecar.jobs.JobKind` (injected: ``kinds=``) and
nothing of what their results mean: a kind's result tables, metrics and follow-up jobs are its
own hooks, which see a narrow :class:`~sidecar.jobs.JobHost`. Each attempt runs in a
``job.<kind>`` span linked to the incident's request trace; ``run`` goes through the
:class:`~sidecar.jobs.JobExecutor` (``jobs.executor``: a thread pool, or Ray tasks, unless one
is given); outcomes and retries are recorded here, in the catalog, whatever the executor.

Example::

    runner = JobRunner(store, config=cfg, kinds=builtin_kinds())
    runner.start()
    job = runner.submit("inc-1", "stats", tenant="acme")
    runner.wait(job.id, timeout_s=30).state      # "done"
    runner.stop()
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from integrations.errors import (
    ArtefactError,
    CatalogUnavailableError,
    IncidentFormatError,
    SidecarError,
)

from .._observer import Telemetry, as_telemetry, counter, gauge, histogram
from .._store_index import utcnow
from ._executor import JobExecutor, LocalExecutor, make_executor
from ._host import RunnerHost
from ._kind import JobContext, JobFailed, JobKind, JobKinds, UnknownJobKindError
from ._queue import JOB_STATES, JobQueue, JobRecord

if TYPE_CHECKING:
    from .._config import SidecarConfig
    from .._store import IncidentStore

__all__ = ["ATTEMPT_END_STATES", "JOBS", "JOBS_FINISHED", "JOB_DURATION", "JOB_QUEUE_WAIT",
           "METRICS", "JobRunner"]

log = logging.getLogger("sidecar.jobs")

JOBS = gauge("jobs", "Analysis jobs by state (pending = the analysis queue depth).",
             labels=("state",), values={"state": JOB_STATES})
JOBS_FINISHED = counter("jobs_finished", "Job attempts that ended, by kind and state.",
                        labels=("kind", "state"))
#: The states an attempt ends in: done, failed for good, or pending again (to be retried).
ATTEMPT_END_STATES = ("done", "failed", "pending")
#: From a stats job (ms) to a CCA search (the proposal's budget is 2 h). A bucket above 2 h is
#: needed for the ForensicsAnalysisSlow alert: histogram_quantile() never exceeds the highest
#: finite bound, so with 7200 last a p95 beyond 2 h would read as exactly 7200 (no alert).
_SECONDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
            1800.0, 3600.0, 7200.0, 14400.0, float("inf"))
JOB_DURATION = histogram("job_duration_seconds", "Wall time of one analysis job attempt, by kind.",
                         labels=("kind",), buckets=_SECONDS)
JOB_QUEUE_WAIT = histogram(
    "job_queue_wait_seconds", "Time from submitting a job to its first attempt starting, by "
    "kind (how long analyses wait for a worker).", labels=("kind",), buckets=_SECONDS)
METRICS = (JOBS, JOBS_FINISHED, JOB_DURATION, JOB_QUEUE_WAIT)


class _Stopped(Exception):
    """The runner was stopped: runner threads no longer touch the index."""


class JobRunner:
    """Runs the jobs of ``store``'s queue with ``kinds`` (see the module doc)."""

    def __init__(self, store: IncidentStore, *, config: SidecarConfig, kinds: Iterable[JobKind],
                 telemetry: Telemetry | None = None, executor: JobExecutor | None = None,
                 clock: Callable[[], dt.datetime] = utcnow) -> None:
        self.store = store
        self.config = config
        self.kinds = JobKinds(kinds)
        self.queue = JobQueue(store.index, max_attempts=config.jobs.max_attempts, clock=clock,
                              lease_s=config.jobs.lease_s if store.index.shared else None)
        self.telemetry = as_telemetry(telemetry)
        self.workers = config.jobs.workers
        self._executor = executor or make_executor(config)
        #: For kinds that use the sidecar's data_dir (JobKind.on_sidecar).
        self._on_sidecar: JobExecutor = self._executor if isinstance(
            self._executor, LocalExecutor) else LocalExecutor(workers=self.workers)
        self._own_executor = executor is None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._changed = threading.Condition()
        self._inflight = 0
        self._inflight_lock = threading.Lock()
        #: Ids of the attempts running now (their leases are renewed; see JobQueue.heartbeat).
        self._running_ids: set[str] = set()
        self._counts_lock = threading.Lock()
        self._db_lock = threading.RLock()
        self._closed = False
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Resume interrupted jobs and start dispatching. Every (kind, end state) series of
        ``forensics_jobs_finished_total`` exists from here on, at 0: ``increase()`` in an alert
        sees the first failure (a counter born at 1 reads as no increase)."""
        for kind in self.kinds:
            for state in ATTEMPT_END_STATES:
                self.telemetry.observe(JOBS_FINISHED, 0.0,
                                       labels={"kind": kind.name, "state": state})
        self.queue.resume()
        self._report_counts()
        self._thread = threading.Thread(target=self._dispatch, name="forensics-job-dispatch",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop claiming; wait up to ``timeout_s`` for running attempts (unfinished ones are
        resumed at the next start)."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while self._inflight and time.monotonic() < deadline:
                self._changed.wait(0.05)
        with self._db_lock:   # no runner thread touches the index after this
            self._closed = True
        if self._own_executor:
            self._executor.shutdown()
        if self._on_sidecar is not self._executor:
            self._on_sidecar.shutdown()

    # -- API ---------------------------------------------------------------------------------

    def submit(self, incident_id: str, kind: str, *, tenant: str,
               params: Mapping[str, Any] | None = None,
               request_id: str | None = None, caller: bool = False) -> JobRecord:
        """Enqueue a job of a known kind (state pending). With ``request_id``, the same
        (incident, key) returns the existing job instead of a new one. ``caller``: submitted by
        an API caller (RunAnalysis), so params must be the kind's declared options
        (:class:`JobOptionsError`) and the tenant's ``jobs.max_pending_per_tenant`` applies
        (:class:`JobQuotaError`); the sidecar's own follow-up jobs are neither."""
        job_kind = self.kinds[kind]
        if caller:
            job_kind.check_options(params)
        quota = self.config.jobs.max_pending_per_tenant if caller else None
        job = self.queue.submit(incident_id, kind, tenant=tenant, params=params,
                                request_id=request_id, quota=quota)
        self._report_counts()
        self._wake.set()
        return job

    def get(self, job_id: str, *, tenant: str | None = None) -> JobRecord | None:
        return self.queue.get(job_id, tenant=tenant)

    def list_for(self, incident_id: str, *, tenant: str | None = None) -> list[JobRecord]:
        return self.queue.list_for(incident_id, tenant=tenant)

    def counts(self) -> dict[str, int]:
        return self.queue.counts()

    def wait(self, job_id: str, *, timeout_s: float = 60.0) -> JobRecord:
        """Block until the job is done or failed (or the timeout passes); returns its record."""
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.get(job_id)
            if job is None:
                raise SidecarError(f"job {job_id} does not exist")
            if job.state in ("done", "failed") or time.monotonic() >= deadline:
                return job
            with self._changed:
                self._changed.wait(0.05)

    # -- dispatch ----------------------------------------------------------------------------

    def _dispatch(self) -> None:
        renewed = time.monotonic()
        while not self._stopping.is_set():
            try:
                if self.queue.lease_s is not None and \
                        time.monotonic() - renewed >= self.queue.lease_s / 6:
                    with self._db():   # a shared catalog: keep our jobs, resume dead owners'
                        with self._inflight_lock:
                            running = set(self._running_ids)
                        self.queue.heartbeat(running)
                        self.queue.resume()
                    renewed = time.monotonic()
                while self._inflight < self.workers and not self._stopping.is_set():
                    with self._db():
                        job = self.queue.claim()
                        if job is None:
                            break
                        self._start(job)
            except _Stopped:
                return
            except CatalogUnavailableError as e:   # a shared catalog is down: wait for it
                log.warning("job dispatcher: %s", e)
            except Exception:   # keep dispatching; the index error is logged
                log.exception("job dispatcher error")
            self._wake.wait(self.config.jobs.poll_interval_s)
            self._wake.clear()

    def _start(self, job: JobRecord) -> None:
        self._report_counts()
        with self._inflight_lock:
            self._inflight += 1
            self._running_ids.add(job.id)
        threading.Thread(target=self._run, args=(job,), name=f"forensics-job-{job.kind}",
                         daemon=True).start()

    @contextlib.contextmanager
    def _db(self) -> Iterator[None]:
        """Index access from runner threads: serialised with :meth:`stop`, refused once stopped
        (the store may be closed then; an unfinished job is resumed at the next start)."""
        with self._db_lock:
            if self._closed:
                raise _Stopped
            yield

    # -- one attempt -------------------------------------------------------------------------

    def _run(self, job: JobRecord) -> None:
        t0 = time.monotonic()
        if job.attempts == 1 and job.started_at is not None:
            self.telemetry.observe(JOB_QUEUE_WAIT, (job.started_at - job.created_at).total_seconds(),
                                   labels={"kind": job.kind})
        try:
            with self._db():
                row = self.store.get(job.incident_id, tenant=job.tenant)
            traceparent = row.traceparent if row is not None else None
            host = RunnerHost(self.store, config=self.config, job=job, submit=self.submit,
                              telemetry=self.telemetry, traceparent=traceparent)
            with self.telemetry.span(f"job.{job.kind}", traceparent=traceparent,
                                     attributes=_span_attributes(job)) as span:
                state, result, error = self._attempt(job, host, found=row is not None)
                # Recorded and followed up inside the span: a metric the kind observes in
                # ``after`` gets this trace as exemplar when the request had no traceparent.
                state = self._conclude_when_reachable(job, host, state, result, error)
                span.set_attribute("forensics.job.state", state)
            self.telemetry.observe(JOB_DURATION, time.monotonic() - t0,
                                   labels={"kind": job.kind})
            self.telemetry.observe(JOBS_FINISHED, labels={"kind": job.kind, "state": state})
        except _Stopped:
            log.info("job %s (%s) left running at shutdown; it is resumed at the next start",
                     job.id, job.kind)
        except Exception:
            log.exception("could not record the outcome of job %s", job.id)
        finally:
            with contextlib.suppress(_Stopped), self._db():
                self._report_counts()
            with self._inflight_lock:
                self._inflight -= 1
                self._running_ids.discard(job.id)
            self._wake.set()
            with self._changed:
                self._changed.notify_all()

    def _attempt(self, job: JobRecord, host: RunnerHost, *,
                 found: bool) -> tuple[str, dict[str, Any] | None, str | None]:
        """Prepare and run one attempt: (state, result, error)."""
        state, result, error = "failed", None, None
        try:
            if not found:
                raise JobFailed(f"incident {job.incident_id} no longer exists")
            result = self._execute(job, host)
            state = "done"
        except _Stopped:
            raise
        except JobFailed as e:
            error = str(e)
            state = "pending" if e.retryable and job.attempts < job.max_attempts else "failed"
        except (IncidentFormatError, ArtefactError, UnknownJobKindError) as e:
            error = f"{type(e).__name__}: {e}"
        except Exception as e:   # a bug or a transient failure: retry, then fail
            log.exception("job %s (%s) failed", job.id, job.kind)
            error = f"{type(e).__name__}: {e}"
            state = "pending" if job.attempts < job.max_attempts else "failed"
        return state, result, error

    def _execute(self, job: JobRecord, host: RunnerHost) -> dict[str, Any]:
        kind = self.kinds[job.kind]
        executor = self._on_sidecar if kind.on_sidecar(self.config) else self._executor
        # A remote attempt gets references (URI + digest) its worker fetches and checks.
        host.portable = executor.remote
        params = {**self.config.jobs.params.get(job.kind, {}), **json.loads(job.params_json)}
        if kind.prepare is not None:
            with self._db():
                params = kind.prepare(host, job, params)
        ctx = JobContext(job_id=job.id, incident_id=job.incident_id, kind=job.kind,
                         attempt=job.attempts, params=params,
                         incident_path=host.incident_path(job.incident_id), config=self.config,
                         tenant=job.tenant)
        return executor.run(kind.run, ctx, resources=kind.resources)

    def _conclude_when_reachable(self, job: JobRecord, host: RunnerHost, state: str,
                                 result: dict[str, Any] | None, error: str | None) -> str:
        """:meth:`_conclude`, retried while a shared catalog is unreachable (the attempt's
        result is kept, not recomputed); a stop meanwhile leaves the job to be resumed."""
        while True:
            try:
                return self._conclude(job, host, state, result, error)
            except CatalogUnavailableError as e:
                log.warning("job %s: cannot record its outcome yet (%s); retrying", job.id, e)
                if self._stopping.wait(max(self.config.jobs.poll_interval_s, 1.0)):
                    raise _Stopped from e

    def _conclude(self, job: JobRecord, host: RunnerHost, state: str,
                  result: dict[str, Any] | None, error: str | None) -> str:
        """Record the outcome (the kind's ``record`` in the same transaction), then the kind's
        ``after`` for a done job; a failing ``record`` fails the job, visibly. Returns the
        recorded state."""
        kind = self.kinds[job.kind] if state == "done" else None
        with self._db():
            try:
                self.queue.finish(job, state, result, error,
                                  record=kind.record if kind is not None else None)
            except CatalogUnavailableError:   # not the result's fault: recorded once it answers
                raise
            except Exception as e:   # e.g. a result table rejected the row
                log.exception("recording the result of job %s failed", job.id)
                state, kind = "failed", None
                self.queue.finish(job, state, None, f"recording the result failed: "
                                                    f"{type(e).__name__}: {e}")
            if kind is not None and kind.after is not None and result is not None:
                try:
                    kind.after(host, job, result)
                except Exception:
                    log.exception("follow-up of job %s (%s) failed", job.id, job.kind)
        return state

    def _report_counts(self) -> None:
        with self._counts_lock:   # read + report as one step: the last report is the newest
            try:
                for state, n in self.counts().items():
                    self.telemetry.observe(JOBS, n, labels={"state": state})
            except Exception:
                log.exception("could not report job counts")


def _span_attributes(job: JobRecord) -> dict[str, Any]:
    """The attributes of a ``job.<kind>`` span."""
    return {"forensics.incident.id": job.incident_id, "forensics.incident.tenant": job.tenant,
            "forensics.job.kind": job.kind, "forensics.job.id": job.id,
            "forensics.job.attempt": job.attempts}
