"""AIP-160 filters / AIP-132 order_by compiled to parameterised SQL, run on real DuckDB."""

from __future__ import annotations

import datetime as dt

import pytest

from sidecar._filters import (
    FilterError,
    compile_filter,
    compile_order_by,
    decode_page_token,
    encode_page_token,
    query_key,
)


@pytest.fixture(scope="module")
def db():  # type: ignore[no-untyped-def]
    import duckdb

    con = duckdb.connect()
    con.execute("CREATE TABLE incidents (id VARCHAR, tenant VARCHAR, created_at TIMESTAMP, "
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
        con.execute("INSERT INTO incidents (id, tenant, created_at, received_at, model_name, "
                    "trigger_rule, trigger_reason, size_bytes, n_sites, traceparent) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [*r[:3], r[2], *r[3:]])
    yield con
    con.close()


def ids(db, text: str) -> list[str]:  # type: ignore[no-untyped-def]
    f = compile_filter(text)
    return [r[0] for r in db.execute(f"SELECT id FROM incidents WHERE {f.sql} ORDER BY id",
                                     list(f.params)).fetchall()]


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
    assert compile_order_by("") == '"received_at" DESC, "id" ASC'
    assert compile_order_by("created_at desc, tenant") == \
        '"created_at" DESC, "tenant" ASC, "id" ASC'
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
    for junk in ("not-base64!!", "eyJ4IjoxfQ", encode_page_token(-1, key)):
        with pytest.raises(FilterError):
            decode_page_token(junk, key)
