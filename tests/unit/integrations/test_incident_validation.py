"""Incident reading rejects every malformed input with IncidentFormatError — never zeros/partials."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from integrations.incident import (
    MANIFEST_KEY,
    SCHEMA,
    Incident,
    IncidentBuilder,
    IncidentFormatError,
    new_manifest,
)

MARKER = torch.arange(1000, 1016, dtype=torch.float32).reshape(4, 4)  # distinctive data bytes


def _valid() -> bytes:
    b = IncidentBuilder(manifest=new_manifest(
        id="inc-v", request={"id": "r-1", "tenant": "acme", "traceparent": None}))
    b.add(kind="input", site="input_ids", step=0, tensor=torch.tensor([[3, 1, 4]]))
    b.add(kind="activation", site="blocks.0.resid_post", module_path="model.layers.0", step=0,
          tensor=MARKER)
    b.add(kind="activation", site="blocks.0.mask", step=0, tensor=torch.tensor([True, False]))
    b.add(kind="logits", site="logits", step=1, tensor=torch.ones(1, 5, dtype=torch.bfloat16))
    return b.to_bytes()


VALID = _valid()


def _read(data: bytes) -> tuple[pa.Schema, list[pa.RecordBatch]]:
    reader = pa.ipc.open_stream(data)
    return reader.schema, list(reader)


def _write(schema: pa.Schema, batches: list[pa.RecordBatch]) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as w:
        for batch in batches:
            w.write_batch(batch)
    return bytes(sink.getvalue().to_pybytes())


def _with_manifest(fn: Callable[[dict[str, Any]], Any]) -> bytes:
    """Rewrite VALID with the manifest changed by ``fn`` (mutates, or returns raw bytes)."""
    schema, batches = _read(VALID)
    manifest = json.loads(schema.metadata[MANIFEST_KEY])
    raw = fn(manifest)
    text = raw if isinstance(raw, bytes) else json.dumps(manifest).encode()
    new_schema = schema.with_metadata({MANIFEST_KEY: text})
    return _write(new_schema, [b.replace_schema_metadata(new_schema.metadata) for b in batches])


def _with_column(name: str, values: list[Any], type_: pa.DataType | None = None) -> bytes:
    """Rewrite VALID with one column replaced (manifest and digest kept)."""
    schema, (batch,) = _read(VALID)
    field = schema.field(name)
    arr = pa.array(values, type_ or field.type)
    cols = [arr if n == name else batch.column(n) for n in schema.names]
    return _write(schema, [pa.RecordBatch.from_arrays(cols, schema=schema)])


def _assert_rejected(data: Any, match: str | None = None) -> IncidentFormatError:
    with pytest.raises(IncidentFormatError, match=match) as e:
        Incident.from_bytes(data)
    return e.value


def test_valid_fixture_loads() -> None:
    inc = Incident.from_bytes(VALID)
    assert torch.equal(inc.tensor("blocks.0.resid_post"), MARKER)


@pytest.mark.parametrize(
    "cut",
    [1, 4, 8, 40, 200, len(VALID) // 2, len(VALID) - 9, len(VALID) - 8, len(VALID) - 4,
     len(VALID) - 1],
    ids=["1", "4", "8", "40", "header-200", "middle", "before-eos", "no-eos", "half-eos",
         "last-byte"],
)
def test_truncated_is_rejected(cut: int) -> None:
    _assert_rejected(VALID[:cut])


def test_every_truncation_point_is_rejected() -> None:
    for cut in range(len(VALID)):
        with pytest.raises(IncidentFormatError):
            Incident.from_bytes(VALID[:cut])


def test_every_single_byte_flip_is_rejected_or_harmless() -> None:
    """Flipping any byte either fails validation or leaves the content exactly as written."""
    ref = [(r.kind, r.site, r.module_path, r.step, r.tensor) for r in
           Incident.from_bytes(VALID).records()]
    ref_manifest = Incident.from_bytes(VALID).manifest
    accepted = 0
    buf = bytearray(VALID)
    for i in range(len(buf)):
        buf[i] ^= 0x5A
        try:
            inc = Incident.from_bytes(bytes(buf))
        except IncidentFormatError:
            pass
        else:  # e.g. a padding byte: must not have changed anything observable
            accepted += 1
            assert inc.manifest == ref_manifest
            got = [(r.kind, r.site, r.module_path, r.step, r.tensor) for r in inc.records()]
            assert len(got) == len(ref)
            for a, b in zip(got, ref):
                assert a[:4] == b[:4] and a[4].dtype == b[4].dtype
                assert torch.equal(a[4].view(torch.uint8) if a[4].dtype == torch.bfloat16
                                   else a[4], b[4].view(torch.uint8)
                                   if b[4].dtype == torch.bfloat16 else b[4])
        buf[i] ^= 0x5A
    assert accepted < len(VALID) // 2  # the overwhelming majority of flips is caught


def test_flipped_data_byte_fails_the_digest() -> None:
    pos = VALID.find(MARKER.numpy().tobytes())
    assert pos > 0
    bad = bytearray(VALID)
    bad[pos + 5] ^= 0x01
    _assert_rejected(bytes(bad), "integrity check failed")
    # the digest is what catches it: structure alone is still fine
    unverified = Incident.from_bytes(bytes(bad), verify=False)
    assert not torch.equal(unverified.tensor("blocks.0.resid_post"), MARKER)


def test_changed_manifest_value_fails_the_digest() -> None:
    pos = VALID.find(b'"acme"')
    bad = VALID[:pos] + b'"acmf"' + VALID[pos + 6 :]
    _assert_rejected(bad, "integrity check failed")


def _parquet() -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.table({"x": [1, 2, 3]}), sink)
    return sink.getvalue()


def _arrow_file_format() -> bytes:
    schema, batches = _read(VALID)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema) as w:
        for b in batches:
            w.write_batch(b)
    return bytes(sink.getvalue().to_pybytes())


@pytest.mark.parametrize(
    "data",
    [
        b"",
        os.urandom(4096),
        b"\xff\xff\xff\xff" + os.urandom(200) + b"\xff\xff\xff\xff\x00\x00\x00\x00",
        json.dumps({"id": "inc-1"}).encode(),
        _parquet(),
        _arrow_file_format(),
        _write(pa.schema([pa.field("x", pa.int64())]),
               [pa.record_batch([pa.array([1, 2])], names=["x"])]),
        VALID + b"junk",
    ],
    ids=["empty", "random", "random-with-eos", "json", "parquet", "arrow-file-format",
         "other-arrow-schema", "trailing-bytes"],
)
def test_foreign_bytes_are_rejected(data: bytes) -> None:
    _assert_rejected(data)


def test_non_bytes_input_is_rejected() -> None:
    _assert_rejected(12345, "bytes-like")


def test_missing_manifest_metadata() -> None:
    schema, batches = _read(VALID)
    plain = schema.remove_metadata()
    data = _write(plain, [b.replace_schema_metadata(None) for b in batches])
    _assert_rejected(data, "forensics.manifest")


def test_extra_metadata_key() -> None:
    schema, batches = _read(VALID)
    meta = {**schema.metadata, b"other": b"x"}
    _assert_rejected(_write(schema.with_metadata(meta), batches), "unexpected schema metadata")


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda m: b"{not json", "not valid UTF-8 JSON"),
        (lambda m: b"\xff\xfe", "not valid UTF-8 JSON"),
        (lambda m: b"[1, 2]", "expected a JSON object"),
        (lambda m: b'{"id": NaN}', "not valid UTF-8 JSON"),
        (lambda m: m.update(format_version=2), "unsupported incident format_version 2"),
        (lambda m: m.update(format_version="1"), "format_version must be an integer"),
        (lambda m: m.pop("model"), r"missing required keys \['model'\]"),
        (lambda m: m.pop("integrity"), "integrity"),
        (lambda m: m["model"].pop("fingerprint"), "fingerprint"),
        (lambda m: m.update(id="a/b"), "id"),
        (lambda m: m.update(content_captured="yes"), "content_captured"),
        (lambda m: m["integrity"].update(algorithm="md5"), "unsupported integrity algorithm"),
        (lambda m: m["integrity"].update(rows=5), "holds 4 rows but was written with 5"),
    ],
    ids=["bad-json", "bad-utf8", "json-array", "json-nan", "version-2", "version-str",
         "missing-model", "missing-integrity", "missing-fingerprint", "bad-id",
         "bad-content-captured", "unknown-digest", "row-count"],
)
def test_bad_manifest(mutate: Callable[[dict[str, Any]], Any], match: str) -> None:
    _assert_rejected(_with_manifest(mutate), match)


def test_unsupported_version_says_upgrade() -> None:
    err = _assert_rejected(_with_manifest(lambda m: m.update(format_version=2)))
    assert "upgrade" in str(err)


_SHAPES = [[1, 3], [4, 4], [2], [1, 5]]


@pytest.mark.parametrize(
    "column, values, match",
    [
        ("shape", [[1, 3], [4, 5], [2], [1, 5]], "needs 80 bytes but the row holds 64"),
        ("shape", [[1, 3], [4, 4], [2], [1, 4]], "needs 8 bytes but the row holds 10"),
        ("shape", [[1, 3], [-4, -4], [2], [1, 5]], "negative dimension"),
        ("dtype", ["int64", "complex64", "bool", "bfloat16"], "dtype 'complex64' is not allowed"),
        ("dtype", ["int64", "int32", "bool", "bfloat16"], None),  # same itemsize: digest catches
        ("step", [0, -1, 0, 1], "negative step"),
        ("module_path", ["", "model.layers.1", "", ""], "integrity check failed"),
    ],
    ids=["shape-too-big", "shape-too-small", "negative-dim", "dtype-not-allowed",
         "dtype-swapped", "negative-step", "module-path-changed"],
)
def test_bad_rows(column: str, values: list[Any], match: str | None) -> None:
    _assert_rejected(_with_column(column, values), match or "integrity check failed")


def test_unknown_kind_and_empty_site() -> None:
    kinds = pa.DictionaryArray.from_arrays(pa.array([0, 1, 1, 2], pa.int8()),
                                           pa.array(["input", "activation", "sketch"]))
    _assert_rejected(_with_column("kind", kinds, SCHEMA.field("kind").type), "unknown kind")
    sites = pa.array(["input_ids", "", "blocks.0.mask", "logits"]).dictionary_encode()
    _assert_rejected(_with_column("site", sites, SCHEMA.field("site").type), "empty site")


def test_duplicate_rows() -> None:
    sites = pa.array(["input_ids", "blocks.0.mask", "blocks.0.mask", "logits"]).dictionary_encode()
    _assert_rejected(_with_column("site", sites, SCHEMA.field("site").type), "duplicate row")


def test_bool_bytes_other_than_0_1() -> None:
    pos = VALID.find(bytes([1, 0]) + bytes(np.ones((1, 5), "<u2") * 0x3F80))
    assert pos > 0
    bad = bytearray(VALID)
    bad[pos] = 2
    _assert_rejected(bytes(bad), "bool tensor holds bytes other than 0 and 1")


def test_null_values() -> None:
    schema, (batch,) = _read(VALID)
    steps = pa.array([0, None, 0, 1], pa.int32())
    cols = [steps if n == "step" else batch.column(n) for n in schema.names]
    data = _write(schema, [pa.RecordBatch.from_arrays(cols, schema=schema)])
    _assert_rejected(data, "null")


@pytest.mark.parametrize(
    "name, field",
    [
        ("step", pa.field("step", pa.int64(), nullable=False)),
        ("step", pa.field("step", pa.int32(), nullable=True)),
        ("shape", pa.field("shape", pa.list_(pa.field("item", pa.int64(), nullable=False)),
                           nullable=False)),
        ("data", pa.field("data", pa.binary(), nullable=False)),
        ("kind", pa.field("kind", pa.utf8(), nullable=False)),
    ],
    ids=["step-int64", "step-nullable", "shape-int64", "data-binary", "kind-plain-utf8"],
)
def test_wrong_schema(name: str, field: pa.Field) -> None:
    schema, (batch,) = _read(VALID)
    new_schema = schema.set(schema.get_field_index(name), field)
    cols = [batch.column(n).cast(field.type) if n == name else batch.column(n)
            for n in schema.names]
    data = _write(new_schema, [pa.RecordBatch.from_arrays(cols, schema=new_schema)])
    _assert_rejected(data, "not the incident schema")


def test_missing_and_extra_columns() -> None:
    schema, (batch,) = _read(VALID)
    dropped = pa.RecordBatch.from_arrays(batch.columns[:-1], schema=pa.schema(
        list(schema)[:-1], metadata=schema.metadata))
    _assert_rejected(_write(dropped.schema, [dropped]), "not the incident schema")
    extra_schema = schema.append(pa.field("extra", pa.int8(), nullable=False))
    extra = pa.RecordBatch.from_arrays([*batch.columns, pa.array([0, 0, 0, 0], pa.int8())],
                                       schema=extra_schema)
    _assert_rejected(_write(extra_schema, [extra]), "not the incident schema")


def test_several_record_batches_read_like_one() -> None:
    schema, (batch,) = _read(VALID)
    data = _write(schema, [batch.slice(0, 1), batch.slice(1, 2), batch.slice(3)])
    a, b = Incident.from_bytes(VALID), Incident.from_bytes(data)
    assert [(r.kind, r.site, r.step) for r in a.records()] == \
           [(r.kind, r.site, r.step) for r in b.records()]
    assert torch.equal(b.tensor("blocks.0.resid_post"), MARKER)
    # dropping a whole batch (with a valid end-of-stream marker) is still caught
    _assert_rejected(_write(schema, [batch.slice(0, 1), batch.slice(3)]), "holds 2 rows")
