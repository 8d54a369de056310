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
