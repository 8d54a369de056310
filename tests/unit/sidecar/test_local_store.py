"""LocalStore: verify → atomic file → DuckDB row; idempotency, recovery, reindex, delete."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pytest

from integrations.errors import IncidentFormatError, IncidentTooLargeError
from integrations.incident import Incident
from sidecar._store import AlreadyExistsError, LocalStore


def _files(store: LocalStore) -> list[str]:
    """Every file under ``incidents/`` (``<tenant dir>/<name>``)."""
    return sorted(p.relative_to(store.incidents_dir).as_posix()
                  for p in store.incidents_dir.rglob("*") if p.is_file())


def test_put_writes_file_and_row(store: LocalStore, make_incident: Callable[..., bytes]) -> None:
    data = make_incident("inc-1", tenant="acme", n_sites=3, steps=2)
    res = store.put("inc-1", data, tenant=None)
    assert res.created
    row = store.get("inc-1")
    assert row is not None
    assert (row.tenant, row.model_name, row.trigger_rule, row.trigger_reason) == \
        ("acme", "tiny-gpt2", "flag", "prompt_injection")
    assert row.request_id == "req-inc-1" and (row.traceparent or "").startswith("00-0af7")
    assert row.size_bytes == len(data) and row.sha256 == hashlib.sha256(data).hexdigest()
    assert row.n_sites == 3 and row.activations == "captured"
    assert json.loads(row.manifest_json)["id"] == "inc-1"
    assert (store.root / row.path).read_bytes() == data
    assert _files(store) == ["t-acme/inc-1.arrow", "t-acme/inc-1.json"]
    assert row.path == "incidents/t-acme/inc-1.arrow"
    assert store.open("inc-1").steps("blocks.2.resid_post") == [0, 1]
    assert store.get("inc-1", tenant="other") is None      # tenant scoping


def test_put_is_idempotent_on_id(store: LocalStore, make_incident: Callable[..., bytes]) -> None:
    data = make_incident("inc-1")
    assert store.put("inc-1", data, tenant="acme").created
    again = store.put("inc-1", data, tenant="acme")
    assert not again.created and again.row.sha256 == hashlib.sha256(data).hexdigest()
    with pytest.raises(AlreadyExistsError, match="different content"):
        store.put("inc-1", make_incident("inc-1", seed=1), tenant="acme")
    assert store.index.count_incidents("TRUE", []) == 1


@pytest.mark.parametrize("kind", ["non_arrow", "truncated", "wrong_schema", "id_mismatch",
                                  "bad_id"])
def test_invalid_incidents_write_nothing(store: LocalStore, make_incident: Callable[..., bytes],
                                         kind: str) -> None:
    good = make_incident("inc-1")
    incident_id = "inc-1"
    if kind == "non_arrow":
        data = b"definitely not arrow" * 10
    elif kind == "truncated":
        data = good[: len(good) // 2]
    elif kind == "wrong_schema":
        table = pa.table({"x": pa.array([1, 2, 3])})
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
        data = sink.getvalue().to_pybytes()
    elif kind == "id_mismatch":
        data, incident_id = good, "inc-2"
    else:
        data, incident_id = good, "../etc/passwd"
    with pytest.raises(IncidentFormatError):
        store.put(incident_id, data, tenant="acme")
    assert _files(store) == []
    assert store.index.count_incidents("TRUE", []) == 0


def test_size_cap(tmp_path: Path, make_incident: Callable[..., bytes]) -> None:
    data = make_incident("inc-1")
    with LocalStore(tmp_path, max_incident_bytes=len(data) - 1) as s:
        with pytest.raises(IncidentTooLargeError, match="max_incident_bytes"):
            s.put("inc-1", data, tenant="acme")
        assert _files(s) == []


def test_recovery_indexes_orphans_and_drops_stale_rows(
        tmp_path: Path, make_incident: Callable[..., bytes]) -> None:
    with LocalStore(tmp_path) as s:
        s.put("inc-1", make_incident("inc-1"), tenant="token-tenant")
        s.put("inc-2", make_incident("inc-2"), tenant="acme")
    # crash leftovers: a temp file, a file renamed but not indexed, a row whose file is gone
    (tmp_path / "incidents" / ".inc-9.deadbeef.tmp").write_bytes(b"partial")
    orphan = make_incident("inc-3", tenant="globex")
    (tmp_path / "incidents" / "t-globex").mkdir()
    (tmp_path / "incidents" / "t-globex" / "inc-3.arrow").write_bytes(orphan)
    (tmp_path / "incidents" / "t-acme" / "inc-2.arrow").unlink()
    with LocalStore(tmp_path) as s:
        rep = s.last_recovery
        assert (rep.tmp_removed, rep.indexed, rep.removed_rows, rep.kept) == (1, 1, 1, 1)
        assert sorted(s.index.incident_ids()) == ["inc-1", "inc-3"]
        inc3, inc1 = s.get("inc-3"), s.get("inc-1")
        assert inc3 is not None and inc3.tenant == "globex"     # its directory (no receipt)
        assert inc1 is not None and inc1.tenant == "token-tenant"  # receipt kept
        assert _files(s) == ["t-globex/inc-3.arrow", "t-token-tenant/inc-1.arrow",
                             "t-token-tenant/inc-1.json"]


def test_reindex_rebuilds_from_files(tmp_path: Path, make_incident: Callable[..., bytes]) -> None:
    with LocalStore(tmp_path) as s:
        for i in range(3):
            s.put(f"inc-{i}", make_incident(f"inc-{i}"), tenant=f"t{i}")
        before = {r: s.get(r) for r in s.index.incident_ids()}
    (tmp_path / "index.duckdb").unlink()
    (tmp_path / "incidents" / "t-t1" / "inc-1.arrow").write_bytes(b"garbage")  # corrupted
    with LocalStore(tmp_path) as s:
        assert s.last_recovery.indexed == 2 and s.last_recovery.quarantined == ["t-t1/inc-1"]
        rep = s.reindex()
        assert rep.indexed == 2 and rep.quarantined == []
        for rid in ("inc-0", "inc-2"):
            assert s.get(rid) == before[rid]                # tenant, received_at, sha restored
        assert (tmp_path / "quarantine" / "t-t1" / "inc-1.arrow").read_bytes() == b"garbage"


def test_delete(store: LocalStore, make_incident: Callable[..., bytes]) -> None:
    store.put("inc-1", make_incident("inc-1"), tenant="acme")
    assert not store.delete("inc-1", tenant="other")
    assert store.get("inc-1") is not None
    assert store.delete("inc-1", tenant="acme")
    assert store.get("inc-1") is None and _files(store) == []
    assert not store.delete("inc-1")


def test_watch_subscribers_get_new_rows(store: LocalStore,
                                        make_incident: Callable[..., bytes]) -> None:
    q = store.subscribe()
    data = make_incident("inc-1")
    store.put("inc-1", data, tenant="acme")
    store.put("inc-1", data, tenant="acme")    # duplicate: not re-published
    row = q.get(timeout=1)
    assert row is not None and row.id == "inc-1"
    assert q.empty()
    store.unsubscribe(q)


def test_stored_file_reads_back_exactly(store: LocalStore,
                                        make_incident: Callable[..., bytes]) -> None:
    data = make_incident("inc-1", n_sites=2)
    store.put("inc-1", data, tenant="acme")
    a, b = Incident.from_bytes(data), store.open("inc-1")
    t1, t2 = a.tensor("blocks.1.resid_post", step=0), b.tensor("blocks.1.resid_post", step=0)
    assert t1.dtype == t2.dtype and t1.shape == t2.shape and bool((t1 == t2).all())
    assert b"".join(store.read_chunks("inc-1", 100)) == data


def test_delete_removes_derived_rows(store: LocalStore,
                                     make_incident: Callable[..., bytes]) -> None:
    """Deleting an incident deletes its jobs, analyses and CF / CCA result rows (recorded the
    way the kinds record them), and nothing of another incident."""
    from sidecar._schema import RESULT_TABLES
    from sidecar._store_index import utcnow
    from sidecar.jobs import JobRecord
    from sidecar.jobs._cca import CCA
    from sidecar.jobs._cf import CF

    def job(job_id: str, incident_id: str, kind: str) -> JobRecord:
        now = utcnow()
        return JobRecord(id=job_id, incident_id=incident_id, tenant="acme", kind=kind,
                         state="done", attempts=1, max_attempts=3, error=None, params_json="{}",
                         request_id=None, created_at=now, started_at=now, finished_at=now)

    cf_result = {"status": "scored", "anomaly_score": 3.5, "flagged": True, "detector": "cf",
                 "report": {"ranked_sites": [["blocks.0.resid_post", 3.5],
                                             ["blocks.1.resid_post", 0.2]],
                            "sites": {"blocks.0.resid_post": {"score": 3.5, "flagged": True}}}}
    cca_result = {"status": "found", "fix_set": {
        "flip": True, "flip_rate": 0.9, "flip_rate_ci": [0.6, 0.98],
        "interventions": [{"site": "blocks.0.mlp.post[neuron=3]", "kind": "zero"}],
        "necessity": [{"site": "blocks.0.mlp.post[neuron=3]", "delta": 1.2}]}}
    for iid in ("inc-1", "inc-2"):
        store.put(iid, make_incident(iid), tenant="acme")
        jobs = [job(f"{iid}-cf", iid, "cf"), job(f"{iid}-cca", iid, "cca")]
        with store.index.write() as con:
            for j in jobs:
                con.execute("INSERT INTO jobs (id, incident_id, tenant, kind, state, attempts, "
                            "max_attempts, params_json, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, "
                            "?, ?)", [j.id, iid, j.tenant, j.kind, j.state, 1, 3, "{}",
                                      j.created_at])
                con.execute("INSERT INTO analyses VALUES (?, ?, ?, ?, ?)",
                            [j.id, iid, j.kind, "{}", j.created_at])
            assert CF.record is not None and CCA.record is not None
            CF.record(con, jobs[0], cf_result)
            CCA.record(con, jobs[1], cca_result)

    def counts(iid: str) -> dict[str, int]:
        return {t: store.index.read(f"SELECT count(*) FROM {t} WHERE incident_id = ?",
                                    [iid])[0][0]
                for t in (*RESULT_TABLES, "analyses", "jobs")}

    assert counts("inc-1") == {"cf_site_scores": 2, "cf_results": 1, "cca_interventions": 1,
                               "cca_results": 1, "analyses": 2, "jobs": 2}
    before = counts("inc-2")
    assert store.delete("inc-1", tenant="acme")
    assert set(counts("inc-1").values()) == {0}
    assert counts("inc-2") == before and store.get("inc-2") is not None


def test_a_reconcile_while_running_keeps_an_upload_in_flight(
        store: LocalStore, make_incident: Callable[..., bytes]) -> None:
    """The shared catalog's back-fill reconciles while uploads stream in: it must not remove
    an in-flight upload's temp file (start-up recovery removes the temps a crash left)."""
    data = make_incident("inc-1", n_sites=2)
    inc = store.incoming("inc-1")
    inc.write(data[:100])                      # the stream has begun: a temp file exists
    assert store.recover().tmp_removed == 0
    inc.write(data[100:])
    sha = inc.finish()
    assert store.put_incoming(inc, tenant="acme", sha256=sha).created


def test_key_locks_exclusive_waits_for_holders_and_holds_off_new_ones() -> None:
    import threading
    import time

    from sidecar._store_files import KeyLocks

    locks, order = KeyLocks(), []
    held, release = threading.Event(), threading.Event()

    def upload(key: str) -> None:
        with locks.hold(key):
            order.append(f"hold {key}")
            held.set()
            release.wait(5)

    first = threading.Thread(target=upload, args=("a",))
    first.start()
    held.wait(5)

    def reconcile() -> None:
        with locks.exclusive():
            order.append("exclusive")
            time.sleep(0.2)
            order.append("exclusive done")

    excl = threading.Thread(target=reconcile)
    excl.start()
    time.sleep(0.2)
    assert order == ["hold a"]                 # waits for the holder
    release.set()
    first.join(5)
    time.sleep(0.05)
    second = threading.Thread(target=upload, args=("b",))
    second.start()                             # taken only after the exclusive section
    excl.join(5)
    second.join(5)
    assert order == ["hold a", "exclusive", "exclusive done", "hold b"]
