"""Analysis jobs: persisted in DuckDB, run by a bounded worker pool, resumed after a restart.

Job kinds and their hooks are registered in :mod:`sidecar._job_registry` (re-exported here).
States: pending → running → done |
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
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from integrations.errors import IncidentFormatError, SidecarError

from ._hooks import JOB_STATES, Telemetry, as_telemetry
from ._job_registry import (
    AfterFn,
    JobContext,
    JobFailed,
    JobFn,
    JobKind,
    PrepareFn,
    RecordFn,
    UnknownJobKindError,
    _Stopped,
    execute_job,
    job_kind,
    job_kinds,
    register_job_kind,
)
from ._store_index import utcnow

if TYPE_CHECKING:

    from ._config import SidecarConfig
    from ._store import IncidentStore

__all__ = [
    "AfterFn",
    "JobContext",
    "JobFailed",
    "JobFn",
    "JobKind",
    "JobRecord",
    "JobRunner",
    "PrepareFn",
    "RecordFn",
    "UnknownJobKindError",
    "execute_job",
    "job_kind",
    "job_kinds",
    "register_job_kind",
]

log = logging.getLogger("sidecar.jobs")

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
        self._db_lock = threading.RLock()
        self._closed = False
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
        with self._db_lock:   # no runner thread touches the index after this
            self._closed = True
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # -- API ---------------------------------------------------------------------------------

    def submit(self, incident_id: str, kind: str, *, tenant: str,
               params: Mapping[str, Any] | None = None,
               request_id: str | None = None) -> JobRecord:
        """Enqueue a job (state pending). With ``request_id``, the same (incident, key) returns
        the existing job instead of a new one."""
        job_kind(kind)
        params_json = json.dumps(dict(params or {}), sort_keys=True, allow_nan=False)
        job_id = f"job-{uuid.uuid4().hex}"
        created: JobRecord | None = None
        with self.store.index.write() as con:
            found = None
            if request_id:
                found = con.execute("SELECT id FROM jobs WHERE incident_id = ? AND "
                                    "request_id = ?", [incident_id, request_id]).fetchone()
            if found:
                job_id = found[0]
            else:
                created = JobRecord(
                    id=job_id, incident_id=incident_id, tenant=tenant, kind=kind,
                    state="pending", attempts=0, max_attempts=self.config.jobs.max_attempts,
                    error=None, params_json=params_json, request_id=request_id or None,
                    created_at=utcnow(), started_at=None, finished_at=None)
                con.execute(
                    "INSERT INTO jobs (id, incident_id, tenant, kind, state, attempts, "
                    "max_attempts, error, params_json, request_id, created_at) "
                    "VALUES (?, ?, ?, ?, 'pending', 0, ?, NULL, ?, ?, ?)",
                    [job_id, incident_id, tenant, kind, created.max_attempts, params_json,
                     created.request_id, created.created_at])
        self._report_counts()
        self._wake.set()
        job = created or self.get(job_id)   # a new job is returned as enqueued (pending)
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
                    with self._db():
                        job = self._claim()
                        if job is None:
                            break
                        self._start(job)
            except _Stopped:
                return
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

    @contextlib.contextmanager
    def _db(self) -> Iterator[None]:
        """Index access from runner threads: serialised with :meth:`stop`, refused once stopped
        (the store may be closed then; an unfinished job is resumed at the next start)."""
        with self._db_lock:
            if self._closed:
                raise _Stopped
            yield

    def _run(self, job: JobRecord) -> None:
        t0 = time.monotonic()
        state, result, error = "failed", None, None
        try:
            with self._db():
                row = self.store.get(job.incident_id)
            traceparent = row.traceparent if row is not None else None
            with self.telemetry.span(f"job.{job.kind}", traceparent=traceparent,
                                     attributes={"forensics.incident.id": job.incident_id,
                                                 "forensics.incident.tenant": job.tenant,
                                                 "forensics.job.kind": job.kind,
                                                 "forensics.job.id": job.id,
                                                 "forensics.job.attempt": job.attempts}) as span:
                try:
                    if row is None:
                        raise JobFailed(f"incident {job.incident_id} no longer exists")
                    kind = job_kind(job.kind)
                    params = json.loads(job.params_json)
                    if kind.prepare is not None:
                        with self._db():
                            params = kind.prepare(self, job, params)
                    ctx = JobContext(job_id=job.id, incident_id=job.incident_id, kind=job.kind,
                                     attempt=job.attempts, params=params,
                                     incident_path=self.store.path(job.incident_id),
                                     config=self.config)
                    result = self._executor.submit(execute_job, ctx).result()
                    state = "done"
                except _Stopped:
                    raise
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
            with self._db():
                try:
                    self._finish(job, state, result, error)
                except Exception as e:   # e.g. a result table rejected the row: fail, visibly
                    log.exception("recording the result of job %s failed", job.id)
                    state, result = "failed", None
                    self._finish(job, state, None, f"recording the result failed: "
                                                   f"{type(e).__name__}: {e}")
                if state == "done" and result is not None:
                    self._observe(result, traceparent)
                    self._after(job, result)
            self.telemetry.on_job_finished(job.kind, state, time.monotonic() - t0)
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
            self._wake.set()
            with self._changed:
                self._changed.notify_all()

    def _after(self, job: JobRecord, result: dict[str, Any]) -> None:
        after = job_kind(job.kind).after
        if after is None:
            return
        try:
            after(self, job, result)
        except Exception:
            log.exception("follow-up of job %s (%s) failed", job.id, job.kind)

    def _observe(self, result: Mapping[str, Any], traceparent: str | None) -> None:
        """Report a finished job's measured numbers: ``anomaly_score`` and ``anomaly_p``
        (numbers; absent or None when there was nothing to score) and ``fix_set_size`` (an
        int)."""
        score = result.get("anomaly_score")
        if isinstance(score, int | float) and not isinstance(score, bool):
            self.telemetry.on_anomaly_score(float(score), traceparent=traceparent)
        p = result.get("anomaly_p")
        if isinstance(p, int | float) and not isinstance(p, bool):
            self.telemetry.on_anomaly_p(float(p), traceparent=traceparent)
        size = result.get("fix_set_size")
        if isinstance(size, int) and not isinstance(size, bool):
            self.telemetry.on_fix_set_size(size, traceparent=traceparent)

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
                record = job_kind(job.kind).record
                if record is not None:
                    record(con, job, result)

    def _report_counts(self) -> None:
        with self._counts_lock:   # read + report as one step: the last report is the newest
            try:
                self.telemetry.set_job_counts(self.counts())
            except Exception:
                log.exception("could not report job counts")
