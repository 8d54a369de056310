"""The flight recorder (``Recorder(flight_recorder_mb=...)``): a guardrail's post-hoc flag keeps
the activations captured while the request ran; unflagged requests leave nothing; an overflowing
buffer falls back to a replay incident; captured and replayed activations are the same bits."""

from __future__ import annotations

import pytest
import torch
from prometheus_client import CollectorRegistry

from integrations import Recorder, exporters, flag, triggers
from integrations.errors import ConfigError

SITES = ["blocks.*.resid_post"]


def _rec(model, **kw):  # type: ignore[no-untyped-def]
    return Recorder(model, sites=SITES, trigger=triggers.OnFlag(),
                    exporter=exporters.InMemoryExporter(), metrics_registry=CollectorRegistry(),
                    **kw)


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 90, (1, 6), generator=torch.Generator().manual_seed(seed))


def _serve(rec, model, request_id: str, *, flagged: bool) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Generate, then flag on the output — as a guardrail does, after the model ran."""
    with rec.request(request_id=request_id) as req:
        out = model.generate(_ids(), max_new_tokens=3, do_sample=False)
        req.set_output(ids=out)
        if flagged:
            assert flag("prompt_injection")
    return out  # type: ignore[no-any-return]


def test_a_flag_after_generate_keeps_the_activations_captured_live(tiny_llama):  # type: ignore[no-untyped-def]
    with _rec(tiny_llama, flight_recorder_mb=16) as rec:
        _serve(rec, tiny_llama, "benign", flagged=False)
        _serve(rec, tiny_llama, "guarded", flagged=True)
        rec.force_flush(timeout_s=30)
        incs = rec.exporter.incidents  # type: ignore[attr-defined]
        stats = rec.stats()
    assert [i.manifest["request"]["id"] for i in incs] == ["guarded"]   # benign: discarded
    assert stats["captured"] == 1 and stats["dropped"] == {}
    m = incs[0].manifest
    assert m["activations"] == "captured"
    assert m["trigger"]["rule"] == "flag" and m["trigger"]["reason"] == "prompt_injection"
    assert m["trigger"]["captured_by"]["rule"] == "flight_recorder"
    assert incs[0].steps("blocks.0.resid_post") == [0, 1, 2]            # prefill + 2 decodes
    # the very bits a fresh forward computes (prefill residual stream of block 1)
    with torch.no_grad():
        hs = tiny_llama(_ids(), output_hidden_states=True).hidden_states
    assert torch.equal(incs[0].tensor("blocks.1.resid_post", step=0), hs[2])


def test_without_the_flight_recorder_the_same_flag_gives_a_replay_incident(tiny_llama):  # type: ignore[no-untyped-def]
    with _rec(tiny_llama) as rec:
        _serve(rec, tiny_llama, "guarded", flagged=True)
        rec.force_flush(timeout_s=30)
        inc = rec.exporter.incidents[-1]  # type: ignore[attr-defined]
    assert inc.manifest["activations"] == "replay" and inc.sites() == []


def test_an_overflowing_buffer_stops_capture_and_falls_back_to_replay(tiny_llama):  # type: ignore[no-untyped-def]
    tiny = 4096 / (1 << 20)        # 4 KiB: the inputs fit, the activations do not
    with _rec(tiny_llama, flight_recorder_mb=tiny) as rec:
        _serve(rec, tiny_llama, "guarded", flagged=True)
        rec.force_flush(timeout_s=30)
        inc = rec.exporter.incidents[-1]  # type: ignore[attr-defined]
        stats = rec.stats()
    assert stats["dropped"] == {}                       # not dropped: replay instead
    assert inc.manifest["activations"] == "replay" and inc.sites() == []
    assert torch.equal(inc.tensor("input_ids", step=0, kind="input"), _ids())


def test_a_fired_trigger_is_not_bounded_by_the_flight_buffer(tiny_llama):  # type: ignore[no-untyped-def]
    with _rec(tiny_llama, flight_recorder_mb=4096 / (1 << 20)) as rec:
        with rec.request(request_id="early") as req:
            req.flag("upstream_classifier")             # fired before the model ran
            tiny_llama.generate(_ids(), max_new_tokens=3, do_sample=False)
        rec.force_flush(timeout_s=30)
        inc = rec.exporter.incidents[-1]  # type: ignore[attr-defined]
    assert inc.manifest["activations"] == "captured"
    assert inc.manifest["trigger"]["captured_by"]["rule"] == "flag"


def test_flight_recorder_size_must_be_positive(tiny_gpt2):  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="flight_recorder_mb"):
        _rec(tiny_gpt2, flight_recorder_mb=0)
