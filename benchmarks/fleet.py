"""Fleet benchmarks (issue 16, DESIGN §12), one sub-command per section.

``query``: latency of a ``ListIncidents``-equivalent query — the servicer's own SQL: the
caller's tenant ANDed with a compiled AIP-160 filter, a compiled ``order_by``, one page
(``LIMIT page_size + 1``) plus the ``total_size`` count — on the catalog's real schema, at 10⁴
and 10⁵ catalog rows, on the embedded DuckDB catalog and on a shared PostgreSQL catalog. The
index rows are SYNTHETIC (generated here, no incident files behind them; 10 tenants, 4 models,
half the incidents scored by CF, a tenth of those re-scored), inserted straight into the
catalog's tables. Reported: the median (and p90) of ``--reps`` runs of each query after one
warm-up run, per engine and size.

The PostgreSQL server is the one in ``$FORENSICS_CATALOG_DSN`` (a new database is created in it
and dropped afterwards), else a throw-away local server (``tests/_postgres.py``: initdb +
pg_ctl, as the tests do). ``ingest`` (N sidecars ingesting into one catalog) is another
section of this file, added with the fleet's ingest work.

Usage::

    python benchmarks/fleet.py query                       # 10^4 and 10^5 rows, both engines
    python benchmarks/fleet.py query --sizes 10000 --reps 11 --engines duckdb --json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TENANTS = 10
MODELS = ("gpt2", "llama-3-8b", "mistral-7b", "qwen-7b")
RULES = ("flag", "ratio", "ratio", "ratio")
NOW = dt.datetime(2026, 12, 1)
#: (name, filter, order_by) of the timed ListIncidents calls, all in tenant ``t3``.
QUERIES = (
    ("flagged this week, newest first",
     f'trigger_rule = "flag" AND received_at >= "{(NOW - dt.timedelta(days=7)).isoformat()}Z"',
     "received_at desc"),
    ("one model, worst CF score first", 'model_name = "llama-3-8b" AND anomaly_score > 2.5',
     "anomaly_score desc"),
)
TENANT = "t3"
PAGE = 50


def synthetic_rows(n: int, *, seed: int = 0) -> tuple[list[tuple[Any, ...]],
                                                         list[tuple[Any, ...]]]:
    """``n`` synthetic ``incidents`` rows and their ``cf_results`` rows (module doc)."""
    from sidecar._store_index import INCIDENT_COLUMNS

    rng = random.Random(seed)
    incidents, cf = [], []
    for i in range(n):
        received = NOW - dt.timedelta(seconds=rng.randrange(60 * 86400))
        values = {"id": f"inc-{i:07d}", "tenant": f"t{i % TENANTS}", "created_at": received,
                  "received_at": received, "model_name": rng.choice(MODELS),
                  "model_fingerprint": "f" * 64, "trigger_rule": rng.choice(RULES),
                  "trigger_reason": "synthetic", "request_id": f"req-{i}", "traceparent": None,
                  "size_bytes": rng.randrange(10_000, 5_000_000), "sha256": "0" * 64,
                  "activations": "captured", "n_sites": rng.randrange(1, 12),
                  "path": f"t-t{i % TENANTS}/inc-{i:07d}.arrow", "manifest_json": "{}",
                  "content_sha256": "0" * 64, "crc32c": 0, "integrity": "verified"}
        incidents.append(tuple(values[c] for c in INCIDENT_COLUMNS))
        scored = rng.random() < 0.5
        for k in range(1 + (rng.random() < 0.1) if scored else 0):
            score = rng.lognormvariate(0, 1)
            cf.append((f"job-{i}-{k}", values["id"], values["tenant"], "f" * 64, "cf", "scored",
                       score, score > 2.5, 2.5, 1, 64, 4, "blocks.0.resid_post",
                       received + dt.timedelta(minutes=k + 1), 1 / (1 + score)))
    return incidents, cf


_CF_COLUMNS = ("job_id, incident_id, tenant, model_fingerprint, detector, status, score, "
               "flagged, threshold, baseline_version, baseline_samples, n_sites, top_site, "
               "created_at, p")


def load_duckdb(directory: Path, incidents: list[tuple[Any, ...]],
                cf: list[tuple[Any, ...]]) -> Any:
    """A DuckDB catalog (the product's ``Index``) holding the synthetic rows."""
    import pyarrow as pa

    from sidecar._store_index import INCIDENT_COLUMNS, Index

    directory.mkdir(parents=True, exist_ok=True)
    index = Index(directory / "index.duckdb")
    inc = pa.table(list(zip(*incidents)), names=list(INCIDENT_COLUMNS))  # noqa: F841
    res = pa.table(list(zip(*cf)), names=[c.strip() for c in _CF_COLUMNS.split(",")])  # noqa: F841
    with index.write() as con:
        con.execute(f"INSERT INTO incidents ({', '.join(INCIDENT_COLUMNS)}) "
                    f"SELECT {', '.join(INCIDENT_COLUMNS)} FROM inc")
        con.execute(f"INSERT INTO cf_results ({_CF_COLUMNS}) SELECT {_CF_COLUMNS} FROM res")
    return index


def load_postgres(dsn: str, incidents: list[tuple[Any, ...]], cf: list[tuple[Any, ...]]) -> Any:
    """A PostgreSQL catalog (the product's ``PostgresCatalog``) holding the synthetic rows
    (loaded with COPY), analysed as autovacuum would."""
    from sidecar._catalog_postgres import PostgresCatalog
    from sidecar._store_index import INCIDENT_COLUMNS

    catalog = PostgresCatalog(dsn)
    with catalog.write() as con:
        for table, cols, rows in (("incidents", ", ".join(INCIDENT_COLUMNS), incidents),
                                  ("cf_results", _CF_COLUMNS, cf)):
            with con.raw.cursor() as cur, cur.copy(f"COPY {table} ({cols}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
    with catalog.write() as con:
        con.execute("ANALYZE incidents")
        con.execute("ANALYZE cf_results")
    return catalog


def list_incidents(catalog: Any, filter_text: str, order_by: str) -> tuple[list[Any], int]:
    """What ``ListIncidents`` runs for a caller of tenant :data:`TENANT`: one page + total."""
    from sidecar._filters import compile_filter, compile_order_by

    flt = compile_filter(filter_text)
    where, params = f'"tenant" = ? AND ({flt.sql})', [TENANT, *flt.params]
    rows = catalog.query_incidents(where, params, compile_order_by(order_by),
                                   limit=PAGE + 1, offset=0)
    return rows, catalog.count_incidents(where, params)


def time_queries(catalog: Any, reps: int) -> dict[str, dict[str, float]]:
    """Median / p90 milliseconds of each of :data:`QUERIES` (after one warm-up)."""
    out: dict[str, dict[str, float]] = {}
    for name, flt, order in QUERIES:
        rows, total = list_incidents(catalog, flt, order)
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            list_incidents(catalog, flt, order)
            samples.append((time.perf_counter() - t0) * 1000)
        samples.sort()
        out[name] = {"median_ms": statistics.median(samples),
                     "p90_ms": samples[int(0.9 * (len(samples) - 1))],
                     "page_rows": min(len(rows), PAGE), "total": total}
    return out


@contextmanager
def postgres_dsn() -> Iterator[Callable[[], str]]:
    """``new()`` → the DSN of a new database on ``$FORENSICS_CATALOG_DSN``'s server or on a
    throw-away local server (module doc)."""
    import psycopg

    base = os.environ.get("FORENSICS_CATALOG_DSN", "")
    server = None
    if not base:
        from tests._postgres import PostgresServer

        server = PostgresServer.start_new()
        base = server.dsn()
    made: list[str] = []

    def new() -> str:
        name = f"fleet_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(base, autocommit=True) as con:
            con.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return str(psycopg.conninfo.make_conninfo(base, dbname=name))

    try:
        yield new
    finally:
        if server is not None:
            server.close()
        else:
            with psycopg.connect(base, autocommit=True) as con:
                for name in made:
                    con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run_query(args: argparse.Namespace) -> dict[str, Any]:
    """The ``query`` section: every (engine, size)."""
    results: dict[str, Any] = {"synthetic_rows": True, "tenants": TENANTS, "tenant": TENANT,
                               "page_size": PAGE, "reps": args.reps, "runs": []}
    pg = postgres_dsn() if "postgres" in args.engines else nullcontext(lambda: "")
    with pg as new_dsn, tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            incidents, cf = synthetic_rows(n)
            for engine in args.engines:
                t0 = time.perf_counter()
                catalog = (load_duckdb(Path(tmp) / f"{engine}-{n}", incidents, cf)
                           if engine == "duckdb" else load_postgres(new_dsn(), incidents, cf))
                load_s = time.perf_counter() - t0
                try:
                    timings = time_queries(catalog, args.reps)
                finally:
                    catalog.close()
                results["runs"].append({"engine": engine, "rows": n, "cf_rows": len(cf),
                                        "load_s": round(load_s, 1), "queries": timings})
                print(f"{engine:>8} {n:>7} rows: " + "; ".join(
                    f"{q}: {t['median_ms']:.1f} ms" for q, t in timings.items()),
                    file=sys.stderr, flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="section", required=True)
    q = sub.add_parser("query", help="ListIncidents latency on DuckDB and PostgreSQL catalogs")
    q.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    q.add_argument("--engines", nargs="+", choices=("duckdb", "postgres"),
                   default=["duckdb", "postgres"])
    q.add_argument("--reps", type=int, default=21)
    q.add_argument("--json", action="store_true", help="print the results as JSON")
    g = sub.add_parser("ingest", help="N sidecars ingesting into one PostgreSQL catalog")
    g.add_argument("--ns", type=int, nargs="+", default=[1, 2, 4])
    g.add_argument("--reps", type=int, default=3)
    g.add_argument("--incidents", type=int, default=200)
    g.add_argument("--clients", type=int, default=4)
    g.add_argument("--floats", type=int, default=16384, help="floats per incident (64 KiB)")
    g.add_argument("--json", action="store_true")
    c = sub.add_parser("chaos", help="catalog stopped, then Ray workers killed, mid-stream")
    c.add_argument("--incidents", type=int, default=200)
    c.add_argument("--floats", type=int, default=4096)
    c.add_argument("--catalog-down-at", type=int, default=50)
    c.add_argument("--catalog-up-at", type=int, default=100)
    c.add_argument("--kill-at", type=int, nargs="*", default=[130, 165])
    c.add_argument("--interval-s", type=float, default=0.05, help="pause between uploads")
    c.add_argument("--recovery-timeout-s", type=float, default=600.0)
    c.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.section != "query":
        from benchmarks.fleet_runs import run_chaos, run_ingest

        out = (run_ingest if args.section == "ingest" else run_chaos)(args)
        print(json.dumps(out, indent=2, default=str))
        return 0
    results = run_query(args)
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    else:
        for run in results["runs"]:
            for name, t in run["queries"].items():
                print(f"{run['engine']:>8} {run['rows']:>7} | {name:<34} | median "
                      f"{t['median_ms']:7.1f} ms | p90 {t['p90_ms']:7.1f} ms | "
                      f"{t['page_rows']:>2} rows of {t['total']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
