"""Analysis jobs: persisted in DuckDB, run by a bounded worker pool, resumed after a restart.

A job kind is a function ``fn(ctx: JobContext) -> dict`` (JSON-able result) registered by name.
The context is plain data (paths, params, config) so the executor seam can be a thread pool
(default), a process pool, or Ray tasks later (DESIGN §12). States: pending → running → done |
failed; a retryable failure goes back to pending until ``max_attempts``. On start, jobs left
``running`` by a crash are pending again (or failed once their attempts are used up).

Example::

    runner = JobRunner(store, config=cfg)
    runner.start()
    job = runner.submit("inc-1", "stats", tenant="acme")
    runner.wait(job.id, timeout_s=30).state      # "done"
    runner.stop()
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import datetime as dt
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from integrations.errors import IncidentFormatError, SidecarError

from ._hooks import JOB_STATES, Telemetry, as_telemetry
from ._store_index import utcnow

if TYPE_CHECKING:
    from integrations.incident import Incident

    from ._config import SidecarConfig
    from ._store import IncidentStore

__all__ = [
    "JobContext",
    "JobFailed",
    "JobRecord",
    "JobRunner",
    "UnknownJobKindError",
    "execute_job",
    "job_kinds",
    "register_job_kind",
]

log = logging.getLogger("sidecar.jobs")

JobFn = Callable[["JobContext"], Mapping[str, Any]]
_KINDS: dict[str, JobFn] = {}
_KINDS_LOCK = threading.Lock()


class JobFailed(SidecarError):
    """Raised by a job kind: the message is the job's recorded error."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class UnknownJobKindError(SidecarError, ValueError):
    """No job kind of that name is registered."""


def register_job_kind(name: str, fn: JobFn | None = None, *,
                      replace: bool = False) -> Any:
    """Register ``fn`` as job kind ``name`` (also usable as a decorator)."""
    def deco(f: JobFn) -> JobFn:
        with _KINDS_LOCK:
            if name in _KINDS and not replace and _KINDS[name] is not f:
                raise ValueError(f"job kind {name!r} is already registered; pass replace=True")
            _KINDS[name] = f
        return f
    return deco(fn) if fn is not None else deco


def _builtin() -> None:
    from . import _kinds  # noqa: F401  (registers "stats" and "replay")


def job_kinds() -> list[str]:
    """Registered job kind names, sorted."""
    _builtin()
    with _KINDS_LOCK:
        return sorted(_KINDS)


def _kind(name: str) -> JobFn:
    _builtin()
    with _KINDS_LOCK:
        fn = _KINDS.get(name)
    if fn is None:
        raise UnknownJobKindError(f"unknown analysis kind {name!r}; registered kinds: "
                                  f"{', '.join(sorted(_KINDS))}")
    return fn


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
    result = dict(_kind(ctx.kind)(ctx))
    json.dumps(result, allow_nan=False)   # fail here, not when storing
    return result


@dataclasses.dataclass(frozen=True)
class JobRecord:
    """One row of the ``jobs`` table (+ its result once done)."""

    id: str
    incident_id: str
    tenant: str
    kind: str
    state: str
    attempts: int
    max_attempts: int
    error: str | None
    params_json: str
    request_id: str | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    result_json: str | None = None

    @property
    def result(self) -> dict[str, Any] | None:
        return None if self.result_json is None else dict(json.loads(self.result_json))


_JOB_SELECT = ("SELECT j.id, j.incident_id, j.tenant, j.kind, j.state, j.attempts, "
               "j.max_attempts, j.error, j.params_json, j.request_id, j.created_at, j.started_at, "
               "j.finished_at, a.result_json FROM jobs j LEFT JOIN analyses a ON a.job_id = j.id")


class JobRunner:
    """Claims pending jobs from the index and runs at most ``workers`` at a time."""

    def __init__(self, store: IncidentStore, *, config: SidecarConfig,
                 telemetry: Telemetry | None = None, executor: cf.Executor | None = None) -> None:
        self.store = store
        self.config = config
        self.telemetry = as_telemetry(telemetry)
        self.workers = config.jobs.workers
        self._executor = executor or cf.ThreadPoolExecutor(
            max_workers=self.workers, thread_name_prefix="forensics-job")
        self._own_executor = executor is None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._changed = threading.Condition()
        self._inflight = 0
        self._inflight_lock = threading.Lock()
        self._counts_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Resume interrupted jobs and start dispatching."""
        now = utcnow()
        with self.store.index.write() as con:
            con.execute("UPDATE jobs SET state = 'failed', finished_at = ?, error = "
                        "'interrupted ' || attempts || ' time(s) (sidecar stopped while running); "
                        "giving up — run the analysis again' "
                        "WHERE state = 'running' AND attempts >= max_attempts", [now])
            con.execute("UPDATE jobs SET state = 'pending' WHERE state = 'running'")
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
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # -- API ---------------------------------------------------------------------------------

    def submit(self, incident_id: str, kind: str, *, tenant: str,
               params: Mapping[str, Any] | None = None,
               request_id: str | None = None) -> JobRecord:
        """Enqueue a job (state pending). With ``request_id``, the same (incident, key) returns
        the existing job instead of a new one."""
        _kind(kind)
        params_json = json.dumps(dict(params or {}), sort_keys=True, allow_nan=False)
        job_id = f"job-{uuid.uuid4().hex}"
        with self.store.index.write() as con:
            found = None
            if request_id:
                found = con.execute("SELECT id FROM jobs WHERE incident_id = ? AND "
                                    "request_id = ?", [incident_id, request_id]).fetchone()
            if found:
                job_id = found[0]
            else:
                con.execute(
                    "INSERT INTO jobs (id, incident_id, tenant, kind, state, attempts, "
                    "max_attempts, error, params_json, request_id, created_at) "
                    "VALUES (?, ?, ?, ?, 'pending', 0, ?, NULL, ?, ?, ?)",
                    [job_id, incident_id, tenant, kind, self.config.jobs.max_attempts,
                     params_json, request_id or None, utcnow()])
        self._report_counts()
        self._wake.set()
        job = self.get(job_id)
        assert job is not None
        return job

    def get(self, job_id: str, *, tenant: str | None = None) -> JobRecord | None:
        rows = self.store.index.read_dicts(f"{_JOB_SELECT} WHERE j.id = ?", [job_id])
        if not rows or (tenant is not None and rows[0]["tenant"] != tenant):
            return None
        return JobRecord(**rows[0])

    def list_for(self, incident_id: str, *, tenant: str | None = None) -> list[JobRecord]:
        sql = f"{_JOB_SELECT} WHERE j.incident_id = ?"
        params: list[Any] = [incident_id]
        if tenant is not None:
            sql += " AND j.tenant = ?"
            params.append(tenant)
        rows = self.store.index.read_dicts(sql + " ORDER BY j.created_at DESC, j.id", params)
        return [JobRecord(**r) for r in rows]

    def counts(self) -> dict[str, int]:
        found = dict(self.store.index.read("SELECT state, count(*) FROM jobs GROUP BY state"))
        return {s: int(found.get(s, 0)) for s in JOB_STATES}

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

    # -- internals ---------------------------------------------------------------------------

    def _claim(self) -> JobRecord | None:
        with self.store.index.write() as con:
            row = con.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, started_at = ?, "
                "finished_at = NULL WHERE id = (SELECT id FROM jobs WHERE state = 'pending' "
                "ORDER BY created_at, id LIMIT 1) RETURNING id", [utcnow()]).fetchone()
        return None if row is None else self.get(row[0])

    def _dispatch(self) -> None:
        while not self._stopping.is_set():
            try:
                while self._inflight < self.workers and not self._stopping.is_set():
                    job = self._claim()
                    if job is None:
                        break
                    self._start(job)
            except Exception:   # keep dispatching; the index error is logged
                log.exception("job dispatcher error")
            self._wake.wait(self.config.jobs.poll_interval_s)
            self._wake.clear()

    def _start(self, job: JobRecord) -> None:
        self._report_counts()
        with self._inflight_lock:
            self._inflight += 1
        threading.Thread(target=self._run, args=(job,), name=f"forensics-job-{job.kind}",
                         daemon=True).start()

    def _run(self, job: JobRecord) -> None:
        row = self.store.get(job.incident_id)
        t0 = time.monotonic()
        state, result, error = "failed", None, None
        traceparent = row.traceparent if row is not None else None
        try:
            with self.telemetry.span(f"job.{job.kind}", traceparent=traceparent,
                                     attributes={"forensics.incident.id": job.incident_id,
                                                 "forensics.job.id": job.id,
                                                 "forensics.job.attempt": job.attempts}) as span:
                try:
                    if row is None:
                        raise JobFailed(f"incident {job.incident_id} no longer exists")
                    ctx = JobContext(job_id=job.id, incident_id=job.incident_id, kind=job.kind,
                                     attempt=job.attempts, params=json.loads(job.params_json),
                                     incident_path=self.store.path(job.incident_id),
                                     config=self.config)
                    result = self._executor.submit(execute_job, ctx).result()
                    state = "done"
                except JobFailed as e:
                    error = str(e)
                    state = "pending" if e.retryable and job.attempts < job.max_attempts else "failed"
                except (IncidentFormatError, UnknownJobKindError) as e:
                    error = f"{type(e).__name__}: {e}"
                except Exception as e:   # a bug or a transient failure: retry, then fail
                    log.exception("job %s (%s) failed", job.id, job.kind)
                    error = f"{type(e).__name__}: {e}"
                    state = "pending" if job.attempts < job.max_attempts else "failed"
                span.set_attribute("forensics.job.state", state)
            self._finish(job, state, result, error)
            if result is not None and isinstance(result.get("anomaly_score"), int | float):
                self.telemetry.on_anomaly_score(float(result["anomaly_score"]),
                                                traceparent=traceparent)
            self.telemetry.on_job_finished(job.kind, state, time.monotonic() - t0)
        except Exception:
            log.exception("could not record the outcome of job %s", job.id)
        finally:
            self._report_counts()
            with self._inflight_lock:
                self._inflight -= 1
            self._wake.set()
            with self._changed:
                self._changed.notify_all()

    def _finish(self, job: JobRecord, state: str, result: dict[str, Any] | None,
                error: str | None) -> None:
        now = utcnow()
        with self.store.index.write() as con:
            con.execute("UPDATE jobs SET state = ?, error = ?, finished_at = ? WHERE id = ?",
                        [state, error, None if state == "pending" else now, job.id])
            if state == "done" and result is not None:
                con.execute("DELETE FROM analyses WHERE job_id = ?", [job.id])
                con.execute("INSERT INTO analyses (job_id, incident_id, kind, result_json, "
                            "created_at) VALUES (?, ?, ?, ?, ?)",
                            [job.id, job.incident_id, job.kind,
                             json.dumps(result, allow_nan=False), now])

    def _report_counts(self) -> None:
        with self._counts_lock:   # read + report as one step: the last report is the newest
            try:
                self.telemetry.set_job_counts(self.counts())
            except Exception:
                log.exception("could not report job counts")
