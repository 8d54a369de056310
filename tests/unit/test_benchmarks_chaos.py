"""benchmarks/chaos.py: the one raw-stream builder bends only what it is asked to, the table
shows every row's verdict, and (slow) ``--quick`` against real sidecar processes keeps the
issue-14 invariants: 0 acknowledged incidents lost, every bomb refused with its own status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from typing import Any

import pytest

from tests.unit._bench import BENCH, load_benchmark

REPO = BENCH.parent


@pytest.fixture(scope="module")
def chaos() -> Any:
    return load_benchmark("chaos")


def test_raw_messages_lies_only_where_asked(chaos: Any) -> None:
    from sidecar._client import upload_requests

    data = bytes(range(256)) * 40                       # 10,240 bytes -> 3 chunks of 4 KiB
    honest = list(upload_requests("inc-1", data, chunk_size=4096))
    assert list(chaos.raw_messages("inc-1", data, chunk_size=4096)) == honest
    chunks: list[int] = []
    headed = threading.Event()
    bent = list(chaos.raw_messages("inc-1", data, chunk_size=4096, declare_size=7,
                                   empty_chunks=2, after_header=headed.set,
                                   after_chunk=chunks.append))
    assert headed.is_set() and chunks == [1, 2, 3]
    assert bent[0].header.total_size == 7 and bent[0].header.incident_id == "inc-1"
    assert [m.chunk.data for m in bent[1:3]] == [b"", b""]
    assert bent[3:] == honest[1:]                       # the real chunks and trailer follow


def test_table_lists_every_row_with_its_verdict(chaos: Any) -> None:
    Row = chaos.Row
    rows = [Row("bomb", "a|b", "x", "y", True), Row("hung", "h", "x", "z", False),
            Row("disk_full", "d", "x", "not run: not root", None)]
    doc = {"rows": [{**r.__dict__, "verdict": r.verdict} for r in rows], "elapsed_s": 1.0,
           "loadavg_before": [0.1], "loadavg_after": [0.2], "cpus": 2}
    text = chaos.table(doc)
    lines = text.splitlines()
    assert lines[2].startswith("| bomb | a/b |") and lines[2].endswith("| pass |")
    assert lines[3].endswith("| FAIL |") and lines[4].endswith("| not run |")
    assert "3 rows, 1 FAIL" in text


def test_tenant_oracle_substitutes_names_and_nothing_else(chaos: Any) -> None:
    Answer, _same = chaos.chaos_tenants.Answer, chaos.chaos_tenants._same
    a = (Answer("NOT_FOUND", "not_found", "incident 'gx-1' not found"), "")
    b = (Answer("NOT_FOUND", "not_found", "incident 'nx-1' not found"), "")
    assert _same(a, b, (("gx-1", "nx-1"),))
    leak = (Answer("NOT_FOUND", "not_found", "incident 'gx-1' not found (3 KB)"), "")
    assert not _same(leak, b, (("gx-1", "nx-1"),))
    assert not _same((Answer("OK"), "id: gx-1"), (Answer("OK"), ""), (("gx-1", "nx-1"),))


@pytest.fixture(scope="module")
def quick_run() -> dict[str, Any]:
    """One ``python benchmarks/chaos.py --quick --json`` (real sidecar subprocesses)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(BENCH / "chaos.py"), "--quick", "--json"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=420,
                         check=False)
    assert res.stdout, res.stderr[-3000:]
    doc: dict[str, Any] = json.loads(res.stdout)
    assert res.returncode == (0 if doc["passed"] else 1)
    return doc


def _rows(doc: dict[str, Any], probe: str) -> list[dict[str, Any]]:
    rows = [r for r in doc["rows"] if r["probe"] == probe]
    assert rows, f"no {probe} rows in {[r['probe'] for r in doc['rows']]}"
    return rows


@pytest.mark.slow
def test_quick_chaos_loses_no_acknowledged_incident(quick_run: dict[str, Any]) -> None:
    (row,) = _rows(quick_run, "kill_sidecar")
    f = row["figures"]
    assert f["kills"] >= 1 and f["incidents"] >= 100
    assert f["acked_lost"] == 0 and f["mismatched"] == 0 and f["duplicates"] == 0, f
    assert f["unaccounted"] == 0 and f["spool_left"] == 0 and f["unknown"] == 0, f
    assert f["stored"] + sum(f["dropped"].values()) == f["incidents"], f
    assert row["verdict"] == "pass", row
    clients = _rows(quick_run, "kill_client")
    assert [r["verdict"] for r in clients] == ["pass", "pass"], clients
    (hung,) = _rows(quick_run, "hung")
    assert hung["figures"]["dropped"] == {} and hung["verdict"] == "pass", hung


@pytest.mark.slow
def test_quick_chaos_refuses_every_bomb_with_its_status(quick_run: dict[str, Any]) -> None:
    bombs = load_benchmark("chaos_bombs").BOMBS
    rows = _rows(quick_run, "bomb")
    assert len(rows) == len(bombs)
    for bomb, row in zip(bombs, rows):
        f = row["figures"]
        assert f["answer"] == f"{bomb.code} {bomb.reason}", (bomb.name, f)
        assert f["counted"] == {bomb.reason: 1} and f["stored"] is False, (bomb.name, f)


@pytest.mark.slow
def test_quick_chaos_bombs_stay_under_the_rss_bound(quick_run: dict[str, Any]) -> None:
    bound = load_benchmark("chaos_bombs").RSS_BOUND / 2**20
    over = {r["attack"]: r["figures"]["rss_growth_mib"] for r in _rows(quick_run, "bomb")
            if r["figures"]["rss_growth_mib"] > bound}
    assert not over, over


@pytest.mark.slow
def test_quick_chaos_faults_and_tenant_probes(quick_run: dict[str, Any]) -> None:
    for probe in ("stall", "disk_full"):
        for row in _rows(quick_run, probe):
            assert row["verdict"] in ("pass", "not run"), row   # disk_full needs root
    tenant = [r for r in _rows(quick_run, "tenant") if "already uses" not in r["attack"]]
    assert len(tenant) >= 14 and all(r["verdict"] == "pass" for r in tenant), tenant


@pytest.mark.slow
def test_quick_chaos_ids_are_per_tenant(quick_run: dict[str, Any]) -> None:
    (row,) = [r for r in _rows(quick_run, "tenant") if "already uses" in r["attack"]]
    assert row["verdict"] == "pass", row
