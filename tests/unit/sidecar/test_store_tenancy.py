"""Incident ids are unique per tenant (DESIGN §10), in the store: key, layout, reindex, and
the migration of a data directory of the old flat layout (against real files and DuckDB)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import duckdb
import pytest

from sidecar._store import AlreadyExistsError, AmbiguousIncidentError, LocalStore
from sidecar._store_layout import is_tenant_dir, stored_path, tenant_dir
from sidecar._store_recovery import ReindexReport

Make = Callable[..., bytes]
HASHED = "Globex Corp"      # not a plain lowercase name: its directory is a hash


def _files(root: Path) -> list[str]:
    inc = root / "incidents"
    return sorted(p.relative_to(inc).as_posix() for p in inc.rglob("*") if p.is_file())


def test_tenant_directories_are_safe_and_collision_free() -> None:
    names = ["acme", "Acme", "ACME", "a.b", "a/b", "../x", "..", ".", "", "t-acme", "x-",
             "no-tenant", "naïve", "a" * 63, "a" * 64, "x-" + "0" * 64, " acme", "acme "]
    dirs = [tenant_dir(n) for n in names]
    assert len(set(dirs)) == len(names)                     # no two tenants share a directory
    assert len({d.lower() for d in dirs}) == len(names)     # also on case-insensitive disks
    for d in dirs:
        assert is_tenant_dir(d) and "/" not in d and d not in (".", "..") and len(d) <= 66
    assert tenant_dir("acme") == "t-acme" and tenant_dir("") == "no-tenant"
    assert tenant_dir("../x") == "x-" + hashlib.sha256(b"../x").hexdigest()


def test_two_tenants_hold_the_same_id_as_two_incidents(store: LocalStore,
                                                        make_incident: Make) -> None:
    a = make_incident("inc-1", tenant="acme", n_sites=1)
    g = make_incident("inc-1", tenant="acme", n_sites=3, seed=7)    # manifest lies; key decides
    assert store.put("inc-1", a, tenant="acme").created
    assert store.put("inc-1", g, tenant=HASHED).created          # no squatting, no oracle
    ra, rg = store.get("inc-1", tenant="acme"), store.get("inc-1", tenant=HASHED)
    assert ra is not None and rg is not None and (ra.n_sites, rg.n_sites) == (1, 3)
    assert store.path("inc-1", tenant=HASHED).read_bytes() == g
    assert b"".join(store.read_chunks("inc-1", 100, tenant="acme")) == a
    assert store.open("inc-1", tenant=HASHED).sites("activation") == \
        [f"blocks.{i}.resid_post" for i in range(3)]
    assert rg.path == stored_path(HASHED, "inc-1") != ra.path
    with pytest.raises(AmbiguousIncidentError, match="held by 2 tenants") as e:
        store.get("inc-1")                                      # no tenant: never a guess
    assert e.value.tenants == ["Globex Corp", "acme"]
    # idempotency per (tenant, id): same bytes again is success, other bytes ALREADY_EXISTS
    assert not store.put("inc-1", g, tenant=HASHED).created
    with pytest.raises(AlreadyExistsError):
        store.put("inc-1", a, tenant=HASHED)
    assert store.index.count_incidents("TRUE", []) == 2
    assert store.delete("inc-1", tenant=HASHED)
    assert store.get("inc-1", tenant=HASHED) is None
    assert store.get("inc-1") == store.get("inc-1", tenant="acme") is not None
    assert store.path("inc-1", tenant="acme").read_bytes() == a


def test_reindex_rebuilds_both_tenants_from_the_files(tmp_path: Path, make_incident: Make) -> None:
    with LocalStore(tmp_path) as s:
        s.put("inc-1", make_incident("inc-1", tenant="x"), tenant="acme")
        s.put("inc-1", make_incident("inc-1", tenant="x", seed=1), tenant=HASHED)
        s.put("inc-2", make_incident("inc-2", tenant=""), tenant=None)   # the empty tenant
        before = {(r.tenant, r.id): r for r in s.index.query_incidents("TRUE", [], "id",
                                                                        limit=10, offset=0)}
    (tmp_path / "index.duckdb").unlink()
    with LocalStore(tmp_path) as s:
        assert s.last_recovery.indexed == 3 and s.last_recovery.quarantined == []
        after = {(r.tenant, r.id): r for r in s.index.query_incidents("TRUE", [], "id",
                                                                       limit=10, offset=0)}
        assert after == before         # the hashed tenant's name comes back from its receipt
        assert sorted(before) == [("", "inc-2"), ("Globex Corp", "inc-1"), ("acme", "inc-1")]
    # a hashed directory without its receipt cannot be attributed: quarantined, not guessed
    (tmp_path / "incidents" / tenant_dir(HASHED) / "inc-1.json").unlink()
    with LocalStore(tmp_path) as s:
        rep = s.reindex()
        assert rep.quarantined == [f"{tenant_dir(HASHED)}/inc-1"] and rep.indexed == 2


# -- the old flat layout -----------------------------------------------------------------------

_V1_INCIDENTS = """CREATE TABLE incidents_v1 (id VARCHAR PRIMARY KEY, tenant VARCHAR NOT NULL,
    created_at TIMESTAMP, received_at TIMESTAMP NOT NULL, model_name VARCHAR,
    model_fingerprint VARCHAR, trigger_rule VARCHAR, trigger_reason VARCHAR, request_id VARCHAR,
    traceparent VARCHAR, size_bytes BIGINT NOT NULL, sha256 VARCHAR NOT NULL,
    activations VARCHAR, n_sites INTEGER NOT NULL, path VARCHAR NOT NULL,
    manifest_json VARCHAR NOT NULL, failure_p DOUBLE)"""


def _old_data_dir(root: Path, make: Make) -> dict[tuple[str, str], bytes]:
    """A data directory as the previous version wrote it: ``incidents/<id>.arrow`` + receipt,
    an index of schema version 1 keyed by id alone (with a job of one incident), and one file
    that was renamed into place but never indexed (a crash before the index row)."""
    stored = {("acme", "inc-1"): make("inc-1", tenant="acme"),
              (HASHED, "inc-2"): make("inc-2", tenant="other", seed=2),   # admin-named tenant
              ("", "inc-3"): make("inc-3", tenant="", seed=3)}
    with LocalStore(root) as s:
        for (tenant, iid), data in stored.items():
            s.put(iid, data, tenant=tenant)
        s.put("inc-4", make("inc-4", tenant="acme", seed=4), tenant=HASHED)
        with s.index.write() as con:
            con.execute("INSERT INTO jobs (id, incident_id, tenant, kind, state, attempts, "
                        "max_attempts, params_json, created_at) VALUES ('job-1', 'inc-1', "
                        "'acme', 'stats', 'done', 1, 3, '{}', now())")
    inc = root / "incidents"
    for d in [p for p in inc.iterdir() if p.is_dir()]:
        for f in d.iterdir():
            f.rename(inc / f.name)
        d.rmdir()
    con = duckdb.connect(str(root / "index.duckdb"))
    con.execute(_V1_INCIDENTS)
    con.execute("INSERT INTO incidents_v1 BY NAME SELECT * EXCLUDE (content_sha256, crc32c, "
                "integrity) REPLACE ('incidents/' || id || '.arrow' AS path) FROM incidents "
                "WHERE id <> 'inc-4'")
    con.execute("DROP TABLE incidents")
    con.execute("ALTER TABLE incidents_v1 RENAME TO incidents")
    con.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    con.close()
    stored[(HASHED, "inc-4")] = (inc / "inc-4.arrow").read_bytes()
    return stored


def _check_migrated(root: Path, stored: dict[tuple[str, str], bytes]) -> None:
    with LocalStore(root) as s:
        assert s.index.read("SELECT value FROM meta WHERE key = 'schema_version'") == [("2",)]
        rows = s.index.query_incidents("TRUE", [], "id", limit=10, offset=0)
        assert {(r.tenant, r.id): r.path for r in rows} == \
            {k: stored_path(*k) for k in stored}
        for (tenant, iid), data in stored.items():
            assert s.path(iid, tenant=tenant).read_bytes() == data
        assert [j[0] for j in s.index.read("SELECT id FROM jobs")] == ["job-1"]
        assert _files(root) == sorted(
            f"{tenant_dir(t)}/{i}.{ext}" for t, i in stored for ext in ("arrow", "json"))
        # from here on the id is per tenant: another tenant may upload inc-1
        assert s.put("inc-1", stored[("acme", "inc-1")], tenant="globex").created


def test_an_old_flat_data_dir_is_migrated_when_the_store_opens(tmp_path: Path,
                                                               make_incident: Make) -> None:
    stored = _old_data_dir(tmp_path, make_incident)
    assert sorted(p.name for p in (tmp_path / "incidents").iterdir())[:2] == \
        ["inc-1.arrow", "inc-1.json"]
    with LocalStore(tmp_path) as s:
        assert s.last_recovery.migrated == 4 and s.last_recovery.quarantined == []
        assert s.last_recovery.indexed == 1          # inc-4: never indexed, indexed now
    _check_migrated(tmp_path, stored)


@pytest.mark.parametrize("crash_after", range(8))
def test_the_migration_survives_a_crash_at_any_step(tmp_path: Path, make_incident: Make,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    crash_after: int) -> None:
    """The process dies after ``crash_after`` of the migration's 8 renames (each file and each
    receipt of four incidents); the next open finishes it: nothing lost, duplicated or
    misfiled."""
    import sidecar._store_migration as migration
    from sidecar._store_index import Index

    stored = _old_data_dir(tmp_path, make_incident)
    real, calls = migration.os.replace, []

    def dying_replace(src: object, dst: object) -> None:
        if len(calls) == crash_after:
            raise SystemExit("crash")
        calls.append(dst)
        real(src, dst)   # type: ignore[arg-type]

    monkeypatch.setattr(migration.os, "replace", dying_replace)
    index = Index(tmp_path / "index.duckdb")
    try:
        with pytest.raises(SystemExit):
            migration.migrate_flat(tmp_path / "incidents", tmp_path / "quarantine", index,
                                   ReindexReport())
    finally:
        index.close()
    monkeypatch.setattr(migration.os, "replace", real)
    _check_migrated(tmp_path, stored)


def test_jobs_results_and_queries_stay_with_their_tenant(store: LocalStore,
                                                         make_incident: Make) -> None:
    """Results join their incident on (tenant, id): acme's flagged CF result of inc-1 neither
    scores nor hides globex's inc-1; jobs are idempotent per (tenant, incident, request id);
    deleting one tenant's incident deletes only its jobs and results."""
    from sidecar.jobs._cf import record_cf
    from sidecar.jobs._queries import benign_candidates, latest_cf
    from sidecar.jobs._queue import JobQueue

    for tenant in ("acme", "globex"):
        store.put("inc-1", make_incident("inc-1", rule="ratio"), tenant=tenant)
    queue = JobQueue(store.index, max_attempts=3)
    jobs = {t: queue.submit("inc-1", "cf", tenant=t, request_id="on_ingest:cf")
            for t in ("acme", "globex")}
    assert jobs["acme"].id != jobs["globex"].id
    assert queue.submit("inc-1", "cf", tenant="acme", request_id="on_ingest:cf") == jobs["acme"]
    scored = {"status": "scored", "anomaly_score": 3.1, "flagged": True, "detector": "cf",
              "model_fingerprint": "f" * 64,
              "report": {"ranked_sites": [["blocks.0.resid_post", 3.1]],
                         "sites": {"blocks.0.resid_post": {"score": 3.1}}}}
    with store.index.write() as con:
        record_cf(con, jobs["acme"], scored)
    acme, globex = store.get("inc-1", tenant="acme"), store.get("inc-1", tenant="globex")
    assert acme is not None and (acme.anomaly_score, acme.cf_flagged) == (3.1, True)
    assert globex is not None and (globex.anomaly_score, globex.cf_flagged) == (None, None)
    assert latest_cf(store.index, "inc-1", tenant="globex") is None
    assert benign_candidates(store.index, "f" * 64, ("ratio",), tenants=["acme", "globex"],
                             limit=10) == [("globex", "inc-1")]
    assert store.delete("inc-1", tenant="acme")
    assert store.index.read("SELECT count(*) FROM cf_site_scores") == [(0,)]
    assert store.index.read("SELECT tenant FROM jobs") == [("globex",)]
