"""AIP-160 filters and AIP-132 ``order_by`` compiled to parameterised SQL over a field whitelist.

Supported filter subset: comparisons ``field = value`` ``!=`` ``<`` ``>`` ``<=`` ``>=``, the has
operator ``field : value`` (substring for strings; ``field:*`` = present and non-empty),
``AND``, ``OR``, ``NOT`` / ``-``, parentheses, string literals (double or single quotes; a
trailing ``*`` in an ``=`` string is a prefix match), numbers, bare words, and RFC 3339
timestamps (as strings) for time fields, ``true`` / ``false`` for boolean fields. As in
AIP-160, ``OR`` binds tighter than ``AND``: ``a AND b OR c`` is ``a AND (b OR c)``. Identifiers
are never interpolated from user text: only whitelisted column names reach the SQL, every value
is a ``?`` parameter.

Besides the ``incidents`` columns, the incident's current Compression Forensics result can be
filtered and sorted on (the store LEFT JOINs it in, ``sidecar._store_index.listing_from``):
``anomaly_score`` (robust z; absent until CF scored the incident), ``anomaly_p`` (its
empirical p-value against the baseline; e.g. ``anomaly_p <= 0.05``), ``cf_flagged`` and
``cf_status`` (``scored`` | ``no_baseline`` | ``no_activations``). A comparison on an absent
value matches nothing, and ``NOT`` is the complement of what matches: ``NOT cf_flagged = true``
includes incidents CF has not scored; ``anomaly_score:*`` selects the scored ones.
``failure_p`` is the probability of failure a per-(tenant, model) failure-signature probe gives
the incident (``sidecar.jobs._probe``; absent until a probe scored it): ``failure_p >= 0.9 AND
NOT trigger_rule = "flag"`` lists the likely failures the serving flag missed.

Example::

    f = compile_filter('tenant = "acme" AND created_at >= "2025-01-01T00:00:00Z"')
    f.sql, f.params     # ('("tenant" = ? AND "created_at" >= ?)', ['acme', datetime(...)])
    compile_filter("anomaly_score > 2.5 AND cf_flagged = true")  # CF results (LEFT JOIN)
    compile_order_by("anomaly_score desc")  # '"anomaly_score" DESC NULLS LAST, "id" ASC'
    compile_filter("tenant = 'a'; DROP TABLE x")   # FilterError: ... at position 13 ...
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import hashlib
import json
import re
from typing import Any

from integrations.errors import ForensicsError

__all__ = [
    "FIELDS",
    "MAX_PAGE_OFFSET",
    "MAX_PAGE_TOKEN_CHARS",
    "CompiledFilter",
    "FilterError",
    "compile_filter",
    "compile_order_by",
    "decode_page_token",
    "encode_page_token",
    "query_key",
]

#: Filterable / sortable fields → value type ("str", "int", "float", "bool", "time"). The
#: ``anomaly_*`` / ``cf_*`` ones come from the incident's current CF result
#: (``_store_index.CF_LISTING_COLUMNS``); ``failure_p`` is the failure-signature probe's score.
FIELDS: dict[str, str] = {
    "id": "str", "tenant": "str", "created_at": "time", "received_at": "time",
    "model_name": "str", "model_fingerprint": "str", "trigger_rule": "str",
    "trigger_reason": "str", "request_id": "str", "traceparent": "str", "size_bytes": "int",
    "sha256": "str", "activations": "str", "n_sites": "int",
    "anomaly_score": "float", "anomaly_p": "float", "cf_flagged": "bool", "cf_status": "str",
    "failure_p": "float", "content_sha256": "str", "integrity": "str",
}
MAX_FILTER_CHARS = 4096
#: Page tokens are short JSON; a longer one was not issued here.
MAX_PAGE_TOKEN_CHARS = 256
#: No listing reaches this offset (DuckDB's OFFSET is a signed 64-bit integer).
MAX_PAGE_OFFSET = 2**53
MAX_DEPTH = 32


class FilterError(ForensicsError, ValueError):
    """A filter or order_by is invalid; ``position`` is the 1-based character position."""

    def __init__(self, message: str, *, position: int | None = None) -> None:
        super().__init__(message)
        self.position = position


@dataclasses.dataclass(frozen=True)
class CompiledFilter:
    """A SQL boolean expression (``?`` placeholders) and its parameters, in order."""

    sql: str
    params: tuple[Any, ...]

    @property
    def empty(self) -> bool:
        return self.sql == "TRUE"


_TOKEN_RE = re.compile(r"""
    (?P<ws>\s+)
  | (?P<op><=|>=|!=|=|<|>|:)
  | (?P<lp>\()
  | (?P<rp>\))
  | (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<ts>\d{4}-\d{2}-\d{2}(?:T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?)?(?:Z|[+-]\d{2}:\d{2})?(?![\w.:\-]))
  | (?P<num>-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w.:\-]))
  | (?P<minus>-)
  | (?P<star>\*)
  | (?P<word>[A-Za-z_][A-Za-z0-9_.\-]*)
""", re.VERBOSE)

_KEYWORDS = {"AND", "OR", "NOT"}
_OPS = {"=": "=", "!=": "<>", "<": "<", ">": ">", "<=": "<=", ">=": ">="}


@dataclasses.dataclass(frozen=True)
class _Tok:
    kind: str   # op lp rp str num minus star word kw end
    text: str
    pos: int    # 1-based


def _tokenize(text: str) -> list[_Tok]:
    toks: list[_Tok] = []
    i = 0
    while i < len(text):
        m = _TOKEN_RE.match(text, i)
        if m is None:
            raise FilterError(f"invalid filter: unexpected character {text[i]!r} at position "
                              f"{i + 1}", position=i + 1)
        kind = m.lastgroup or ""
        if kind != "ws":
            word = m.group()
            if kind == "word" and word in _KEYWORDS:
                kind = "kw"
            toks.append(_Tok(kind, word, i + 1))
        i = m.end()
    toks.append(_Tok("end", "", len(text) + 1))
    return toks


def _unquote(text: str) -> str:
    body = text[1:-1]
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), body)


class _Parser:
    def __init__(self, text: str) -> None:
        self.toks = _tokenize(text)
        self.i = 0
        self.params: list[Any] = []
        self.depth = 0

    @property
    def tok(self) -> _Tok:
        return self.toks[self.i]

    def fail(self, what: str, tok: _Tok | None = None) -> FilterError:
        tok = tok or self.tok
        got = "end of filter" if tok.kind == "end" else repr(tok.text)
        return FilterError(f"invalid filter: {what} at position {tok.pos}, got {got}",
                           position=tok.pos)

    def parse(self) -> str:
        sql = self.expression()
        if self.tok.kind != "end":
            raise self.fail("expected AND, OR or end of filter")
        return sql

    # expression := sequence {AND sequence}
    def expression(self) -> str:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.fail(f"filter nested deeper than {MAX_DEPTH}")
        parts = [self.factor()]
        while self.tok.kind == "kw" and self.tok.text == "AND":
            self.i += 1
            parts.append(self.factor())
        self.depth -= 1
        return parts[0] if len(parts) == 1 else "(" + " AND ".join(parts) + ")"

    # factor := term {OR term}
    def factor(self) -> str:
        parts = [self.term()]
        while self.tok.kind == "kw" and self.tok.text == "OR":
            self.i += 1
            parts.append(self.term())
        return parts[0] if len(parts) == 1 else "(" + " OR ".join(parts) + ")"

    # term := [NOT | -] simple
    def term(self) -> str:
        if (self.tok.kind == "kw" and self.tok.text == "NOT") or self.tok.kind == "minus":
            self.i += 1
            # complement of the matches: a comparison on a NULL (e.g. no CF score) is unknown,
            # which NOT must turn into a match, not into another unknown
            return f"(NOT coalesce({self.simple()}, FALSE))"
        return self.simple()

    # simple := '(' expression ')' | comparison
    def simple(self) -> str:
        if self.tok.kind == "lp":
            self.i += 1
            sql = self.expression()
            if self.tok.kind != "rp":
                raise self.fail("expected ')'")
            self.i += 1
            return sql
        return self.comparison()

    def comparison(self) -> str:
        ftok = self.tok
        if ftok.kind != "word":
            raise self.fail("expected a field name")
        if ftok.text not in FIELDS:
            raise FilterError(f"invalid filter: unknown field {ftok.text!r} at position "
                              f"{ftok.pos}; valid fields: {', '.join(sorted(FIELDS))}",
                              position=ftok.pos)
        field, ftype, col = ftok.text, FIELDS[ftok.text], f'"{ftok.text}"'
        self.i += 1
        optok = self.tok
        if optok.kind != "op":
            raise self.fail(f"expected a comparison operator after {field!r}")
        self.i += 1
        vtok = self.tok
        if optok.text == ":":
            if vtok.kind == "star":
                self.i += 1
                return (f"({col} IS NOT NULL AND {col} <> '')" if ftype == "str"
                        else f"({col} IS NOT NULL)")
            value = self.value(field, ftype)
            if ftype != "str":
                return self.bind(f"{col} = ?", value)
            return self.bind(f"strpos({col}, ?) > 0", value)
        if vtok.kind == "star":
            raise self.fail("'*' is only valid with ':' (e.g. field:*)", vtok)
        value = self.value(field, ftype)
        op = _OPS[optok.text]
        if (ftype == "str" and optok.text in ("=", "!=") and vtok.kind == "str"
                and isinstance(value, str) and value.endswith("*") and not value.endswith("\\*")):
            escaped = re.sub(r"([\\%_])", r"\\\1", value[:-1]) + "%"
            neg = "NOT " if op == "<>" else ""
            return self.bind(f"({neg}{col} LIKE ? ESCAPE '\\')", escaped)
        return self.bind(f"{col} {op} ?", value)

    def bind(self, sql: str, value: Any) -> str:
        self.params.append(value)
        return sql

    def value(self, field: str, ftype: str) -> Any:
        tok = self.tok
        if tok.kind not in ("str", "num", "word", "ts"):
            raise self.fail(f"expected a value for {field!r}")
        self.i += 1
        raw = _unquote(tok.text) if tok.kind == "str" else tok.text
        if ftype == "str":
            return raw
        if ftype == "int":
            if tok.kind == "str" or not re.fullmatch(r"-?\d+", raw):
                raise FilterError(f"invalid filter: {field!r} needs an integer at position "
                                  f"{tok.pos}, got {tok.text!r}", position=tok.pos)
            value = int(raw)
            if not -(2**63) <= value < 2**63:
                raise FilterError(f"invalid filter: {field!r} at position {tok.pos} is outside "
                                  "the 64-bit integer range", position=tok.pos)
            return value
        if ftype == "float":
            if tok.kind != "num":
                raise FilterError(f"invalid filter: {field!r} needs a number such as 2.5 at "
                                  f"position {tok.pos}, got {tok.text!r}", position=tok.pos)
            return float(raw)
        if ftype == "bool":
            if tok.kind not in ("word", "str") or raw.lower() not in ("true", "false"):
                raise FilterError(f"invalid filter: {field!r} needs true or false at position "
                                  f"{tok.pos}, got {tok.text!r}", position=tok.pos)
            return raw.lower() == "true"
        try:  # time
            when = dt.datetime.fromisoformat(raw)
        except ValueError:
            raise FilterError(f"invalid filter: {field!r} needs an RFC 3339 timestamp such as "
                              f"\"2025-01-31T12:00:00Z\" at position {tok.pos}, got {tok.text!r}",
                              position=tok.pos) from None
        if when.tzinfo is not None:
            try:   # e.g. 0001-01-01T00:00:00+14:00 is before year 1 in UTC
                when = when.astimezone(dt.timezone.utc).replace(tzinfo=None)
            except (OverflowError, ValueError):
                raise FilterError(f"invalid filter: {field!r} at position {tok.pos} is outside "
                                  "years 1-9999 once converted to UTC", position=tok.pos) from None
        return when


def compile_filter(text: str) -> CompiledFilter:
    """Compile an AIP-160 filter string; ``""`` → ``TRUE``. Raises :class:`FilterError`."""
    if len(text) > MAX_FILTER_CHARS:
        raise FilterError(f"invalid filter: longer than {MAX_FILTER_CHARS} characters",
                          position=MAX_FILTER_CHARS + 1)
    if not text.strip():
        return CompiledFilter("TRUE", ())
    parser = _Parser(text)
    sql = parser.parse()
    return CompiledFilter(sql, tuple(parser.params))


def compile_order_by(text: str, *, default: str = "received_at desc") -> str:
    """Compile an AIP-132 ``order_by`` (``"field [asc|desc], ..."``) to a SQL ORDER BY list.

    Only whitelisted fields; ``id`` is appended as a final tie-breaker so pages are stable.
    Absent values (NULL, e.g. ``anomaly_score`` of an unscored incident) sort last in either
    direction.
    """
    text = text.strip() or default
    parts: list[str] = []
    seen: set[str] = set()
    pos = 1
    for item in text.split(","):
        words = item.split()
        where = pos + len(item) - len(item.lstrip())
        pos += len(item) + 1
        if not words or len(words) > 2:
            raise FilterError(f"invalid order_by: expected 'field [asc|desc]' at position "
                              f"{where}, got {item.strip()!r}", position=where)
        field = words[0]
        direction = words[1].lower() if len(words) == 2 else "asc"
        if field not in FIELDS:
            raise FilterError(f"invalid order_by: unknown field {field!r} at position {where}; "
                              f"valid fields: {', '.join(sorted(FIELDS))}", position=where)
        if direction not in ("asc", "desc"):
            raise FilterError(f"invalid order_by: direction must be asc or desc at position "
                              f"{where}, got {words[1]!r}", position=where)
        if field in seen:
            raise FilterError(f"invalid order_by: field {field!r} repeated at position {where}",
                              position=where)
        seen.add(field)
        nulls = "" if field == "id" else " NULLS LAST"
        parts.append(f'"{field}" {direction.upper()}{nulls}')
    if "id" not in seen:
        parts.append('"id" ASC')
    return ", ".join(parts)


def query_key(*parts: str) -> str:
    """A short hash binding a page token to one query (filter, order_by, tenant)."""
    h = hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()
    return h[:16]


def encode_page_token(offset: int, key: str) -> str:
    """Opaque page token: urlsafe base64 of ``{"o": offset, "q": key}``."""
    raw = json.dumps({"o": offset, "q": key}, separators=(",", ":")).encode("ascii")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_page_token(token: str, key: str) -> int:
    """The offset in ``token``; :class:`FilterError` when it is malformed (also: longer than
    :data:`MAX_PAGE_TOKEN_CHARS`, an offset at or past :data:`MAX_PAGE_OFFSET`) or was issued
    for a different filter / order_by."""
    invalid = FilterError("invalid page_token: not a token from this API; "
                          "start again without page_token")
    if len(token) > MAX_PAGE_TOKEN_CHARS:
        raise invalid
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        offset, qkey = data["o"], data["q"]
    except (ValueError, KeyError, TypeError, binascii.Error, RecursionError):
        raise invalid from None
    if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset < \
            MAX_PAGE_OFFSET:
        raise invalid
    if qkey != key:
        raise FilterError("invalid page_token: it was issued for a different filter or "
                          "order_by; pass the same filter and order_by, or drop page_token")
    return offset
