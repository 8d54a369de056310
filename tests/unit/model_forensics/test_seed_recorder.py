"""The seed README's recording calls run against the facade and produce exact incidents."""

from __future__ import annotations

import pytest
import torch


def test_recorder_hooks_seed_calls(tiny_gpt2):  # type: ignore[no-untyped-def]
    from model_forensics import RecorderHooks

    recorder = RecorderHooks(config="configs/default.yaml")
    recorder.install_hooks(tiny_gpt2)
    inputs = {"input_ids": torch.tensor([[5, 6, 7, 8]])}
    with torch.no_grad():
        outputs = tiny_gpt2(**inputs, output_hidden_states=True)
    bundle = recorder.create_bundle("incident_20240812")
    assert bundle.id == "incident_20240812"
    assert bundle.manifest["activations"] == "captured"
    assert bundle.sites() == [f"blocks.{i}.resid_post" for i in range(3)]  # granularity: layer
    assert torch.equal(bundle.tensor("blocks.0.resid_post", step=0), outputs.hidden_states[1])
    # recording continues into a fresh bundle
    with torch.no_grad():
        tiny_gpt2(**inputs)
        tiny_gpt2(**inputs)
    second = recorder.create_bundle("second")
    assert second.steps("blocks.0.resid_post") == [0, 1]
    recorder.remove_hooks()
    assert all(not m._forward_pre_hooks for m in tiny_gpt2.transformer.h)


def test_create_bundle_without_install_is_a_clear_error() -> None:
    from integrations.errors import ForensicsError
    from model_forensics import RecorderHooks

    with pytest.raises(ForensicsError, match="install_hooks"):
        RecorderHooks().create_bundle("x")
