"""The row digest streamed during ingest: proved for real incidents whatever the chunking,
never a false "verified" (corrupt bytes, compressed streams, garbage, a layout that changed)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from integrations.errors import IncidentFormatError
from integrations.incident import Incident, IncidentBuilder, new_manifest
from sidecar._ingest_digest import RowLayout, StreamingDigest, VerifyingSink, verify_streamed
from sidecar._store import LocalStore


def _builder(incident_id: str = "inc-1") -> IncidentBuilder:
    gen = torch.Generator().manual_seed(0)
    b = IncidentBuilder(manifest=new_manifest(id=incident_id))
    b.add(kind="input", site="input_ids", step=0,
          tensor=torch.arange(6, dtype=torch.int64).reshape(1, 6))
    b.add(kind="activation", site="blocks.0.resid_post", step=0,
          tensor=torch.empty(1, 0, 8))                                # [batch, pos=0, d_model]
    for i in range(3):
        b.add(kind="activation", site=f"blocks.{i}.mlp", module_path=f"h.{i}.mlp", step=1,
              tensor=torch.randn(1, 16, 32, generator=gen))           # [batch, pos, d_model]
    b.add(kind="logits", site="logits", step=1, tensor=torch.randn(1, 50, generator=gen)
          .to(torch.bfloat16))                                        # [batch, vocab]
    return b


def _stream(tmp_path: Path, data: bytes, chunk: int) -> VerifyingSink:
    from sidecar._store_files import IncomingFile

    sink = VerifyingSink(IncomingFile(tmp_path, "inc-1"), len(data))
    for i in range(0, len(data), chunk):
        sink.write(data[i:i + chunk])
    assert sink.finish() == hashlib.sha256(data).hexdigest()
    return sink


@pytest.mark.parametrize("chunk", [1, 7, 1000, 4096, 1 << 20])
def test_streamed_digest_proves_real_incidents(tmp_path: Path, chunk: int) -> None:
    data = _builder().to_bytes()
    sd = StreamingDigest(len(data))
    for i in range(0, len(data), chunk):
        sd.feed(data[i:i + chunk])
    found = sd.result()
    assert found is not None
    assert found[0] == Incident.from_bytes(data).digest   # the same digest, computed once
    sink = _stream(tmp_path, data, chunk)
    assert sink.digest_verified


def test_corrupt_tensor_is_not_verified_and_the_store_rejects_it(tmp_path: Path) -> None:
    data = bytearray(_builder().to_bytes())
    data[len(data) - 40] ^= 0x01      # inside the last tensor's bytes (before the EOS marker)
    store = LocalStore(tmp_path / "data")
    try:
        inc = store.incoming("inc-1")
        sink = VerifyingSink(inc, len(data))
        sink.write(bytes(data))
        digest = sink.finish()
        assert not sink.digest_verified
        with pytest.raises(IncidentFormatError, match="integrity check failed"):
            store.put_incoming(sink.inner, tenant=None, sha256=digest,
                               digest_verified=sink.digest_verified)
        assert store.index.count_incidents("TRUE", []) == 0
    finally:
        store.close()


def test_compressed_and_garbage_streams_fall_back(tmp_path: Path) -> None:
    zstd = _builder().to_bytes(compression="zstd")
    sink = _stream(tmp_path, zstd, 4096)
    assert not sink.digest_verified            # decompressed buffers are not file positions
    Incident.open(sink.inner.path)             # ... and the ordinary verification accepts it
    for junk in (b"GET / HTTP/1.1\r\n" * 64, b"\xff\xff\xff\xff" + b"\0" * 5000):
        assert not _stream(tmp_path, junk, 1000).digest_verified


def test_verify_streamed_requires_the_same_layout(tmp_path: Path) -> None:
    data = _builder().to_bytes()
    sd = StreamingDigest(len(data))
    sd.feed(data)
    found = sd.result()
    assert found is not None
    path = tmp_path / "x.arrow"
    path.write_bytes(data)
    assert verify_streamed(path, found)
    digest, manifest, rows = found
    shifted = [RowLayout(r.head, r.start + 1, r.end + 1) for r in rows]
    assert not verify_streamed(path, (digest, manifest, shifted))
    assert not verify_streamed(path, ("0" * 64, manifest, rows))
    assert not verify_streamed(tmp_path / "missing.arrow", found)


def test_a_compressed_bomb_is_never_inflated_while_streaming(tmp_path: Path) -> None:
    """The sha256 protocol streams the rows' digest; a zstd bomb (64 MiB of zeros in a few KiB)
    must be left to the store's decoded-size check, not inflated here (chaos run finding:
    +1 GiB sidecar RSS for a 35 KiB upload before this check)."""
    import pyarrow as pa

    b = IncidentBuilder(manifest=new_manifest(id="inc-1"))
    b.add(kind="activation", site="blocks.0.resid_post", step=0,
          tensor=torch.zeros(1, 4096, 4096))                          # 64 MiB of zeros
    bomb = b.to_bytes(compression="zstd")
    assert len(bomb) < 1 << 20
    pool, default = pa.proxy_memory_pool(pa.default_memory_pool()), pa.default_memory_pool()
    pa.set_memory_pool(pool)                                   # its own peak: only this test
    try:
        sink = _stream(tmp_path, bomb, 4096)
    finally:
        pa.set_memory_pool(default)
    assert not sink.digest_verified
    assert pool.max_memory() < 8 << 20                          # nothing near 64 MiB decoded
