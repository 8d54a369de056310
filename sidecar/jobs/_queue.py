"""The persistent job queue: the ``jobs`` and ``analyses`` tables of the store's catalog.

States: pending → running → done | failed; a retryable failure goes back to pending until
``max_attempts``. :meth:`JobQueue.resume` makes jobs left ``running`` by a crash pending again,
or failed once their attempts are used up: with a catalog of its own (DuckDB) every running job
at start-up; with a catalog shared by several sidecars (PostgreSQL) only jobs whose owner has not
sent a :meth:`JobQueue.heartbeat` for ``lease_s`` (a dead sidecar's), checked at start and
periodically by the runner. A claim takes the row with ``FOR UPDATE SKIP LOCKED`` on a shared
catalog, so two sidecars never claim the same job. Timestamps come from ``clock``
(injectable: tests pass explicit times instead of waiting for the wall clock to move).

Example::

    queue = JobQueue(store.index, max_attempts=3)
    job = queue.submit("inc-1", "stats", tenant="acme")
    claimed = queue.claim()                 # the oldest pending job, now running
    queue.finish(claimed, "done", {"n": 1}, None)
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import uuid
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any

from integrations.errors import SidecarError

from .._store_index import utcnow

if TYPE_CHECKING:
    from .._catalog import Catalog

__all__ = ["JOB_LEASE_S", "JOB_STATES", "JobQueue", "JobQuotaError", "JobRecord"]

#: On a shared catalog: a running job whose owner sent no heartbeat for this long is resumed
#: by another sidecar (owners heartbeat every ``JOB_LEASE_S / 6``).
JOB_LEASE_S = 60.0

#: Job states (label values of ``forensics_jobs{state}``).
JOB_STATES = ("pending", "running", "done", "failed")


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


class JobQuotaError(SidecarError):
    """The tenant already has ``jobs.max_pending_per_tenant`` analyses waiting or running."""


def _check_quota(con: Any, tenant: str, quota: int) -> None:
    """:class:`JobQuotaError` when ``tenant`` has ``quota`` jobs pending or running."""
    (n,) = con.execute("SELECT count(*) FROM jobs WHERE tenant = ? AND state IN "
                       "('pending', 'running')", [tenant]).fetchone()
    if n >= quota:
        raise JobQuotaError(f"{n} analyses of this tenant are already waiting or running "
                            f"(jobs.max_pending_per_tenant = {quota}); wait for some to finish, "
                            "then submit again")


class JobQueue:
    """Jobs persisted in ``index`` (survive restarts); every method is one transaction.
    ``owner`` names this sidecar in the jobs it claims; ``lease_s`` (default
    :data:`JOB_LEASE_S` on a shared catalog, None otherwise) see the module doc."""

    def __init__(self, index: Catalog, *, max_attempts: int,
                 clock: Callable[[], dt.datetime] = utcnow, owner: str | None = None,
                 lease_s: float | None = None) -> None:
        self.index = index
        self.max_attempts = max_attempts
        self.clock = clock
        self.owner = owner or f"sidecar-{uuid.uuid4().hex[:12]}"
        self.lease_s = lease_s if lease_s is not None or not index.shared else JOB_LEASE_S
        self._lock_rows = " FOR UPDATE OF p SKIP LOCKED" if index.shared else ""

    def resume(self) -> int:
        """Jobs left running by a stopped or crashed sidecar are pending again, or failed
        when their attempts are used up: every running job (own catalog), or those whose
        owner's lease ran out (shared catalog). How many were running."""
        where, params = "state = 'running'", []
        if self.lease_s is not None:
            where += " AND (heartbeat_at IS NULL OR heartbeat_at < ?)"
            params = [self.clock() - dt.timedelta(seconds=self.lease_s)]
        with self.index.write() as con:
            con.execute("UPDATE jobs SET state = 'failed', finished_at = ?, error = "
                        "'interrupted ' || attempts || ' time(s) (sidecar stopped while running); "
                        "giving up — run the analysis again' "
                        f"WHERE {where} AND attempts >= max_attempts", [self.clock(), *params])
            found = con.execute(f"UPDATE jobs SET state = 'pending', owner = NULL WHERE {where} "
                                "RETURNING id", params).fetchall()
        return len(found)

    def heartbeat(self, job_ids: Collection[str]) -> None:
        """This sidecar still runs these jobs it claimed (shared catalogs: renews their lease).
        Only the attempts really in flight: a job whose runner gave up on it (its outcome could
        not be recorded) loses its lease and is resumed, here or by another sidecar."""
        ids = sorted(job_ids)
        if not ids:
            return
        with self.index.write() as con:
            con.execute("UPDATE jobs SET heartbeat_at = ? WHERE owner = ? AND state = 'running' "
                        f"AND id IN ({', '.join('?' * len(ids))})", [self.clock(), self.owner,
                                                                       *ids])

    def submit(self, incident_id: str, kind: str, *, tenant: str,
               params: Mapping[str, Any] | None = None,
               request_id: str | None = None, quota: int | None = None) -> JobRecord:
        """Enqueue a pending job; with ``request_id`` the same (tenant, incident, key) returns
        the existing job instead of a new one. ``quota``: a new job is refused
        (:class:`JobQuotaError`) while the tenant has that many pending or running."""
        params_json = json.dumps(dict(params or {}), sort_keys=True, allow_nan=False)
        with self.index.write() as con:
            self.index.lock(con, f"jobs:{tenant}")   # quota and request_id: one at a time
            found = con.execute("SELECT id FROM jobs WHERE incident_id = ? AND tenant = ? AND "
                                "request_id = ?", [incident_id, tenant, request_id]
                                ).fetchone() if request_id else None
            if found is None and quota is not None:
                _check_quota(con, tenant, quota)
            if found is None:
                job = JobRecord(
                    id=f"job-{uuid.uuid4().hex}", incident_id=incident_id, tenant=tenant,
                    kind=kind, state="pending", attempts=0, max_attempts=self.max_attempts,
                    error=None, params_json=params_json, request_id=request_id or None,
                    created_at=self.clock(), started_at=None, finished_at=None)
                con.execute(
                    "INSERT INTO jobs (id, incident_id, tenant, kind, state, attempts, "
                    "max_attempts, error, params_json, request_id, created_at) "
                    "VALUES (?, ?, ?, ?, 'pending', 0, ?, NULL, ?, ?, ?)",
                    [job.id, incident_id, tenant, kind, job.max_attempts, params_json,
                     job.request_id, job.created_at])
                return job   # a new job is returned as enqueued (pending)
        existing = self.get(found[0])
        assert existing is not None
        return existing

    def get(self, job_id: str, *, tenant: str | None = None) -> JobRecord | None:
        """A job (with its result), or None when absent or another tenant's."""
        rows = self.index.read_dicts(f"{_JOB_SELECT} WHERE j.id = ?", [job_id])
        if not rows or (tenant is not None and rows[0]["tenant"] != tenant):
            return None
        return JobRecord(**rows[0])

    def list_for(self, incident_id: str, *, tenant: str | None = None) -> list[JobRecord]:
        """An incident's jobs, newest first."""
        sql = f"{_JOB_SELECT} WHERE j.incident_id = ?"
        params: list[Any] = [incident_id]
        if tenant is not None:
            sql += " AND j.tenant = ?"
            params.append(tenant)
        rows = self.index.read_dicts(sql + " ORDER BY j.created_at DESC, j.id", params)
        return [JobRecord(**r) for r in rows]

    def counts(self) -> dict[str, int]:
        """Jobs per state (every state of :data:`JOB_STATES`)."""
        found = dict(self.index.read("SELECT state, count(*) FROM jobs GROUP BY state"))
        return {s: int(found.get(s, 0)) for s in JOB_STATES}

    def claim(self) -> JobRecord | None:
        """The next pending job, marked running (one more attempt); None when none. Fair
        between tenants: the oldest job of the tenant with the fewest jobs running, so one
        tenant's thousand queued jobs never stand in front of another tenant's one. On a
        shared catalog a row another sidecar is claiming is skipped, never claimed twice."""
        now = self.clock()
        with self.index.write() as con:
            row = con.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, started_at = ?, "
                "finished_at = NULL, owner = ?, heartbeat_at = ? WHERE id = (SELECT p.id FROM "
                "jobs p LEFT JOIN (SELECT tenant, count(*) AS n FROM jobs WHERE state = "
                "'running' GROUP BY tenant) r ON r.tenant = p.tenant WHERE p.state = 'pending' "
                f"ORDER BY coalesce(r.n, 0), p.created_at, p.id LIMIT 1{self._lock_rows}) "
                "AND state = 'pending' RETURNING id", [now, self.owner, now]).fetchone()
        return None if row is None else self.get(row[0])

    def finish(self, job: JobRecord, state: str, result: dict[str, Any] | None,
               error: str | None, *,
               record: Callable[[Any, JobRecord, dict[str, Any]], None] | None = None) -> None:
        """Record an attempt's outcome; a done job's result (and the result-table rows that
        ``record(con, job, result)`` writes: a kind's hook) in the same transaction. On a
        shared catalog only while this sidecar still owns the job (after a lost lease another
        sidecar's attempt owns it: this outcome is dropped)."""
        now = self.clock()
        mine, params = ("", []) if not self.index.shared else (" AND owner = ?", [self.owner])
        with self.index.write() as con:
            found = con.execute(f"UPDATE jobs SET state = ?, error = ?, finished_at = ? WHERE "
                                f"id = ?{mine} RETURNING id",
                                [state, error, None if state == "pending" else now, job.id,
                                 *params]).fetchall()
            if not found:
                return
            if state == "done" and result is not None:
                con.execute("DELETE FROM analyses WHERE job_id = ?", [job.id])
                con.execute("INSERT INTO analyses (job_id, incident_id, kind, result_json, "
                            "created_at) VALUES (?, ?, ?, ?, ?)",
                            [job.id, job.incident_id, job.kind,
                             json.dumps(result, allow_nan=False), now])
                if record is not None:
                    record(con, job, result)
