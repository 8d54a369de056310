"""Deterministic replay: bit-exact fidelity (generate included), fingerprints, global state,
replay-mode materialisation, the CLI and the model registry — on real recorded incidents."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry

from analysis import registry
from analysis.replay import Replayer, compare
from integrations import Recorder, exporters, triggers
from integrations.errors import FingerprintMismatchError, ModelError
from integrations.incident import Incident
from tests.unit.analysis._traced import traced

SITES = ["blocks.*.resid_post", "blocks.*.attn", "blocks.*.mlp.post", "blocks.0.attn.z",
         "unembed"]


def record(model: Any, call: Callable[[], Any], *, sites: list[str] = SITES) -> Incident:
    """Run ``call`` as one traced request of ``model`` (``SITES`` by default)."""
    return traced(model, call, sites=sites)


def ids(n: int = 6, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, 90, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["tiny_gpt2", "tiny_llama"])
def test_generate_replay_is_bit_exact(name: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(name)
    x = ids()
    inc = record(model, lambda: model.generate(x, max_new_tokens=5, do_sample=False))
    assert inc.steps("blocks.0.resid_post") == [0, 1, 2, 3, 4]
    session = Replayer(model).load(inc)
    fid = session.fidelity()
    assert fid.exact, fid
    assert fid.max_abs_diff == 0.0
    assert fid.top1_agreement == 1.0 and fid.token_agreement == 1.0
    assert fid.steps_compared == 5
    assert fid.sites_compared == len(inc.sites()) == 3 * 3 + 2
    assert all(v == {"max_abs_diff": 0.0, "exact": True} for v in fid.per_site.values())
    assert fid.logits == {"max_abs_diff": 0.0, "exact": True}
    assert fid.mode == "generate"
    # Every replay measures fidelity again; the logits are the recorded ones, bit for bit.
    r = session.run()
    assert r.fidelity is not None and r.fidelity.exact
    for step in range(5):
        lg = r.logits[step]
        assert lg is not None
        assert compare(lg, inc.tensor("logits", step=step, kind="logits")).exact
    # Teacher forcing fed the recorded tokens.
    fed = r.input_ids[3]
    assert fed is not None and torch.equal(fed, inc.tensor("input_ids", step=3, kind="input"))


def test_run_edited_is_the_replay_primitive(tiny_gpt2: Any) -> None:
    """An edit sees every hooked site at every forward call; None leaves the replay bit-exact,
    a replacement changes what follows; last_step stops early; every call is counted."""
    x = ids(6, seed=11)
    inc = record(tiny_gpt2, lambda: tiny_gpt2.generate(x, max_new_tokens=3, do_sample=False),
                 sites=["blocks.*.mlp"])
    session = Replayer(tiny_gpt2).load(inc)
    seen: list[tuple[str, int, tuple[int, ...]]] = []

    def observe(site: Any, value: torch.Tensor, *, step: int) -> None:
        seen.append((site.site, step, tuple(value.shape)))

    r = session.run_edited(observe, sites=["blocks.1.mlp"], capture=["blocks.2.mlp"])
    assert seen == [("blocks.1.mlp", 0, (1, 6, 32)), ("blocks.1.mlp", 1, (1, 1, 32)),
                    ("blocks.1.mlp", 2, (1, 1, 32))]
    for step in range(3):
        assert compare(r.activations["blocks.2.mlp"][step],
                       inc.tensor("blocks.2.mlp", step=step)).exact
        assert compare(r.logits[step],  # type: ignore[arg-type]
                       inc.tensor("logits", step=step, kind="logits")).exact

    def zero_prefill(site: Any, value: torch.Tensor, *, step: int) -> torch.Tensor | None:
        return torch.zeros_like(value) if step == 0 else None

    z = session.run_edited(zero_prefill, sites=["blocks.1.mlp"], capture=["blocks.1.mlp"])
    acts = z.activations["blocks.1.mlp"]  # captured after the edit
    assert torch.count_nonzero(acts[0]) == 0 and torch.count_nonzero(acts[1]) > 0
    assert not compare(z.logits[0], r.logits[0]).exact  # type: ignore[arg-type]
    before = session.counts()
    short = session.run_edited(zero_prefill, sites=["blocks.1.mlp"], last_step=0, repeat=2)
    assert len(short.logits) == 1 and short.logits[0] is not None
    assert short.logits[0].shape == (2, 97) and short.batch_size == 2
    assert torch.equal(short.logits[0][0], short.logits[0][1])
    # a batch of 2 sums differently than the incident's own batch of 1: close, not bitwise
    assert torch.allclose(short.logits[0][:1], z.logits[0], atol=1e-5)  # type: ignore[arg-type]
    after = session.counts()
    assert after["forward_passes"] - before["forward_passes"] == 1
    assert after["row_forward_passes"] - before["row_forward_passes"] == 2
    one = session.run(last_step=0)        # run / verify stop early too (they used to ignore it)
    assert len(one.logits) == 1 and one.fidelity is None
    assert torch.equal(one.logits[0], session.verify([], last_step=0).logits[0])
    assert session.counts()["forward_passes"] - after["forward_passes"] == 2
    assert after["candidate_evaluations"] == before["candidate_evaluations"]


def test_replay_never_imports_what_it_runs() -> None:
    """Layering (DESIGN §16): interventions and the analyses are built on replay, not in it."""
    import ast

    root = Path(__file__).resolve().parents[3] / "analysis" / "replay"
    bad = []
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad += [f"{path.name}: {n}" for n in names
                    if n.startswith(("analysis.interventions", "analysis.cca", "analysis.cf"))]
    assert not bad, bad


def test_padded_batch_generate_replay_is_bit_exact(tiny_llama: Any) -> None:
    x = torch.tensor([[0, 0, 5, 6, 7, 8], [3, 4, 5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    inc = record(tiny_llama, lambda: tiny_llama.generate(
        x, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0))
    fid = Replayer(tiny_llama).load(inc).fidelity()
    assert fid.exact and fid.max_abs_diff == 0.0, fid


def test_bert_classifier_replay_is_bit_exact(tiny_bert: Any) -> None:
    x = ids(8)
    inc = record(tiny_bert, lambda: tiny_bert(
        input_ids=x, attention_mask=torch.ones_like(x), token_type_ids=torch.zeros_like(x)
    ).logits, sites=["blocks.*.resid_post", "blocks.1.attn.z", "unembed"])
    session = Replayer(tiny_bert).load(inc)
    fid = session.fidelity()
    assert fid.exact and fid.max_abs_diff == 0.0 and fid.top1_agreement == 1.0, fid
    assert fid.mode == "forward" and fid.steps_compared == 1
    r = session.run()
    assert r.logits[0] is not None and r.logits[0].shape == (1, 2)


def test_single_step_generate_is_replayed_as_generate_calls(tiny_gpt2: Any) -> None:
    # generate(max_new_tokens=1) makes one call with logits_to_keep=1, which is not a plain
    # forward's arithmetic; the session finds the call mode that reproduces the recording.
    x = ids(9, seed=3)
    inc = record(tiny_gpt2, lambda: tiny_gpt2.generate(x, max_new_tokens=1, do_sample=False))
    fid = Replayer(tiny_gpt2).load(inc).fidelity()
    assert fid.exact, fid
    # Forcing the right mode needs no inference at all.
    forced = Replayer(tiny_gpt2).load(inc, mode="generate").fidelity()
    assert forced.exact and forced.mode == "generate"


def test_fingerprint_mismatch_is_an_error_with_a_recorded_override(
        tiny_gpt2: Any) -> None:
    x = ids()
    inc = record(tiny_gpt2, lambda: tiny_gpt2.generate(x, max_new_tokens=3, do_sample=False))
    other = copy.deepcopy(tiny_gpt2)
    with torch.no_grad():
        other.transformer.h[1].mlp.c_fc.weight[0, 0] += 0.5
    with pytest.raises(FingerprintMismatchError) as ei:
        Replayer(other).load(inc)
    msg = str(ei.value)
    recorded = inc.manifest["model"]["fingerprint"]
    assert recorded in msg and Replayer(other).fingerprint() in msg
    assert "allow_fingerprint_mismatch=True" in msg
    session = Replayer(other, allow_fingerprint_mismatch=True).load(inc)
    check = session.fingerprint_check
    assert check["override"] and not check["match"] and check["recorded"] == recorded
    fid = session.fidelity()
    assert not fid.exact and fid.max_abs_diff > 0  # measured, never silent
    assert any("fingerprint mismatch" in n for n in fid.notes)
    out = session.materialize(["blocks.0.resid_post"])
    assert out.manifest["replay"]["fingerprint"]["override"] is True


def test_replay_restores_global_state(tiny_llama: Any) -> None:
    x = ids()
    inc = record(tiny_llama, lambda: tiny_llama.generate(x, max_new_tokens=3, do_sample=False))
    recorded_threads = inc.manifest["runtime"]["num_threads"]
    recorded_rng = inc.tensor("rng.cpu", kind="reference")
    prev_threads = torch.get_num_threads()
    other_threads = 1 if recorded_threads != 1 else 2
    torch.set_num_threads(other_threads)
    torch.use_deterministic_algorithms(False)
    torch.manual_seed(1234)
    rng_before = torch.get_rng_state()
    seen: list[tuple[bool, int, bool]] = []
    fill_before = torch.utils.deterministic.fill_uninitialized_memory  # type: ignore[attr-defined]

    def spy(module: Any, args: Any, kwargs: Any) -> None:
        seen.append((torch.are_deterministic_algorithms_enabled(), torch.get_num_threads(),
                     torch.equal(torch.get_rng_state(), recorded_rng)))

    h = tiny_llama.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        session = Replayer(tiny_llama).load(inc)
        session.run()
    finally:
        h.remove()
        after = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads(),
                 torch.equal(torch.get_rng_state(), rng_before))
        torch.set_num_threads(prev_threads)
    assert seen and seen[0] == (True, recorded_threads, True)
    assert all(s[0] and s[1] == recorded_threads for s in seen)
    assert after == (False, other_threads, True)
    assert torch.utils.deterministic.fill_uninitialized_memory == fill_before  # type: ignore[attr-defined]
    assert session.settings is not None and session.settings.rng_restored


def test_replay_mode_incident_is_materialised_bit_exact(tiny_llama: Any) -> None:
    x = ids(7, seed=5)

    def gen() -> torch.Tensor:
        return tiny_llama.generate(x, max_new_tokens=4, do_sample=False)  # type: ignore[no-any-return]

    ex = exporters.InMemoryExporter()  # a post-hoc flag on a request that was not captured
    with Recorder(tiny_llama, sites=SITES, trigger=triggers.OnFlag(), exporter=ex,
                  metrics_registry=CollectorRegistry()) as rec:
        with rec.request(request_id="r-1") as req, torch.no_grad():
            req.set_output(ids=gen())
            req.flag("post_hoc")
        assert rec.force_flush(timeout_s=30)
    post_hoc = ex.incidents[-1]
    assert post_hoc.manifest["activations"] == "replay" and post_hoc.sites() == []
    captured = record(tiny_llama, gen, sites=["blocks.*.resid_post", "blocks.1.mlp"])
    session = Replayer(tiny_llama).load(post_hoc)
    fid = session.fidelity()
    assert fid.compared == ("tokens",) and fid.token_agreement == 1.0 and fid.exact, fid
    full = session.materialize(["blocks.*.resid_post", "blocks.1.mlp"])
    m = full.manifest
    assert m["activations"] == "captured" and m["materialized_from"] == post_hoc.id
    assert m["replay"]["fidelity"]["exact"] is True
    assert full.sites() == captured.sites()
    for site in captured.sites():
        assert full.steps(site) == [0, 1, 2, 3]
        for step in range(4):
            assert compare(full.tensor(site, step=step),
                           captured.tensor(site, step=step)).exact
    # the materialised incident is itself a faithful recording of the model
    again = Replayer(tiny_llama).load(Incident.from_bytes(full.to_bytes())).fidelity()
    assert again.exact and again.sites_compared == 4


def test_cli_replay_prints_fidelity_and_exit_status(
        tiny_gpt2: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from model_forensics.cli import main

    x = ids()
    inc = record(tiny_gpt2, lambda: tiny_gpt2.generate(x, max_new_tokens=3, do_sample=False),
                 sites=["blocks.*.mlp"])
    path = tmp_path / f"{inc.id}.arrow"
    inc.write(path)
    name = inc.manifest["model"]["name"]
    registry.register_model(name, tiny_gpt2)
    try:
        assert main(["replay", str(path)]) == 0
        out = capsys.readouterr().out
        assert "EXACT" in out and "blocks.2.mlp" in out
        mat = tmp_path / "full.arrow"
        assert main(["replay", str(path), "--materialize", str(mat),
                     "--sites", "blocks.0.attn"]) == 0
        full = Incident.open(mat)
        assert full.sites() == ["blocks.0.attn", "blocks.0.mlp", "blocks.1.mlp", "blocks.2.mlp"]
        assert full.manifest["materialized_from"] == inc.id
        other = copy.deepcopy(tiny_gpt2)
        with torch.no_grad():
            other.lm_head.weight[0, 0] += 1.0
        registry.register_model(name, other)
        assert main(["replay", str(path)]) == 1  # FingerprintMismatchError -> exit 1
        assert "allow-fingerprint-mismatch" in capsys.readouterr().err
        assert main(["replay", str(path), "--allow-fingerprint-mismatch", "--json"]) == 1
        assert '"override": true' in capsys.readouterr().out
    finally:
        registry.unregister_model(name)


def test_registry_lookup_by_fingerprint_then_name(tiny_bert: Any) -> None:
    registry.register_model("tiny-bert-test", tiny_bert)
    try:
        fp = Replayer(tiny_bert).fingerprint()
        assert registry.get_model(fingerprint=fp) is tiny_bert
        assert registry.get_model(name="tiny-bert-test") is tiny_bert
        calls: list[int] = []

        def loader() -> Any:
            calls.append(1)
            return tiny_bert

        registry.register_model("lazy-test", loader=loader)
        assert calls == []
        assert registry.get_model(name="lazy-test") is tiny_bert
        assert registry.get_model(name="lazy-test") is tiny_bert and calls == [1]
        assert "HuggingFaceTB/SmolLM2-135M-Instruct" in registry.registered()
        with pytest.raises(ModelError, match="register_model"):
            registry.get_model(name="no-such-model")
    finally:
        registry.unregister_model("tiny-bert-test")
        registry.unregister_model("lazy-test")
