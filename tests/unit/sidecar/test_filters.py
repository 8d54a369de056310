"""AIP-160 filters / AIP-132 order_by compiled to parameterised SQL, run on real DuckDB and on a
real PostgreSQL server (the shared catalog, DESIGN §12): the same suite gives the same rows on
both engines (``engine`` parameter; PostgreSQL skips, saying why, where no server can start)."""

from __future__ import annotations

import base64
import datetime as dt

import pytest

from sidecar._filters import (
    FIELDS,
    MAX_PAGE_OFFSET,
    MAX_PAGE_TOKEN_CHARS,
    FilterError,
    compile_filter,
    compile_order_by,
    decode_page_token,
    encode_page_token,
    query_key,
)

ENGINES = ("duckdb", "postgres")


def catalog_for(engine: str, request, directory):  # type: ignore[no-untyped-def]
    """A new empty catalog of ``engine``: the DuckDB file in ``directory`` or a new database
    on the session's PostgreSQL server."""
    if engine == "duckdb":
        from sidecar._store_index import Index

        return Index(directory / "index.duckdb")
    import uuid

    from sidecar._catalog_postgres import PostgresCatalog

    server = request.getfixturevalue("postgres_server")
    return PostgresCatalog(server.create_database(f"f_{uuid.uuid4().hex[:10]}"))


@pytest.fixture(scope="module", params=ENGINES)
def db(request, tmp_path_factory):  # type: ignore[no-untyped-def]
    cat = catalog_for(request.param, request, tmp_path_factory.mktemp("filters"))
    con = _Autocommit(cat)
    con.execute("CREATE TABLE rows (id VARCHAR, tenant VARCHAR, created_at TIMESTAMP, "
                "received_at TIMESTAMP, model_name VARCHAR, model_fingerprint VARCHAR, "
                "trigger_rule VARCHAR, trigger_reason VARCHAR, request_id VARCHAR, "
                "traceparent VARCHAR, size_bytes BIGINT, sha256 VARCHAR, activations VARCHAR, "
                "n_sites INTEGER)")
    rows = [
        ("a", "acme", "2025-01-01 00:00:00", "gpt2", "flag", "prompt_injection", 100, 2, ""),
        ("b", "acme", "2025-02-01 00:00:00", "gpt2-large", "ratio", "sampled", 300, 4, "x"),
        ("c", "globex", "2025-03-01 00:00:00", "llama", "flag", "toxic", 50, 1, ""),
        ("d", "o'hara", "2025-04-01 00:00:00", "gp_t", "flag", "100% bad", 70, 3, "tp"),
    ]
    for r in rows:
        con.execute("INSERT INTO rows (id, tenant, created_at, received_at, model_name, "
                    "trigger_rule, trigger_reason, size_bytes, n_sites, traceparent) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [*r[:2], *(dt.datetime.fromisoformat(r[2]),) * 2, *r[3:]])
    yield cat
    cat.close()


class _Autocommit:
    """``execute`` on a catalog, each statement its own transaction (DDL types translated)."""

    def __init__(self, catalog) -> None:  # type: ignore[no-untyped-def]
        self.catalog = catalog

    def execute(self, sql: str, params: list[object] | None = None) -> None:
        with self.catalog.write() as con:
            con.execute(self.catalog.ddl(sql), params or [])


def ids(db, text: str) -> list[str]:  # type: ignore[no-untyped-def]
    f = compile_filter(text)
    return [r[0] for r in db.read(f"SELECT id FROM rows WHERE {f.sql} ORDER BY id",
                                  list(f.params))]


@pytest.mark.parametrize(("text", "expected"), [
    ("", ["a", "b", "c", "d"]),
    ('tenant = "acme"', ["a", "b"]),
    ("tenant = 'o\\'hara'", ["d"]),
    ("tenant != acme", ["c", "d"]),
    ("n_sites > 1 AND n_sites <= 3", ["a", "d"]),
    ("size_bytes >= 100 OR n_sites = 1", ["a", "b", "c"]),
    ('created_at >= "2025-02-01T00:00:00Z" AND created_at < 2025-04-01T00:00:00Z', ["b", "c"]),
    ("created_at > 2025-02-15", ["c", "d"]),
    ('model_name = "gpt2*"', ["a", "b"]),          # prefix match
    ('model_name = "gp_*"', ["d"]),                # '_' is literal, not a LIKE wildcard
    ('trigger_reason : "100%"', ["d"]),            # has = substring, '%' literal
    ("trigger_reason:inject", ["a"]),
    ("traceparent:*", ["b", "d"]),
    ("NOT tenant = acme", ["c", "d"]),
    ("NOT model_fingerprint = x", ["a", "b", "c", "d"]),   # NOT of unknown (NULL) matches
    ("-tenant = acme", ["c", "d"]),
    ("(tenant = acme OR tenant = globex) AND trigger_rule = flag", ["a", "c"]),
    # AIP-160: OR binds tighter than AND
    ("trigger_rule = flag AND tenant = acme OR tenant = globex", ["a", "c"]),
])
def test_filters_select_the_right_rows(db, text: str, expected: list[str]) -> None:  # type: ignore[no-untyped-def]
    assert ids(db, text) == expected


def test_values_are_parameters_never_sql() -> None:
    f = compile_filter("tenant = \"x' OR 1=1 --\"")
    assert f.sql == '"tenant" = ?'
    assert f.params == ("x' OR 1=1 --",)
    f = compile_filter('created_at < "2025-01-01T01:00:00+01:00"')
    assert f.params == (dt.datetime(2025, 1, 1, 0, 0),)   # normalised to naive UTC


@pytest.mark.parametrize(("text", "position", "fragment"), [
    ("tenant = 'a'; DROP TABLE x", 13, "unexpected character ';'"),
    ("tenant = 'a' DROP TABLE x", 14, "expected AND, OR"),
    ("bogus = 1", 1, "unknown field 'bogus'"),
    ("tenant = ", 10, "expected a value"),
    ("(tenant = a", 12, "expected ')'"),
    ("n_sites = many", 11, "needs an integer"),
    ('created_at > "yesterday"', 14, "RFC 3339"),
    ("tenant = *", 10, "only valid with ':'"),
    ("tenant", 7, "comparison operator"),
    ("tenant = a AND", 15, "expected a field name"),
    ("1 = 1", 1, "expected a field name"),
    ("anomaly_score > high", 17, "needs a number"),
    ('anomaly_score > "2.5"', 17, "needs a number"),
    ("cf_flagged = yes", 14, "needs true or false"),
    ("cf_flagged = 1", 14, "needs true or false"),
])
def test_bad_filters_name_the_position(text: str, position: int, fragment: str) -> None:
    with pytest.raises(FilterError) as e:
        compile_filter(text)
    assert e.value.position == position
    assert fragment in str(e.value)
    assert f"position {position}" in str(e.value)


def test_deep_nesting_and_huge_filters_are_refused() -> None:
    with pytest.raises(FilterError, match="nested deeper"):
        compile_filter("(" * 100 + "tenant = a" + ")" * 100)
    with pytest.raises(FilterError, match="longer than"):
        compile_filter("tenant = a OR " * 1000 + "tenant = b")


def test_order_by() -> None:
    assert compile_order_by("") == '"received_at" DESC NULLS LAST, "id" ASC'
    assert compile_order_by("created_at desc, tenant") == \
        '"created_at" DESC NULLS LAST, "tenant" ASC NULLS LAST, "id" ASC'
    assert compile_order_by("id desc") == '"id" DESC'
    for bad, pos in (("created_at sideways", 1), ("tenant, id; DROP", 9), ("nope", 1),
                     ("tenant, tenant", 9)):
        with pytest.raises(FilterError) as e:
            compile_order_by(bad)
        assert e.value.position == pos


def test_page_tokens_are_bound_to_the_query() -> None:
    key = query_key('tenant = "a"', "", "*")
    token = encode_page_token(50, key)
    assert decode_page_token(token, key) == 50
    with pytest.raises(FilterError, match="different filter"):
        decode_page_token(token, query_key('tenant = "b"', "", "*"))
    nested = base64.urlsafe_b64encode(b"[" * 100_000).decode()     # RecursionError in json
    for junk in ("not-base64!!", "eyJ4IjoxfQ", encode_page_token(-1, key),
                 encode_page_token(2**63, key), encode_page_token(MAX_PAGE_OFFSET, key),
                 nested, "A" * (MAX_PAGE_TOKEN_CHARS + 1)):
        with pytest.raises(FilterError, match="not a token from this API"):
            decode_page_token(junk, key)


@pytest.mark.parametrize("text", [
    'created_at > "0001-01-01T00:00:00+14:00"',      # before year 1 once in UTC
    'received_at < "9999-12-31T23:59:59-14:00"',     # after year 9999 once in UTC
    "size_bytes > 99999999999999999999",             # beyond BIGINT
])
def test_values_outside_what_the_index_holds_are_filter_errors(text: str) -> None:
    with pytest.raises(FilterError, match="outside"):
        compile_filter(text)


# -- CF result fields: the store LEFT JOINs each incident's current CF result ------------------


def _cf(index, job_id: str, incident_id: str, *, status: str = "scored",  # type: ignore[no-untyped-def]
        score: float | None = None, flagged: bool | None = None, minute: int = 0,
        tenant: str = "acme") -> None:
    """Record a CF job's result rows the way the ``cf`` kind does (``record_cf``)."""
    from sidecar.jobs import JobRecord
    from sidecar.jobs._cf import record_cf

    when = dt.datetime(2025, 1, 1, 0, minute)
    job = JobRecord(id=job_id, incident_id=incident_id, tenant=tenant, kind="cf", state="done",
                    attempts=1, max_attempts=3, error=None, params_json="{}", request_id=None,
                    created_at=when, started_at=when, finished_at=when)
    result: dict[str, object] = {"status": status, "model_fingerprint": "f" * 64,
                                 "detector": "cf", "threshold": 2.0}
    if status == "scored":
        result.update(anomaly_score=score, flagged=flagged, anomaly_p=1 / (1 + (score or 0)),
                      report={"ranked_sites": [["blocks.0.resid_post", score]],
                              "sites": {"blocks.0.resid_post": {"score": score}}})
    with index.write() as con:
        record_cf(con, job, result)
        con.execute("UPDATE cf_results SET created_at = ? WHERE job_id = ?", [when, job_id])


@pytest.fixture(scope="module", params=ENGINES)
def scored(request, tmp_path_factory):  # type: ignore[no-untyped-def]
    """Five stored incidents: s1 flagged (3.1), s2 benign (0.4), s3 re-scored (1.0 then 2.7,
    flagged), s4 no baseline yet, s5 never analysed — in a store on each catalog engine."""
    from sidecar._store import LocalStore
    from tests.unit.sidecar.conftest import build_incident

    root = tmp_path_factory.mktemp("scored")
    store = LocalStore(root, catalog=catalog_for(request.param, request, root))
    for i in range(1, 6):
        store.put(f"s{i}", build_incident(f"s{i}", tenant="acme" if i != 2 else "globex"),
                  tenant=None)
    idx = store.index
    _cf(idx, "j1", "s1", score=3.1, flagged=True)
    _cf(idx, "j2", "s2", score=0.4, flagged=False, tenant="globex")   # the incident's owner
    _cf(idx, "j3a", "s3", score=1.0, flagged=False, minute=1)
    _cf(idx, "j3b", "s3", score=2.7, flagged=True, minute=2)          # newest scored wins
    _cf(idx, "j3c", "s3", status="no_baseline", minute=3)            # unscored never hides it
    _cf(idx, "j4", "s4", status="no_baseline")
    yield store
    store.close()


def _list(store, text: str, order: str = "id") -> list[str]:  # type: ignore[no-untyped-def]
    f = compile_filter(text)
    rows = store.index.query_incidents(f.sql, f.params, compile_order_by(order),
                                       limit=100, offset=0)
    assert store.index.count_incidents(f.sql, f.params) == len(rows)
    return [r.id for r in rows]


@pytest.mark.parametrize(("text", "expected"), [
    ("anomaly_score > 2.5", ["s1", "s3"]),
    ("anomaly_score >= 0.4 AND anomaly_score < 3", ["s2", "s3"]),
    ("anomaly_score > -1", ["s1", "s2", "s3"]),
    ("anomaly_score:*", ["s1", "s2", "s3"]),
    ("NOT anomaly_score:*", ["s4", "s5"]),
    ("cf_flagged = true", ["s1", "s3"]),
    ("anomaly_p <= 0.3", ["s1", "s3"]),                            # p = 1/(1 + score) here
    ("anomaly_p > 0.5", ["s2"]),
    ("NOT anomaly_p:*", ["s4", "s5"]),
    ("cf_flagged = FALSE", ["s2"]),
    ("NOT cf_flagged = true", ["s2", "s4", "s5"]),                 # complement: unscored too
    ('cf_status = "no_baseline"', ["s4"]),
    ("cf_flagged = true AND tenant = acme", ["s1", "s3"]),
    ('cf_flagged = false OR tenant = "acme" AND n_sites = 2', ["s1", "s2", "s3", "s4", "s5"]),
])
def test_filter_on_cf_results(scored, text: str, expected: list[str]) -> None:  # type: ignore[no-untyped-def]
    assert _list(scored, text) == expected


def test_order_by_anomaly_score(scored) -> None:  # type: ignore[no-untyped-def]
    assert _list(scored, "", "anomaly_score desc") == ["s1", "s3", "s2", "s4", "s5"]
    assert _list(scored, "", "anomaly_score asc") == ["s2", "s3", "s1", "s4", "s5"]  # NULLs last
    assert _list(scored, "cf_flagged = true", "anomaly_score") == ["s3", "s1"]
    assert compile_order_by("anomaly_score desc") == '"anomaly_score" DESC NULLS LAST, "id" ASC'
    assert _list(scored, "", "anomaly_p") == ["s1", "s3", "s2", "s4", "s5"]


def test_index_written_before_the_p_column_is_upgraded_on_open(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """An index file whose cf_results lacks ``p`` (schema 1 as first shipped) gains the column
    when opened; its old rows keep NULL and stay listable."""
    import duckdb

    from sidecar._schema import RESULT_DDL
    from sidecar._store_index import Index

    path = tmp_path / "index.duckdb"
    old_ddl = RESULT_DDL[0].replace(", p DOUBLE)", ")")
    assert "p DOUBLE" not in old_ddl
    con = duckdb.connect(str(path))
    con.execute(old_ddl)
    con.execute("INSERT INTO cf_results (job_id, incident_id, tenant, detector, status, score, "
                "created_at) VALUES ('j0', 'old', 'acme', 'cf', 'scored', 3.0, now())")
    con.close()
    idx = Index(path)
    try:
        cols = [r[0] for r in idx.read("DESCRIBE cf_results")]
        assert "p" in cols
        assert idx.read("SELECT score, p FROM cf_results") == [(3.0, None)]
    finally:
        idx.close()


def test_cf_fields_are_parameters_and_join_only_when_used(scored) -> None:  # type: ignore[no-untyped-def]
    from sidecar._store_index import CF_LISTING_COLUMNS, listing_from

    f = compile_filter("anomaly_score > 2.5 AND cf_flagged = true")
    assert f.sql == '("anomaly_score" > ? AND "cf_flagged" = ?)'
    assert f.params == (2.5, True)
    assert set(CF_LISTING_COLUMNS) <= set(FIELDS)
    assert listing_from('"tenant" = ?', '"id" ASC') == "incidents"
    assert "LEFT JOIN" in listing_from('"tenant" = ?', '"anomaly_score" DESC NULLS LAST')
    # the servicer's watch check composes an unqualified id with a CF filter
    assert scored.index.count_incidents(f"id = ? AND {f.sql}", ["s3", *f.params]) == 1


def test_list_incidents_over_grpc_filters_on_cf_score(tmp_path, make_incident) -> None:  # type: ignore[no-untyped-def]
    """The same filter through ListIncidents with token auth: tenant scope AND the CF join."""
    from sidecar._client import SidecarClient
    from sidecar._config import SidecarConfig
    from sidecar._server import create_server

    cfg = SidecarConfig.from_dict({
        "data_dir": str(tmp_path / "data"), "modules": {"cf": {"enabled": False}},
        "auth": {"tokens": [{"token": "acme-token-1", "tenant": "acme"}],
                 "admin_tokens": ["admin-token-1"]}})
    sc, port = create_server(cfg, port=0)
    sc.start()
    try:
        with SidecarClient(f"127.0.0.1:{port}", token="admin-token-1") as admin:
            for i, tenant in ((1, "acme"), (2, "globex"), (3, "acme")):
                admin.upload(f"g{i}", make_incident(f"g{i}", tenant=tenant))
        _cf(sc.store.index, "j1", "g1", score=3.0, flagged=True)
        _cf(sc.store.index, "j2", "g2", score=9.0, flagged=True)
        _cf(sc.store.index, "j3", "g3", score=0.1, flagged=False)
        with SidecarClient(f"127.0.0.1:{port}", token="acme-token-1") as c:
            page = c.list(filter="anomaly_score > 2.5", order_by="anomaly_score desc")
            assert [i.id for i in page.incidents] == ["g1"] and page.total_size == 1
            page = c.list(order_by="anomaly_score desc", page_size=1)
            assert [i.id for i in page.incidents] == ["g1"] and page.next_page_token
            assert page.total_size == 2
    finally:
        sc.stop(grace=0.5)
