"""benchmarks/fleet.py ``query``: its synthetic catalog and its ListIncidents query give the same
page and total on the embedded DuckDB catalog and on a real PostgreSQL catalog (so the timings
compare the same work), and the command runs end to end at a small size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.unit._bench import load_benchmark


@pytest.fixture(scope="module")
def fleet() -> Any:
    return load_benchmark("fleet")


def test_both_engines_answer_the_same_page(fleet: Any, tmp_path: Path, pg_dsn: str) -> None:
    incidents, cf = fleet.synthetic_rows(3000, seed=1)
    assert len(cf) > 1000 and len({r[2] for r in cf}) == fleet.TENANTS
    duck = fleet.load_duckdb(tmp_path / "duck", incidents, cf)
    pg = fleet.load_postgres(pg_dsn, incidents, cf)
    try:
        for _, flt, order in fleet.QUERIES:
            (d_rows, d_total), (p_rows, p_total) = (fleet.list_incidents(c, flt, order)
                                                    for c in (duck, pg))
            assert d_total == p_total > 0
            assert [(r.id, r.anomaly_score) for r in d_rows] == \
                [(r.id, r.anomaly_score) for r in p_rows]
            assert {r.tenant for r in d_rows} == {fleet.TENANT}
    finally:
        duck.close()
        pg.close()


def test_query_command_runs(fleet: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert fleet.main(["query", "--sizes", "500", "--engines", "duckdb", "--reps", "2"]) == 0
    out = capsys.readouterr().out
    assert "duckdb" in out and "median" in out and "worst CF score first" in out


@pytest.mark.slow
def test_chaos_at_a_small_size_loses_nothing_and_finishes_every_job(
        fleet: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """``fleet.py chaos`` end to end, small: real PostgreSQL, a real ``ray start --head``, two
    sidecar processes; the catalog stopped and restarted, the Ray workers killed mid-stream."""
    from tests._postgres import postgres_or_skip_reason

    reason = postgres_or_skip_reason()
    if reason is not None:
        pytest.skip(f"no PostgreSQL: {reason}")
    pytest.importorskip("ray", reason="Ray (extra `fleet`) is not installed")
    assert fleet.main(["chaos", "--incidents", "30", "--catalog-down-at", "5",
                       "--catalog-up-at", "12", "--kill-at", "18", "--interval-s", "0.05",
                       "--recovery-timeout-s", "240"]) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert (out["acknowledged"], out["lost"]) == (30, 0)
    assert out["byte_identical_through_the_other_sidecar"] == 30
    assert out["jobs"] == {"done": 30} and out["jobs_per_incident"] == 1.0
    assert [e["at"] for e in out["events"]] == [5, 12, 18]
