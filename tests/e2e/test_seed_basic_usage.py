"""The seed README's Basic Usage, executed as written against the facade.

`load_your_model` returns a planted-fault scenario model and the failing prompt is a real
failing input of it (verified by running the model). The one-time preparation (documented in
the README) records benign inputs and builds the CF baseline.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


def test_seed_basic_usage_runs_as_written(tmp_path, monkeypatch, capsys):  # type: ignore[no-untyped-def]
    from analysis.scenarios.planted import build_planted, planted_suite

    pm = build_planted(planted_suite(1)[0])
    failing = pm.failing_prompts(1, seed=0)[0]
    benign = pm.benign_prompts(24, seed=1)
    assert pm.verify([failing]) == [True]  # the label comes from running the model

    def load_your_model():  # type: ignore[no-untyped-def]
        return pm.model

    failing_prompt_tokens = torch.tensor([failing])

    # --- one-time preparation (README: "Seed API") ---
    import model_forensics

    model_forensics.prepare(pm.model, [{"input_ids": torch.tensor([b])} for b in benign])

    # --- the seed README's Basic Usage, verbatim apart from the config path ---
    from model_forensics import CausalCCA, CompressionForensics, RecorderHooks, SandboxReplayer

    # 1. Record a failure incident
    recorder = RecorderHooks(config="configs/default.yaml")
    model = load_your_model()
    recorder.install_hooks(model)

    # Run the failing case
    inputs = {"input_ids": failing_prompt_tokens}
    outputs = model(**inputs)
    bundle = recorder.create_bundle("incident_20240812")

    # 2. Analyze the failure
    replayer = SandboxReplayer()
    session = replayer.load_bundle(bundle)

    # Run Compression Forensics to find anomalies
    cf = CompressionForensics()
    anomalies = cf.analyze(session)

    # Run Causal analysis to find minimal fix
    cca = CausalCCA()
    fix_set = cca.search_fix_set(session, guided_by=anomalies)

    print(f"Found fix set with {len(fix_set.interventions)} interventions")
    print(f"Flip rate: {fix_set.total_flip_rate:.2%}")
    # --- end of the seed snippet ---

    recorder.remove_hooks()
    out = capsys.readouterr().out
    assert "Found fix set with" in out and "Flip rate:" in out
    assert int(outputs.logits[0, -1].argmax()) == pm.target_token
    assert session.fidelity().exact
    assert fix_set.flip, fix_set
    layer = int(pm.fault_sites[0].split(".")[1])
    assert any(iv.site == f"blocks.{layer}.mlp" for iv in fix_set.interventions)
    assert fix_set.total_flip_rate is not None and fix_set.total_flip_rate >= 0.8
