"""Decode limits: what a hostile incident asks for is refused before it is decoded (issue 14 #1, #6).

Each test is an attack from the fault-and-abuse probe, built from real Arrow streams: a zstd
bomb, a forged decoded length, many tiny batches, a million rows, and manifests that are huge,
200k levels deep, or dated year 1 at +14:00.
"""

from __future__ import annotations

import json
import struct

import pyarrow as pa
import pytest
import torch

from integrations.errors import DecodeLimitError, IncidentFormatError
from integrations.incident import (
    MANIFEST_KEY,
    SCHEMA,
    DecodeLimits,
    Incident,
    IncidentBuilder,
    new_manifest,
)

MiB = 1024 * 1024


def _incident(tensor: torch.Tensor, *, compression: str | None = None, **manifest: object) -> bytes:
    b = IncidentBuilder(manifest=new_manifest(id="inc-l", **manifest))  # type: ignore[arg-type]
    b.add(kind="activation", site="blocks.0.resid_post", module_path="h.0", step=0, tensor=tensor)
    return b.to_bytes(compression=compression)


def _rewrite(data: bytes, *, batches: list[pa.RecordBatch] | None = None,
             manifest: bytes | None = None) -> bytes:
    reader = pa.ipc.open_stream(data)
    schema = reader.schema
    if manifest is not None:
        schema = schema.with_metadata({MANIFEST_KEY: manifest})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as w:
        for batch in (list(reader) if batches is None else batches):
            w.write_batch(batch.replace_schema_metadata(schema.metadata))
    return bytes(sink.getvalue().to_pybytes())


def test_zstd_bomb_is_refused_before_inflation() -> None:
    bomb = _incident(torch.zeros(1, 32 * 1024, 1024), compression="zstd")   # 128 MiB of zeros
    assert len(bomb) < 64 * 1024
    with pytest.raises(DecodeLimitError, match="max_decoded_bytes = 67108864"):
        Incident.from_bytes(bomb, limits=DecodeLimits(max_decoded_bytes=64 * MiB))
    small = _incident(torch.randn(1, 4, 8), compression="zstd")   # legitimate compression reads
    assert Incident.from_bytes(small, limits=DecodeLimits(max_decoded_bytes=MiB)).sites()


def test_forged_decoded_length_is_refused_with_the_default_limits(tmp_path) -> None:
    data = bytearray(_incident(torch.ones(1, 64, 64), compression="zstd"))
    prefix = struct.pack("<q", 64 * 64 * 4)              # the data buffer's declared length
    at = bytes(data).rfind(prefix)                        # after the offsets buffer
    assert at > 0
    data[at:at + 8] = struct.pack("<q", 1 << 40)          # "inflate me to 1 TiB"
    with pytest.raises(DecodeLimitError, match="max_decoded_bytes"):
        Incident.from_bytes(bytes(data))
    path = tmp_path / "forged.arrow"
    path.write_bytes(bytes(data))
    with pytest.raises(DecodeLimitError):
        Incident.open(path)


def test_many_empty_batches_are_refused_by_message_count() -> None:
    data = _incident(torch.ones(1, 2))
    (batch,) = list(pa.ipc.open_stream(data))
    flood = _rewrite(data, batches=[batch.slice(0, 0)] * 3000 + [batch])
    with pytest.raises(DecodeLimitError, match="max_messages = 1024"):
        Incident.from_bytes(flood)


def test_a_million_rows_are_refused_by_row_count() -> None:
    n = 1_000_000
    rows = pa.RecordBatch.from_arrays([
        pa.DictionaryArray.from_arrays(pa.array([2] * n, pa.int8()),
                                       pa.array(["input", "output", "activation"])),
        pa.DictionaryArray.from_arrays(pa.array([0] * n, pa.int32()), pa.array(["s"])),
        pa.array([""] * n), pa.array(range(n), pa.int32()), pa.array(["float32"] * n),
        pa.array([[0]] * n, SCHEMA.field("shape").type),
        pa.array([b""] * n, pa.large_binary())], schema=SCHEMA)
    data = _rewrite(_incident(torch.ones(1)), batches=[rows])
    with pytest.raises(DecodeLimitError, match="max_rows = 65536"):
        Incident.from_bytes(data)


def test_manifest_size_and_depth_are_capped() -> None:
    base = _incident(torch.ones(2))
    manifest = json.loads(pa.ipc.open_stream(base).schema.metadata[MANIFEST_KEY])
    manifest["padding"] = "x" * (2 * MiB)
    with pytest.raises(DecodeLimitError, match="max_manifest_bytes"):
        Incident.from_bytes(_rewrite(base, manifest=json.dumps(manifest).encode()))
    deep = b"[" * 200_000 + b"]" * 200_000                 # RecursionError in json, untyped
    with pytest.raises(IncidentFormatError, match="max_manifest_depth"):
        Incident.from_bytes(_rewrite(base, manifest=deep))
    manifest.pop("padding")
    manifest["generation"] = {"a": {"b": {"c": {"d": {}}}}}
    with pytest.raises(IncidentFormatError, match="nests 6 levels deep"):
        Incident.from_bytes(_rewrite(base, manifest=json.dumps(manifest).encode()),
                            limits=DecodeLimits(max_manifest_depth=5))


def test_created_at_that_leaves_the_calendar_in_utc_is_a_format_error() -> None:
    base = _incident(torch.ones(2))
    manifest = json.loads(pa.ipc.open_stream(base).schema.metadata[MANIFEST_KEY])
    manifest["created_at"] = "0001-01-01T00:00:00+14:00"
    with pytest.raises(IncidentFormatError, match="outside years 1-9999"):
        Incident.from_bytes(_rewrite(base, manifest=json.dumps(manifest).encode()))


def test_limits_must_be_positive_integers() -> None:
    from integrations.errors import ConfigError

    with pytest.raises(ConfigError, match="max_rows"):
        DecodeLimits(max_rows=0)
