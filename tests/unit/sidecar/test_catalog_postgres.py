"""The shared PostgreSQL catalog against a real PostgreSQL server (``postgres_server``, one per
session; skipped, saying why, where none can start): the store, tenant scoping, job claims by
several sidecars, a dead sidecar's job resumed, the catalog going down and coming back."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import pytest

from integrations.errors import CatalogUnavailableError, ConfigError
from sidecar._catalog import open_catalog
from sidecar._catalog_postgres import PostgresCatalog, pg_ddl, pg_sql
from sidecar._config import SidecarConfig
from sidecar._store import LocalStore
from sidecar.jobs._queue import JobQueue
from tests.unit.sidecar.conftest import build_incident


def test_sql_translation_keeps_quoted_text() -> None:
    assert pg_sql("SELECT 1 FROM t WHERE a = ? AND b LIKE '%?' AND \"c?\" = ?") == \
        "SELECT 1 FROM t WHERE a = %s AND b LIKE '%%?' AND \"c?\" = %s"
    assert pg_ddl("x VARCHAR NOT NULL, y DOUBLE, z VARCHARS") == \
        'x TEXT COLLATE "C" NOT NULL, y DOUBLE PRECISION, z VARCHARS'


def test_config_selects_the_catalog_and_names_the_key(tmp_path: Path, pg_dsn: str) -> None:
    cfg = SidecarConfig.from_dict({"data_dir": str(tmp_path), "catalog": {
        "kind": "postgres", "dsn_env": "TEST_CATALOG_DSN", "connect_timeout_s": 2}})
    with pytest.raises(ConfigError, match=r"TEST_CATALOG_DSN \(catalog.dsn_env\)"):
        open_catalog(cfg, environ={})
    cat = open_catalog(cfg, environ={"TEST_CATALOG_DSN": pg_dsn})
    assert isinstance(cat, PostgresCatalog) and cat.shared
    cat.close()
    with pytest.raises(CatalogUnavailableError, match=r"unreachable.*catalog\.dsn_env"):
        open_catalog(cfg, environ={"TEST_CATALOG_DSN": "host=127.0.0.1 port=1 user=x"})
    assert not (tmp_path / "index.duckdb").exists()   # nothing embedded was opened


def test_store_on_postgres_is_tenant_scoped(tmp_path: Path, pg_dsn: str) -> None:
    with LocalStore(tmp_path / "data", catalog=PostgresCatalog(pg_dsn)) as store:
        data = build_incident("inc-1")
        assert store.put("inc-1", data, tenant="acme").created
        assert store.put("inc-1", build_incident("inc-1", seed=1), tenant="globex").created
        assert not store.put("inc-1", data, tenant="acme").created
        acme = store.get("inc-1", tenant="acme")
        assert acme is not None and acme.tenant == "acme" and acme.n_sites == 2
        assert store.get("inc-1", tenant="other") is None
        rows = store.index.query_incidents('"tenant" = ?', ["globex"], '"id" ASC', limit=10,
                                           offset=0)
        assert [(r.id, r.tenant) for r in rows] == [("inc-1", "globex")]
        assert store.delete("inc-1", tenant="acme")
        assert store.get("inc-1", tenant="acme") is None
        assert store.get("inc-1", tenant="globex") is not None


def _queues(dsn: str, n: int, **kw: object) -> list[JobQueue]:
    return [JobQueue(PostgresCatalog(dsn), max_attempts=3, owner=f"sc-{i}", **kw)  # type: ignore[arg-type]
            for i in range(n)]


def test_two_sidecars_never_claim_the_same_job(pg_dsn: str) -> None:
    queues = _queues(pg_dsn, 2)
    submitted = {queues[i % 2].submit(f"inc-{i}", "stats", tenant=f"t{i % 3}").id
                 for i in range(60)}
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(q: JobQueue) -> None:
        while (job := q.claim()) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker, args=(queues[i % 2],)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(submitted)     # each exactly once
    owners = dict(queues[0].index.read("SELECT owner, count(*) FROM jobs GROUP BY owner"))
    assert set(owners) <= {"sc-0", "sc-1"} and sum(owners.values()) == 60
    for q in queues:
        q.index.close()


def test_a_dead_sidecars_job_is_resumed_by_another(pg_dsn: str) -> None:
    now = [dt.datetime(2026, 1, 1, 12, 0, 0)]
    dead, alive = _queues(pg_dsn, 2, lease_s=60.0, clock=lambda: now[0])
    job = alive.submit("inc-1", "stats", tenant="acme")
    assert dead.claim() is not None                 # ... and then its sidecar dies
    assert alive.claim() is None
    now[0] += dt.timedelta(seconds=30)
    alive.heartbeat([])
    assert alive.resume() == 0                      # the lease has not run out yet
    now[0] += dt.timedelta(seconds=61)
    assert alive.resume() == 1
    again = alive.claim()
    assert again is not None and again.id == job.id and again.attempts == 2
    dead.finish(again, "done", {"late": True}, None)          # a lost lease: dropped
    assert alive.get(job.id).state == "running"  # type: ignore[union-attr]
    alive.finish(again, "done", {"n": 1}, None)
    assert alive.get(job.id).result == {"n": 1}  # type: ignore[union-attr]
    for q in (dead, alive):
        q.index.close()


def test_catalog_down_acknowledges_then_backfills(tmp_path: Path, postgres_server) -> None:  # type: ignore[no-untyped-def]
    dsn = postgres_server.create_database("down_backfill")
    store = LocalStore(tmp_path / "data", catalog=PostgresCatalog(dsn, connect_timeout_s=1),
                       backfill_interval_s=3600)   # passes run by hand below
    try:
        store.put("before", build_incident("before"), tenant="acme")
        postgres_server.stop()
        try:
            with pytest.raises(CatalogUnavailableError, match="retry queries later"):
                store.get("before", tenant="acme")
            data = build_incident("during")
            res = store.put("during", data, tenant="acme")
            assert res.created and res.deferred
            again = store.put("during", data, tenant="acme")
            assert not again.created                # idempotent from the file meanwhile
            assert store.backfill.pending() == [("acme", "during")]
            assert store.backfill.run_once() == 0   # still down: kept
        finally:
            postgres_server.start()
        announced = []
        store.backfill.listeners.append(announced.append)
        assert store.backfill.run_once() == 1
        assert [r.id for r in announced] == ["during"]
        assert store.backfill.pending() == []
        row = store.get("during", tenant="acme")
        assert row is not None and row.integrity == "verified"
    finally:
        store.close()


def test_every_result_table_hook_writes_on_postgres(tmp_path: Path, pg_dsn: str) -> None:
    """The kinds' ``record`` hooks (one SQL text for both engines) write their rows into the
    PostgreSQL catalog in the job's finish transaction, and delete removes them again."""
    from sidecar.jobs._baseline import record_baseline
    from sidecar.jobs._cca import record_cca
    from sidecar.jobs._probe import record_probe, record_probe_score

    with LocalStore(tmp_path / "data", catalog=PostgresCatalog(pg_dsn)) as store:
        store.put("inc-1", build_incident("inc-1"), tenant="acme")
        queue = JobQueue(store.index, max_attempts=1)
        results = {
            "cca": (record_cca, {"status": "found", "fix_set": {
                "flip": True, "interventions": [{"site": "blocks.0.mlp", "kind": "zero"}],
                "one_minimal": True, "flip_rate": 1.0, "flip_rate_ci": [0.7, 1.0],
                "p_value": 0.01, "side_effects": {"mean_kl": 0.1, "top1_agreement": 0.9},
                "forward_passes": 12, "exhaustive_forward_passes": 64, "strategy": "greedy",
                "intervention_kind": "zero", "necessity": [
                    {"site": "blocks.0.mlp", "metric_without": 0.2, "delta": -0.5,
                     "flips_without": False}]}}),
            "baseline": (record_baseline, {
                "scope": "tenant:acme", "fingerprint": "f" * 64, "detector": "cf", "version": 1,
                "path": "baselines/x.npz", "model_name": "tiny", "sample_count": 30,
                "sites": ["blocks.0.resid_post"], "incident_ids": ["inc-1"]}),
            "probe": (record_probe, {
                "status": "trained", "tenant": "acme", "model_fingerprint": "f" * 64,
                "version": 1, "site": "blocks.0.resid_post", "path": "probes/p.json",
                "quality": {"auroc": 0.9, "auroc_ci": [0.8, 0.95], "tpr_at_1pct_fpr": 0.5,
                            "n_pos": 10, "n_neg": 12, "folds": 5}, "scores": {"inc-1": 0.25}}),
            "probe_score": (record_probe_score, {"status": "scored", "failure_p": 0.75}),
        }
        for kind, (record, result) in results.items():
            queue.submit("inc-1", kind, tenant="acme")
            job = queue.claim()
            assert job is not None and job.kind == kind
            queue.finish(job, "done", result, None, record=record)
        counts = {t: store.index.read(f"SELECT count(*) FROM {t}")[0][0]
                  for t in ("cca_results", "cca_interventions", "baselines", "probes")}
        assert counts == {"cca_results": 1, "cca_interventions": 1, "baselines": 1, "probes": 1}
        row = store.get("inc-1", tenant="acme")
        assert row is not None and row.failure_p == 0.75
        assert store.delete("inc-1", tenant="acme")
        assert store.index.read("SELECT count(*) FROM cca_results")[0][0] == 0


def test_a_sidecar_starting_does_not_lock_the_shared_tables(pg_dsn: str) -> None:
    """Opening the catalog again (every sidecar start) while a reader holds a transaction on
    ``incidents`` neither waits for nor takes the tables' exclusive lock (no-op migrations are
    skipped): with a 2 s lock timeout an ``ALTER TABLE`` would fail here."""
    import psycopg

    PostgresCatalog(pg_dsn).close()
    with psycopg.connect(pg_dsn) as reader:
        reader.execute("SELECT count(*) FROM incidents").fetchone()   # transaction stays open
        PostgresCatalog(f"{pg_dsn} options='-c lock_timeout=2000'").close()
        reader.rollback()


def test_a_running_sidecar_resumes_a_dead_ones_job(tmp_path: Path, pg_dsn: str) -> None:
    """The runner renews its own leases and resumes a silent owner's job by itself (no
    restart): a job claimed by a sidecar that then died is run to the end by another."""
    from sidecar.jobs import JobRunner, builtin_kinds

    cfg = SidecarConfig.from_dict({"data_dir": str(tmp_path / "data"),
                                   "jobs": {"poll_interval_s": 0.05, "lease_s": 1}})
    with LocalStore(cfg.data_dir, catalog=PostgresCatalog(pg_dsn)) as store:
        store.put("inc-1", build_incident("inc-1"), tenant="acme")
        dead = JobQueue(PostgresCatalog(pg_dsn), max_attempts=3, owner="dead-sidecar")
        job = dead.submit("inc-1", "stats", tenant="acme")
        assert dead.claim() is not None          # ... and its sidecar is never heard of again
        dead.index.close()
        runner = JobRunner(store, config=cfg, kinds=builtin_kinds())
        assert runner.queue.lease_s == 1         # jobs.lease_s (default 60 s)
        runner.start()
        try:
            done = runner.wait(job.id, timeout_s=30)
        finally:
            runner.stop()
        assert done.state == "done" and done.attempts == 2, done.error
        assert store.index.read("SELECT owner FROM jobs WHERE id = ?", [job.id]) == \
            [(runner.queue.owner,)]


def test_only_attempts_in_flight_keep_their_lease(pg_dsn: str) -> None:
    """A job its own sidecar gave up on (its outcome could not be recorded) must not be kept
    alive by that sidecar's heartbeat: its lease runs out and it is resumed."""
    now = [dt.datetime(2026, 1, 1, 12, 0, 0)]
    (q,) = _queues(pg_dsn, 1, lease_s=60.0, clock=lambda: now[0])
    running, orphan = (q.submit(f"inc-{i}", "stats", tenant="acme") for i in (1, 2))
    assert q.claim() is not None and q.claim() is not None
    for _ in range(3):                              # three minutes of heartbeats
        now[0] += dt.timedelta(seconds=59)
        q.heartbeat([running.id])
    assert q.resume() == 1                          # the orphan only
    states = {j: q.get(j).state for j in (running.id, orphan.id)}  # type: ignore[union-attr]
    assert states == {running.id: "running", orphan.id: "pending"}
    q.index.close()


_ENTERED, _RELEASE = threading.Event(), threading.Event()


def _held(ctx: object) -> dict[str, int]:
    """A job attempt that ends when the test says so."""
    _ENTERED.set()
    _RELEASE.wait(30)
    return {"n": 7}


def test_an_outcome_reached_while_the_catalog_is_down_is_recorded_once_it_is_back(
        tmp_path: Path, pg_dsn: str, postgres_server) -> None:  # type: ignore[no-untyped-def]
    """The attempt finishes while PostgreSQL is stopped: its result is kept and recorded when
    the catalog answers again (before: logged, and the job stayed 'running' for good)."""
    import time

    from sidecar.jobs import JobKind, JobRunner

    cfg = SidecarConfig.from_dict({"data_dir": str(tmp_path / "d"),
                                   "jobs": {"poll_interval_s": 0.05, "workers": 1}})
    _ENTERED.clear()
    _RELEASE.clear()
    with LocalStore(tmp_path / "d", catalog=PostgresCatalog(pg_dsn)) as store:
        store.put("inc-1", build_incident("inc-1"), tenant="acme")
        runner = JobRunner(store, config=cfg, kinds=(JobKind("held", run=_held),))
        runner.start()
        try:
            job = runner.submit("inc-1", "held", tenant="acme")
            assert _ENTERED.wait(30)
            postgres_server.stop()
            try:
                _RELEASE.set()
                time.sleep(2.0)          # the attempt ends, its outcome cannot be recorded
            finally:
                postgres_server.start()
            done = runner.wait(job.id, timeout_s=30)
        finally:
            runner.stop()
    assert (done.state, done.attempts, done.result) == ("done", 1, {"n": 7})


def test_a_restarted_catalog_fails_one_call_then_reconnects(postgres_server) -> None:  # type: ignore[no-untyped-def]
    """After PostgreSQL restarts, every pooled connection is broken: the first call that meets
    one fails (UNAVAILABLE) and drops the others, so the next call reconnects — not one failed
    call per pooled connection (which, between an incident's index insert and its job insert,
    once left an acknowledged incident without its ingest analyses)."""
    cat = PostgresCatalog(postgres_server.create_database("restart_pool"), connect_timeout_s=1)
    try:
        with cat._conn(), cat._conn(), cat._conn():   # three connections, then pooled
            pass
        assert len(cat._idle) == 3
        postgres_server.stop()
        postgres_server.start()
        failures = 0
        for _ in range(3):
            try:
                assert cat.read("SELECT 1") == [(1,)]
            except CatalogUnavailableError:
                failures += 1
        assert failures == 1
    finally:
        cat.close()


def test_an_upload_indexed_by_another_sidecars_reconcile_still_counts_as_created(
        tmp_path: Path, pg_dsn: str) -> None:
    """Two sidecars on one catalog and one shared store: sidecar A's back-fill pass reconciles
    the store (indexing every file without a row) between sidecar B's publish of an upload
    and B's insert. B's insert then meets a row of the same bytes: the upload is still
    created (so B acknowledges it and enqueues its analyses) — it once failed, the client
    retried, found the row and got ``created=False``, and the incident never had its ingest
    job. The interleaving is forced by running A's reconcile inside B's publish."""
    from sidecar._incident_files_fs import files_for

    cfg = SidecarConfig.from_dict({"data_dir": str(tmp_path / "a"),
                                   "store": {"uri": (tmp_path / "shared").as_uri()}})
    (tmp_path / "shared").mkdir()

    def store(name: str) -> LocalStore:
        return LocalStore(tmp_path / name, catalog=PostgresCatalog(pg_dsn),
                          files=files_for(cfg.store, data_dir=tmp_path / name))

    with store("a") as a, store("b") as b:
        publish = b.files.publish

        def publish_then_reconcile(*args: object, **kwargs: object) -> None:
            publish(*args, **kwargs)   # type: ignore[arg-type]
            assert a.recover().indexed == 1          # A indexes B's file first

        b.files.publish = publish_then_reconcile    # type: ignore[method-assign]
        data = build_incident("raced")
        res = b.put("raced", data, tenant="acme")
        assert res.created and not res.deferred
        row = b.get("raced", tenant="acme")
        assert row is not None and row.sha256 == res.row.sha256
