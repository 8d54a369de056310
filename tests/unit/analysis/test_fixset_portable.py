"""The portable fix (DESIGN §14): ``FixSet.save/load`` (JSON + safetensors, validated) and
``with fix.apply(model):`` on any input — checked against replay with the same interventions
on tiny GPT-2, and against tampered files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from analysis.cca import FixSet
from analysis.interventions import (
    DonorBaseline,
    Intervention,
    LinearGate,
    PromptGate,
    Subspace,
)
from analysis.replay import Replayer
from integrations.errors import FixFileError, InterventionError

from .test_replay import ids, record


def _vec(seed: int, d: int = 32) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


def _fix(interventions: list[Intervention]) -> FixSet:
    return FixSet(flip=True, interventions=interventions, reason="", failure="token 7",
                  incident_id="inc-1", strategy="directions", intervention_kind="project",
                  n_candidates=1, metric_before=1.0, metric_after=-1.0, flip_rate=0.9,
                  model={"name": "tiny-gpt2"})


@pytest.fixture(scope="module")
def portable() -> list[Intervention]:
    base = DonorBaseline.from_vectors({"blocks.0.mlp": torch.randn(
        5, 32, generator=torch.Generator().manual_seed(1))})
    two = Subspace.from_directions(torch.stack([_vec(2), _vec(3)]), to="clamp",
                                   lo=torch.tensor([-1.0, -0.5]), hi=torch.tensor([0.5, 1.0]))
    return [
        Intervention("blocks.0.mlp[pos=-1]", "mean", donor=base),
        Intervention("blocks.1.resid_post", "project", direction=two),
        Intervention("blocks.1.attn.z[head=2]", "scale", factor=0.5),
        Intervention("blocks.2.resid_post[pos=-2:]", "steer", direction=_vec(4), factor=0.7,
                     gate=LinearGate(weight=_vec(5), bias=0.1)),
        Intervention("blocks.2.mlp", "project", direction=Subspace.from_directions(_vec(6)),
                     gate=PromptGate(site="blocks.1.resid_post", weight=_vec(7), bias=0.05)),
    ]


def test_apply_on_a_live_model_matches_replay(tiny_gpt2: Any,
                                              portable: list[Intervention]) -> None:
    x = ids(7, seed=3)
    inc = record(tiny_gpt2, lambda: tiny_gpt2.generate(x, max_new_tokens=3, do_sample=False),
                 sites=["blocks.0.mlp"])
    replayed = Replayer(tiny_gpt2).load(inc).run(portable, greedy=True)   # free continuation

    def n_hooks() -> int:    # transformers keeps its own output-capture hooks once installed
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks)
                   for m in tiny_gpt2.modules())

    before = n_hooks()
    seen: list[torch.Tensor] = []
    hook = tiny_gpt2.register_forward_hook(lambda m, a, o: seen.append(o.logits[:, -1]))
    try:
        with _fix(portable).apply(tiny_gpt2), torch.no_grad():
            inside = n_hooks()
            out = tiny_gpt2.generate(x, max_new_tokens=3, do_sample=False)
    finally:
        hook.remove()
    assert len(seen) == len(replayed.logits) == 3
    for live, rep in zip(seen, replayed.logits):
        assert rep is not None and torch.allclose(live, rep, atol=1e-5)
    assert inside > before + 1 and n_hooks() == before     # ours installed, removed on exit
    with torch.no_grad():
        plain = tiny_gpt2.generate(x, max_new_tokens=3, do_sample=False)
    assert out.shape == plain.shape


def test_save_load_round_trip(tmp_path: Path, tiny_gpt2: Any,
                              portable: list[Intervention]) -> None:
    fix = _fix(portable)
    path = fix.save(tmp_path / "fix.json")
    assert path.exists() and (tmp_path / "fix.safetensors").exists()
    back = FixSet.load(path)
    assert [iv.label for iv in back.interventions] == [iv.label for iv in portable]
    assert back.model == {"name": "tiny-gpt2"}
    assert back.derivation is not None and back.derivation["flip_rate"] == 0.9
    x = ids(9, seed=4)
    with torch.no_grad():
        with fix.apply(tiny_gpt2):
            a = tiny_gpt2(x).logits
        with back.apply(tiny_gpt2):
            b = tiny_gpt2(x).logits
        plain = tiny_gpt2(x).logits
    assert torch.equal(a, b) and not torch.equal(a, plain)
    assert "pickle" not in path.read_text()


def test_one_gate_shared_by_every_layer_round_trips(tmp_path: Path, tiny_gpt2: Any) -> None:
    # derive_fix gates every layer's removal with the same PromptGate object
    gate = PromptGate(site="blocks.0.resid_post", weight=_vec(11), bias=-0.5)
    sub = Subspace.from_directions(_vec(12))
    shared = [Intervention(f"blocks.{k}.resid_post", "project", direction=sub, gate=gate)
              for k in (1, 2)]
    back = FixSet.load(_fix(shared).save(tmp_path / "fix.json"))
    x = ids(9, seed=5)
    with torch.no_grad():
        with _fix(shared).apply(tiny_gpt2):
            a = tiny_gpt2(x).logits
        with back.apply(tiny_gpt2):
            b = tiny_gpt2(x).logits
    assert torch.equal(a, b)


def test_non_portable_interventions_are_refused(tmp_path: Path, tiny_gpt2: Any) -> None:
    cases = [Intervention("blocks.0.mlp", "patch", donor=[1, 2, 3]),
             Intervention("blocks.0.mlp", "zero", steps=(0,)),
             Intervention("blocks.0.mlp[pos=2]", "zero")]
    for iv in cases[:2]:
        with pytest.raises(InterventionError, match="not portable"):
            _fix([iv]).save(tmp_path / "f.json")
    for iv in cases:
        with pytest.raises(InterventionError, match="not portable"), _fix([iv]).apply(tiny_gpt2):
            pass


def test_tampered_files_are_refused(tmp_path: Path, portable: list[Intervention]) -> None:
    path = _fix(portable).save(tmp_path / "fix.json")
    blob = (tmp_path / "fix.safetensors").read_bytes()
    (tmp_path / "fix.safetensors").write_bytes(blob[:-4] + b"\0\0\0\0")
    with pytest.raises(FixFileError, match="sha256"):
        FixSet.load(path)
    (tmp_path / "fix.safetensors").write_bytes(blob)
    doc = json.loads(path.read_text())
    doc["interventions"][1]["to"] = "explode"
    path.write_text(json.dumps(doc))
    with pytest.raises(FixFileError, match=r"Subspace\.to"):
        FixSet.load(path)
    path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(FixFileError, match="not a fix file"):
        FixSet.load(path)
    with pytest.raises(FixFileError, match="cannot read"):
        FixSet.load(tmp_path / "missing.json")
