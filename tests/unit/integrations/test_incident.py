"""Incident format: exact round trips, lookups, manifest handling and the size cap."""

from __future__ import annotations

import json
from datetime import datetime

import pytest
import torch

from integrations.errors import IncidentError
from integrations.incident import (
    FORMAT_VERSION,
    ID_PATTERN,
    REQUIRED_KEYS,
    Incident,
    IncidentBuilder,
    IncidentFormatError,
    IncidentTooLargeError,
    TensorNotFoundError,
    TensorRecord,
    new_manifest,
)

_INT_VIEW = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a tensor's raw bits (NaN payloads and -0.0 compare exactly)."""
    t = t.contiguous()
    return t.view(_INT_VIEW[t.dtype]) if t.dtype in _INT_VIEW else t


def _assert_exact(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    assert torch.equal(_bits(a), _bits(b))


def _special_floats(dtype: torch.dtype) -> torch.Tensor:
    base = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-40, -2.5, 3.0],
                        dtype=torch.float32).to(dtype)
    # a NaN with a non-default payload and sign bit, built from raw bits
    bits = base.view(_INT_VIEW[dtype]).clone()
    if dtype == torch.float32:
        bits[0] = -4194303  # 0xFFC00001: negative quiet NaN with payload 1
    elif dtype == torch.float64:
        bits[0] = -2251799813685247  # 0xFFF8000000000001
    else:
        bits[0] = -511  # 0xFE01: NaN with payload in both fp16 and bf16
    return bits.view(dtype).reshape(2, 4)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {
        "f32": torch.randn(2, 3, 4, generator=g),  # [batch, pos, d_model]
        "f32_special": _special_floats(torch.float32),
        "f16_special": _special_floats(torch.float16),
        "bf16_special": _special_floats(torch.bfloat16),
        "f64_special": _special_floats(torch.float64),
        "bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "i64": torch.tensor([[-(2**63), 2**63 - 1, 0, -1]]),
        "i32": torch.arange(-3, 3, dtype=torch.int32),
        "i16": torch.tensor([-32768, 32767], dtype=torch.int16),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255, 7], dtype=torch.uint8),
        "bool": torch.tensor([[True, False, True]]),
        "scalar_f32": torch.tensor(-0.0),
        "scalar_bool": torch.tensor(True),
        "scalar_i64": torch.tensor(42),
        "empty_f32": torch.empty(0, 3),
        "empty_bf16": torch.empty(2, 0, 4, dtype=torch.bfloat16),
        "empty_bool": torch.empty(0, dtype=torch.bool),
        "noncontig": torch.arange(12.0).reshape(3, 4).t(),
    }
    return out


def _build(tensors: dict[str, torch.Tensor], **manifest: object) -> bytes:
    b = IncidentBuilder(manifest=new_manifest(id="inc-rt", **manifest))  # type: ignore[arg-type]
    for i, (name, t) in enumerate(tensors.items()):
        b.add(kind="activation", site=name, module_path=f"m.{i}", step=i % 3, tensor=t)
    return b.to_bytes()


def test_round_trip_is_bit_exact_for_every_dtype_and_shape() -> None:
    tensors = _tensors()
    inc = Incident.from_bytes(_build(tensors))
    assert len(inc) == len(tensors)
    for i, (name, t) in enumerate(tensors.items()):
        got = inc.tensor(name, step=i % 3)
        _assert_exact(got, t)
    # -0.0 and the NaN payload survive as bits, not just as values
    f32 = inc.tensor("f32_special", step=1)
    assert int(f32.view(torch.int32)[0, 0]) == -4194303
    assert int(f32.view(torch.int32)[0, 3]) == -(2**31)  # -0.0
    scalar = inc.tensor("scalar_f32", step=list(tensors).index("scalar_f32") % 3)
    assert scalar.shape == () and int(scalar.view(torch.int32)) == -(2**31)


def test_records_in_stored_order_with_metadata() -> None:
    tensors = _tensors()
    inc = Incident.from_bytes(_build(tensors))
    recs = list(inc.records())
    assert [r.site for r in recs] == list(tensors)
    assert [r.module_path for r in recs] == [f"m.{i}" for i in range(len(tensors))]
    assert [r.step for r in recs] == [i % 3 for i in range(len(tensors))]
    for r, t in zip(recs, tensors.values()):
        assert r.kind == "activation"
        _assert_exact(r.tensor, t)


def test_builder_copies_the_tensor_at_add_time() -> None:
    t = torch.ones(4, requires_grad=True)
    b = IncidentBuilder(manifest={"id": "inc-copy"})
    b.add(kind="activation", site="a", tensor=t)
    with torch.no_grad():
        t.mul_(5)
    inc = Incident.from_bytes(b.to_bytes())
    assert torch.equal(inc.tensor("a"), torch.ones(4))
    assert not inc.tensor("a").requires_grad


def _lookup_incident() -> Incident:
    b = IncidentBuilder(manifest=new_manifest(id="inc-lookup"))
    for step in (0, 1, 2):
        b.add(kind="input", site="input_ids", step=step, tensor=torch.tensor([[step]]))
        b.add(kind="logits", site="logits", step=step, tensor=torch.full((1, 7), float(step)))
        for layer in (1, 0):
            b.add(kind="activation", site=f"blocks.{layer}.resid_post",
                  module_path=f"model.layers.{layer}", step=step,
                  tensor=torch.full((1, 1, 4), 10.0 * layer + step))
    b.add(kind="output", site="output_ids", step=0, tensor=torch.tensor([[5, 6, 7]]))
    b.add(kind="reference", site="logits", step=0, tensor=torch.zeros(1, 7))
    return Incident.from_bytes(b.to_bytes())


def test_sites_steps_and_tensor_lookup() -> None:
    inc = _lookup_incident()
    assert inc.sites() == ["blocks.0.resid_post", "blocks.1.resid_post"]
    assert inc.sites(kind="input") == ["input_ids"]
    assert inc.sites(kind=None) == ["blocks.0.resid_post", "blocks.1.resid_post", "input_ids",
                                    "logits", "output_ids"]
    assert inc.steps("blocks.1.resid_post") == [0, 1, 2]
    assert inc.steps("logits", kind="reference") == [0]
    assert inc.tensor("blocks.1.resid_post", step=2).flatten().tolist() == [12.0] * 4
    assert inc.tensor("input_ids", step=1, kind="input").tolist() == [[1]]
    assert inc.manifest["sites"] == ["blocks.0.resid_post", "blocks.1.resid_post"]
    assert [r.site for r in inc.records(kind="output")] == ["output_ids"]


def test_lookup_errors_say_what_exists() -> None:
    inc = _lookup_incident()
    with pytest.raises(TensorNotFoundError, match=r"steps stored for it: \[0, 1, 2\]") as e:
        inc.tensor("blocks.0.resid_post", step=9)
    assert isinstance(e.value, KeyError)
    with pytest.raises(TensorNotFoundError, match=r"blocks\.0\.resid_post"):
        inc.tensor("blocks.7.resid_post")
    with pytest.raises(TensorNotFoundError, match="sites stored"):
        inc.steps("nope")
    with pytest.raises(TensorNotFoundError, match="unknown kind"):
        inc.sites(kind="activations")
    with pytest.raises(IncidentError, match="pass kind="):
        inc.tensor("logits", step=0)  # stored as logits and as reference


def test_builder_rejects_bad_rows() -> None:
    b = IncidentBuilder(manifest={"id": "inc-bad"})
    with pytest.raises(IncidentFormatError, match="unknown row kind"):
        b.add(kind="activations", site="a", tensor=torch.ones(1))
    with pytest.raises(IncidentFormatError, match="non-empty"):
        b.add(kind="activation", site="", tensor=torch.ones(1))
    with pytest.raises(IncidentFormatError, match="step"):
        b.add(kind="activation", site="a", step=-1, tensor=torch.ones(1))
    with pytest.raises(IncidentFormatError, match="complex64"):
        b.add(kind="activation", site="a", tensor=torch.ones(1, dtype=torch.complex64))
    with pytest.raises(IncidentFormatError, match=r"torch\.Tensor"):
        b.add(kind="activation", site="a", tensor=[1.0])  # type: ignore[arg-type]
    b.add(kind="activation", site="a", tensor=torch.ones(1))
    with pytest.raises(IncidentFormatError, match="duplicate"):
        b.add(kind="activation", site="a", tensor=torch.ones(1))
    assert len(b) == 1


def test_size_cap_raises_typed_error_naming_the_config_key() -> None:
    b = IncidentBuilder(manifest={"id": "inc-big"})
    b.add(kind="activation", site="a", tensor=torch.zeros(64, 1024))  # 256 KiB
    data = b.to_bytes()
    assert b.nbytes >= 64 * 1024 * 4
    assert Incident.from_bytes(b.to_bytes(max_bytes=len(data))).nbytes == len(data)
    with pytest.raises(IncidentTooLargeError) as e:
        b.to_bytes(max_bytes=100_000)
    msg = str(e.value)
    assert "recorder.max_bundle_size_mb" in msg and "100000" in msg
    capped = IncidentBuilder(manifest={"id": "inc-capped"}, max_bytes=300_000)
    capped.add(kind="activation", site="a", tensor=torch.zeros(64, 1024))
    with pytest.raises(IncidentTooLargeError, match="300000"):
        capped.add(kind="activation", site="b", tensor=torch.zeros(64, 1024))
    assert len(capped) == 1


def test_new_manifest_is_complete_json_and_validated_on_read() -> None:
    m = new_manifest(id="inc-m", trigger={"rule": "flag", "reason": "x", "step": 2},
                     request={"id": "r-1", "tenant": "acme", "traceparent": None},
                     seeds={"torch": 0}, custom_label="kept")
    assert set(REQUIRED_KEYS) - {"integrity"} <= set(m)
    assert m["format_version"] == FORMAT_VERSION
    assert datetime.fromisoformat(m["created_at"]).utcoffset() is not None
    assert m["runtime"]["torch"] == torch.__version__
    json.dumps(m, allow_nan=False)
    inc = Incident.from_bytes(IncidentBuilder(manifest=m).to_bytes())
    got = inc.manifest
    assert got["request"]["tenant"] == "acme" and got["custom_label"] == "kept"
    assert got["integrity"]["rows"] == 0 and len(got["integrity"]["sha256"]) == 64
    got["id"] = "changed"
    assert inc.id == "inc-m"  # manifest is a copy


@pytest.mark.parametrize("incident_id", ["inc-1", "A.b_c-9", "x" * 200, "0"])
def test_id_pattern_is_the_manifest_rule(incident_id: str) -> None:
    assert ID_PATTERN.fullmatch(incident_id)
    new_manifest(id=incident_id)  # accepted


@pytest.mark.parametrize("incident_id", ["", "-x", ".hidden", "a/b", "a:b", "x" * 201, "é"])
def test_ids_outside_id_pattern_are_rejected(incident_id: str) -> None:
    assert not ID_PATTERN.fullmatch(incident_id)
    with pytest.raises(IncidentFormatError, match="id"):
        new_manifest(id=incident_id)


def test_minimal_manifest_is_completed_with_explicit_nulls() -> None:
    inc = Incident.from_bytes(IncidentBuilder(manifest={"id": "inc-min"}).to_bytes())
    m = inc.manifest
    assert m["model"] == {"name": None, "revision": None, "fingerprint": None}
    assert m["tokenizer"] is None and m["content_captured"] is None
    assert set(m["runtime"]) >= {"python", "torch", "deterministic", "num_threads"}


@pytest.mark.parametrize(
    "manifest, match",
    [
        ({}, "no 'id'"),
        ({"id": "../etc/passwd"}, "id"),
        ({"id": "inc-1", "x": torch.ones(1)}, "JSON-serialisable"),
        ({"id": "inc-1", "x": float("nan")}, "JSON-serialisable"),
        ({"id": "inc-1", "format_version": 2}, "format_version"),
        ({"id": "inc-1", "activations": "sketched"}, "activations"),
        ({"id": "inc-1", "created_at": "yesterday"}, "created_at"),
    ],
)
def test_builder_rejects_bad_manifest(manifest: dict[str, object], match: str) -> None:
    with pytest.raises(IncidentFormatError, match=match):
        IncidentBuilder(manifest=manifest)


def test_from_records_and_with_manifest_rebuild() -> None:
    inc = _lookup_incident()
    again = Incident.from_records(inc.manifest, inc.records())
    assert again.to_bytes() == inc.to_bytes()  # deterministic: same manifest + rows, same bytes
    replay = inc.with_manifest(id="inc-lookup-replay", activations="replay")
    assert replay.id == "inc-lookup-replay" and replay.manifest["activations"] == "replay"
    assert replay.digest != inc.digest
    for a, b in zip(inc.records(), replay.records()):
        assert (a.kind, a.site, a.step) == (b.kind, b.site, b.step)
        _assert_exact(a.tensor, b.tensor)
    Incident.from_bytes(replay.to_bytes())  # rebuilt incident passes full verification
    with pytest.raises(IncidentError, match="integrity"):
        inc.with_manifest(integrity={})
    rec = TensorRecord("activation", "blocks.0.attn.z[head=1]", "model.layers.0.self_attn", 3,
                       torch.ones(1, 2, 8))
    built = Incident.from_records({"id": "inc-rec"}, [rec])
    assert built.steps("blocks.0.attn.z[head=1]") == [3]


def test_add_without_copy_round_trips_exactly() -> None:
    owned = torch.randn(2, 8).to(torch.bfloat16)  # already a private clone in the caller
    strided = torch.arange(24.0).reshape(4, 6)[:, ::2]  # non-contiguous: copied regardless
    b = IncidentBuilder(manifest={"id": "inc-nocopy"})
    b.add(kind="activation", site="a", tensor=owned, copy=False)
    b.add(kind="activation", site="b", tensor=strided, copy=False)
    inc = Incident.from_bytes(b.to_bytes())
    _assert_exact(inc.tensor("a"), owned)
    _assert_exact(inc.tensor("b"), strided.contiguous())
