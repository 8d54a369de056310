"""integrations.trace: one-shot capture on the Recorder machinery, checked against plain hooks."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from prometheus_client import REGISTRY, CollectorRegistry

import integrations
from integrations import Recorder, exporters, triggers
from integrations.errors import CaptureError, IncidentTooLargeError
from integrations.incident import model_fingerprint


def _ids(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 90, (1, n), generator=torch.Generator().manual_seed(seed))


@contextmanager
def observed(modules: dict[str, torch.nn.Module],
             pick: Callable[[Any], torch.Tensor] = lambda o: o[0] if isinstance(o, tuple) else o
             ) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Plain forward hooks (not integrations code): every output of each module, per call."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    handles = [m.register_forward_hook(
        lambda mod, a, o, name=name: seen[name].append(pick(o).detach().clone()))
        for name, m in modules.items()]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def test_gpt2_forward_matches_hooks_and_manifest_is_complete(tiny_gpt2):  # type: ignore[no-untyped-def]
    ids = _ids()
    blocks = {f"blocks.{i}.resid_post": tiny_gpt2.transformer.h[i] for i in range(3)}
    with observed({**blocks, "blocks.1.mlp": tiny_gpt2.transformer.h[1].mlp}) as seen, \
            integrations.trace(tiny_gpt2, ["blocks.*.resid_post", "blocks.1.mlp"],
                               request_id="t-1", tenant="acme", reason="probe") as t, \
            torch.no_grad():
        logits = tiny_gpt2(ids).logits
    inc = t.incident
    assert inc.sites() == sorted([*blocks, "blocks.1.mlp"])
    for site, values in seen.items():
        assert inc.steps(site) == [0]
        assert torch.equal(inc.tensor(site, step=0), values[0]), site
    assert torch.equal(inc.tensor("input_ids", step=0, kind="input"), ids)
    assert torch.equal(inc.tensor("logits", step=0, kind="logits"), logits[:, -1, :])
    m = inc.manifest
    assert m["model"]["fingerprint"] == model_fingerprint(tiny_gpt2)
    assert m["model"]["class"] == "GPT2LMHeadModel"
    assert m["runtime"]["torch"] == torch.__version__ and m["runtime"]["python"]
    assert m["trigger"]["rule"] == "trace" and m["trigger"]["reason"] == "probe"
    assert m["request"]["id"] == "t-1" and m["request"]["tenant"] == "acme"
    assert m["activations"] == "captured" and m["content_captured"] is False
    assert m["steps"] == 1


def test_llama_generate_records_one_step_per_forward(tiny_llama):  # type: ignore[no-untyped-def]
    ids = _ids(5, seed=1)
    layers = {f"blocks.{i}.resid_post": tiny_llama.model.layers[i] for i in range(3)}
    with observed(layers) as seen, \
            integrations.trace(tiny_llama, ["blocks.*.resid_post"]) as t, torch.no_grad():
        out = tiny_llama.generate(ids, max_new_tokens=4, do_sample=False)
        t.request.set_output(ids=out)
    inc = t.incident
    assert inc.steps("blocks.0.resid_post") == [0, 1, 2, 3]  # prefill + 3 decode forwards
    for site, values in seen.items():
        assert len(values) == 4
        for step, value in enumerate(values):
            assert torch.equal(inc.tensor(site, step=step), value), (site, step)
    assert torch.equal(inc.tensor("output_ids", step=3, kind="output"), out)
    assert inc.tensor("input_ids", step=2, kind="input").tolist() == [[int(out[0, 6])]]
    assert inc.manifest["steps"] == 4


def test_bert_classifier_sites_match_hooks(tiny_bert):  # type: ignore[no-untyped-def]
    ids = _ids(7, seed=2)
    mods = {f"blocks.{i}.resid_post": tiny_bert.bert.encoder.layer[i] for i in range(3)}
    mods["unembed"] = tiny_bert.classifier
    with observed(mods) as seen, \
            integrations.trace(tiny_bert, ["blocks.*.resid_post", "unembed"]) as t, \
            torch.no_grad():
        tiny_bert(input_ids=ids, attention_mask=torch.ones_like(ids))
    inc = t.incident
    for site, values in seen.items():
        assert torch.equal(inc.tensor(site, step=0), values[0]), site
    assert torch.equal(inc.tensor("attention_mask", step=0, kind="input"), torch.ones_like(ids))


def test_same_incident_format_as_the_recorder(tiny_gpt2):  # type: ignore[no-untyped-def]
    ids = _ids()
    ex = exporters.InMemoryExporter()
    with Recorder(tiny_gpt2, sites=["blocks.0.mlp"], trigger=triggers.Always(), exporter=ex,
                  metrics_registry=CollectorRegistry()) as rec:
        with rec.request(request_id="r"), torch.no_grad():
            tiny_gpt2(ids)
    with integrations.trace(tiny_gpt2, ["blocks.0.mlp"], request_id="r") as t, torch.no_grad():
        tiny_gpt2(ids)
    served, traced = ex.incidents[-1], t.incident
    assert set(traced.manifest) == set(served.manifest)
    for key in ("model", "request", "runtime", "seeds", "trigger"):
        assert set(traced.manifest[key]) == set(served.manifest[key]), key
    rows = [(r.kind, r.site, r.step) for r in served.records()]
    assert [(r.kind, r.site, r.step) for r in traced.records()] == rows
    for r in served.records():
        assert torch.equal(traced.tensor(r.site, step=r.step, kind=r.kind), r.tensor)


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_incident_only_after_the_block_and_errors_propagate(tiny_gpt2):  # type: ignore[no-untyped-def]
    threads = {t for t in threading.enumerate() if t.name == "forensics-export"}
    hooks = _hooks(tiny_gpt2)
    with integrations.trace(tiny_gpt2, ["blocks.0.mlp"]) as t, torch.no_grad():
        tiny_gpt2(_ids())
        with pytest.raises(CaptureError, match="still running"):
            t.incident  # noqa: B018
    assert t.incident.sites() == ["blocks.0.mlp"]
    with pytest.raises(CaptureError, match="called no forward"):
        with integrations.trace(tiny_gpt2, ["blocks.0.mlp"]):
            pass
    with pytest.raises(ValueError, match="boom"):
        with integrations.trace(tiny_gpt2, ["blocks.0.mlp"]) as t2:
            raise ValueError("boom")
    with pytest.raises(CaptureError):
        t2.incident  # noqa: B018
    assert not {t for t in threading.enumerate() if t.name == "forensics-export"} - threads
    assert _hooks(tiny_gpt2) == hooks  # the trace's recorder was shut down both times


def test_too_large_raises(tiny_gpt2):  # type: ignore[no-untyped-def]
    with pytest.raises(IncidentTooLargeError, match="max_bundle_size_mb"):
        with integrations.trace(tiny_gpt2, ["blocks.*.resid_post"],
                                max_bundle_size_mb=0.001), torch.no_grad():
            tiny_gpt2(_ids(20))


def test_not_served_traffic_and_not_switched_off(tiny_gpt2, tmp_path):  # type: ignore[no-untyped-def]
    off = tmp_path / "off.yaml"
    off.write_text("recorder:\n  enabled: false\n")
    before = REGISTRY.get_sample_value("forensics_recorder_captured_total")
    serving = exporters.InMemoryExporter()
    with Recorder(tiny_gpt2, sites=["blocks.0.mlp"], trigger=triggers.Always(), exporter=serving,
                  metrics_registry=CollectorRegistry()) as rec:
        with rec.request(request_id="served"), torch.no_grad():
            tiny_gpt2(_ids())
            with integrations.trace(tiny_gpt2, ["blocks.0.mlp"], config=str(off)) as t:
                tiny_gpt2(_ids(9))
        assert rec.force_flush(timeout_s=10)
        assert rec.stats()["captured"] == 1
    assert serving.incidents[0].manifest["steps"] == 1  # the traced forward is not served traffic
    assert serving.incidents[0].tensor("blocks.0.mlp", step=0).shape[1] == 6
    assert t.incident.tensor("blocks.0.mlp", step=0).shape[1] == 9  # enabled: false ignored
    assert REGISTRY.get_sample_value("forensics_recorder_captured_total") == before
