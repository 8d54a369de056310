"""Recorder: per-step capture, triggers, post-hoc flags, batches, drops, isolation."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from prometheus_client import CollectorRegistry

from integrations import Recorder, exporters, flag, triggers
from integrations.incident import Incident


def _rec(model, **kw):  # type: ignore[no-untyped-def]
    kw.setdefault("exporter", exporters.InMemoryExporter())
    kw.setdefault("metrics_registry", CollectorRegistry())
    return Recorder(model, **kw)


def _ids(n: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 90, (1, n), generator=g)


def test_generate_records_every_step_bit_exact(tiny_llama):  # type: ignore[no-untyped-def]
    ids = _ids()
    with _rec(tiny_llama, sites=["blocks.*.resid_post"], trigger=triggers.Always()) as rec:
        with rec.request(request_id="r-1", tenant="acme") as req:
            out = tiny_llama.generate(ids, max_new_tokens=4, do_sample=False)
            req.set_output(ids=out)
        assert rec.force_flush(timeout_s=30)
        inc = rec.exporter.incidents[-1]  # type: ignore[attr-defined]
    assert inc.manifest["activations"] == "captured"
    assert inc.manifest["request"]["id"] == "r-1"
    assert inc.manifest["request"]["tenant"] == "acme"
    assert inc.steps("blocks.0.resid_post") == [0, 1, 2, 3]  # prefill + 3 decode forwards
    assert inc.sites() == [f"blocks.{i}.resid_post" for i in range(3)]
    # Prefill values equal what the model computes, bit for bit.
    with torch.no_grad():
        hs = tiny_llama(ids, output_hidden_states=True).hidden_states
    for i in range(3):
        rec_t = inc.tensor(f"blocks.{i}.resid_post", step=0)
        ref = hs[i + 1] if i < 2 else None
        if ref is not None:
            assert torch.equal(rec_t, ref)
    # Decode steps have one position each and the teacher-forced tokens are the generated ones.
    assert inc.tensor("blocks.0.resid_post", step=2).shape == (1, 1, 32)
    assert inc.tensor("input_ids", step=1, kind="input").tolist() == [[int(out[0, 6])]]
    assert torch.equal(inc.tensor("output_ids", step=3, kind="output"), out)
    # Decode step values equal a full forward's (same positions) up to float noise only
    assert inc.tensor("logits", step=0, kind="logits").shape == (1, 97)


def test_bfloat16_recorded_bit_exact(tiny_gpt2):  # type: ignore[no-untyped-def]
    model = tiny_gpt2.to(torch.bfloat16)
    try:
        seen: dict[str, torch.Tensor] = {}

        def grab(name):  # type: ignore[no-untyped-def]
            def hook(m, a, o):  # type: ignore[no-untyped-def]
                seen[name] = o.detach().clone()
            return hook

        with _rec(model, sites=["blocks.1.mlp", "blocks.0.resid_pre"],
                  trigger=triggers.Always()) as rec:
            h = model.transformer.h[1].mlp.register_forward_hook(grab("mlp"))
            with rec.request(request_id="bf"):
                with torch.no_grad():
                    model(_ids())
            h.remove()
            rec.force_flush(timeout_s=30)
            inc = rec.exporter.incidents[-1]  # type: ignore[attr-defined]
        got = inc.tensor("blocks.1.mlp", step=0)
        assert got.dtype == torch.bfloat16
        assert torch.equal(got.view(torch.int16), seen["mlp"].view(torch.int16))
    finally:
        tiny_gpt2.to(torch.float32)


def test_not_firing_makes_no_incident_and_no_copies(tiny_gpt2):  # type: ignore[no-untyped-def]
    with _rec(tiny_gpt2, trigger=triggers.OnFlag()) as rec:
        with rec.request(request_id="quiet") as req:
            tiny_gpt2(_ids())
            assert not req.capturing
        rec.force_flush(timeout_s=10)
        assert rec.exporter.incidents == []  # type: ignore[attr-defined]
        assert rec.stats()["captured"] == 0


def test_post_hoc_flag_makes_replay_incident(tiny_llama):  # type: ignore[no-untyped-def]
    ids = _ids()
    with _rec(tiny_llama, trigger=triggers.OnFlag()) as rec:
        with rec.request(request_id="late") as req:
            out = tiny_llama.generate(ids, max_new_tokens=3, do_sample=False)
            req.set_output(ids=out)
            assert flag("prompt_injection")  # integrations.flag via contextvars
        rec.force_flush(timeout_s=30)
        inc = rec.exporter.incidents[-1]  # type: ignore[attr-defined]
    m = inc.manifest
    assert m["activations"] == "replay"
    assert m["trigger"]["rule"] == "flag" and m["trigger"]["reason"] == "prompt_injection"
    assert m["trigger"]["step"] == 2
    assert inc.sites() == []                            # no activations kept
    assert torch.equal(inc.tensor("input_ids", step=0, kind="input"), ids)
    assert inc.tensor("rng.cpu", step=0, kind="reference").dtype == torch.uint8


def test_pre_forward_flag_captures(tiny_gpt2):  # type: ignore[no-untyped-def]
    with _rec(tiny_gpt2, sites=["blocks.0.mlp"], trigger=triggers.OnFlag()) as rec:
        with rec.request(request_id="early") as req:
            req.flag("upstream_classifier")
            tiny_gpt2(_ids())
            assert req.capturing
        rec.force_flush(timeout_s=10)
        inc = rec.exporter.incidents[-1]  # type: ignore[attr-defined]
    assert inc.manifest["activations"] == "captured"
    assert inc.sites() == ["blocks.0.mlp"]


def test_sampling_does_not_touch_model_rng(tiny_gpt2):  # type: ignore[no-untyped-def]
    with _rec(tiny_gpt2, trigger=triggers.Ratio(0.5)) as rec:
        torch.manual_seed(123)
        before = torch.get_rng_state()
        for i in range(20):
            with rec.request(request_id=f"r{i}"):
                with torch.no_grad():
                    tiny_gpt2(_ids(seed=i))
        assert torch.equal(torch.get_rng_state(), before)
        rec.force_flush(timeout_s=30)
        n = len(rec.exporter.incidents)  # type: ignore[attr-defined]
    assert 0 < n < 20  # Ratio hashes the request id


def test_output_contains_trigger_uses_output_text(tiny_gpt2):  # type: ignore[no-untyped-def]
    with _rec(tiny_gpt2, trigger=triggers.OutputContains("HACKED")) as rec:
        with rec.request(request_id="a") as req:
            tiny_gpt2(_ids())
            req.set_output(text="This movie is HACKED.")
        with rec.request(request_id="b") as req:
            tiny_gpt2(_ids())
            req.set_output(text="Positive")
        rec.force_flush(timeout_s=10)
        incs = rec.exporter.incidents  # type: ignore[attr-defined]
    assert [i.manifest["request"]["id"] for i in incs] == ["a"]
    assert incs[0].manifest["content_captured"] is False
    assert "This movie is" not in str(incs[0].manifest)  # raw text not kept by default


def test_batch_copies_only_rows_that_fire(tiny_gpt2):  # type: ignore[no-untyped-def]
    ids = torch.cat([_ids(seed=1), _ids(seed=2), _ids(seed=3)])
    with _rec(tiny_gpt2, sites=["blocks.1.resid_post"], trigger=triggers.OnFlag()) as rec:
        with rec.batch(["b0", "b1", "b2"]) as b:
            b["b1"].flag("bad")  # before the forward: row 1 is captured
            with torch.no_grad():
                full = tiny_gpt2(ids, output_hidden_states=True).hidden_states[2]
        rec.force_flush(timeout_s=10)
        incs = rec.exporter.incidents  # type: ignore[attr-defined]
    assert [i.manifest["request"]["id"] for i in incs] == ["b1"]
    t = incs[0].tensor("blocks.1.resid_post", step=0)
    assert t.shape[0] == 1
    assert torch.equal(t[0], full[1])  # row 1 of the batch, bit for bit


def test_concurrent_threads_do_not_see_each_other(tiny_gpt2):  # type: ignore[no-untyped-def]
    barrier = threading.Barrier(4)
    with _rec(tiny_gpt2, sites=["blocks.0.mlp"], trigger=triggers.OnFlag()) as rec:

        def serve(i: int) -> None:
            with rec.request(request_id=f"t{i}") as req:
                barrier.wait()
                if i % 2 == 0:
                    req.flag("even")
                with torch.no_grad():
                    tiny_gpt2(_ids(seed=i))

        ts = [threading.Thread(target=serve, args=(i,)) for i in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        rec.force_flush(timeout_s=10)
        ids = sorted(i.manifest["request"]["id"] for i in rec.exporter.incidents)  # type: ignore[attr-defined]
    assert ids == ["t0", "t2"]


def test_asyncio_tasks_are_isolated(tiny_gpt2):  # type: ignore[no-untyped-def]
    with _rec(tiny_gpt2, trigger=triggers.OnFlag()) as rec:

        async def serve(i: int) -> None:
            with rec.request(request_id=f"a{i}"):
                await asyncio.sleep(0.01 * (3 - i))
                if i == 1:
                    flag("one")
                await asyncio.sleep(0)
                with torch.no_grad():
                    tiny_gpt2(_ids(seed=i))

        async def main() -> None:
            await asyncio.gather(*(serve(i) for i in range(3)))

        asyncio.run(main())
        rec.force_flush(timeout_s=10)
        ids = [i.manifest["request"]["id"] for i in rec.exporter.incidents]  # type: ignore[attr-defined]
    assert ids == ["a1"]


def test_flag_outside_request_is_harmless() -> None:
    assert flag("nothing") is False


def test_oversized_incident_dropped_and_counted(tiny_gpt2):  # type: ignore[no-untyped-def]
    with _rec(tiny_gpt2, sites=["blocks.*.resid_post"], trigger=triggers.Always(),
              max_bundle_size_mb=0.001) as rec:  # ~1 KB
        with rec.request(request_id="big"):
            with torch.no_grad():
                out = tiny_gpt2(_ids(20))
        assert out.logits.shape == (1, 20, 97)  # the model call is unaffected
        rec.force_flush(timeout_s=10)
        s = rec.stats()
    assert rec.exporter.incidents == []  # type: ignore[attr-defined]
    assert s["captured"] == 1 and s["dropped"] == {"too_large": 1}


class _SlowExporter(exporters.InMemoryExporter):
    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def export(self, incident):  # type: ignore[no-untyped-def]
        self.gate.wait(10)
        return super().export(incident)


def test_full_queue_drops_never_blocks(tiny_gpt2):  # type: ignore[no-untyped-def]
    ex = _SlowExporter()
    with _rec(tiny_gpt2, sites=["blocks.0.mlp"], trigger=triggers.Always(), exporter=ex,
              max_queue=2) as rec:
        try:
            for i in range(6):
                with rec.request(request_id=f"q{i}"):
                    with torch.no_grad():
                        tiny_gpt2(_ids(seed=i))
        finally:
            ex.gate.set()  # never leave the worker waiting on the gate
        assert rec.force_flush(timeout_s=10)
        s = rec.stats()
    exported = len(ex.incidents)
    # captured = exported + dropped, for every incident
    assert s["captured"] == 6
    assert exported + s["dropped"].get("queue_full", 0) == 6
    assert s["dropped"].get("queue_full", 0) >= 3


class _BrokenExporter(exporters.InMemoryExporter):
    def export(self, incident):  # type: ignore[no-untyped-def]
        return exporters.ExportResult.FAILURE


def test_export_failure_counted(tiny_gpt2):  # type: ignore[no-untyped-def]
    with _rec(tiny_gpt2, trigger=triggers.Always(), exporter=_BrokenExporter()) as rec:
        with rec.request(request_id="x"):
            with torch.no_grad():
                tiny_gpt2(_ids())
        rec.force_flush(timeout_s=10)
        assert rec.stats()["dropped"] == {"export_failed": 1}


def _n_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _export_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "forensics-export"}


def test_shutdown_removes_hooks(tiny_gpt2):  # type: ignore[no-untyped-def]
    before = _n_hooks(tiny_gpt2)
    with _rec(tiny_gpt2, sites=["blocks.*.mlp", "blocks.*.resid_post"]) as rec:
        assert _n_hooks(tiny_gpt2) > before
        rec.shutdown()
        assert _n_hooks(tiny_gpt2) == before


def test_with_shuts_down_even_when_the_body_fails(tiny_gpt2):  # type: ignore[no-untyped-def]
    hooks, threads = _n_hooks(tiny_gpt2), _export_threads()
    with pytest.raises(AssertionError, match="inside"):
        with _rec(tiny_gpt2, sites=["blocks.0.mlp"], trigger=triggers.Always()) as rec:
            assert _export_threads() - threads  # the recorder's worker runs
            with rec.request(request_id="w"), torch.no_grad():
                tiny_gpt2(_ids())
            raise AssertionError("a failing assert inside the block")
    assert _n_hooks(tiny_gpt2) == hooks               # hooks removed
    assert not _export_threads() - threads            # worker thread stopped, not leaked
    assert rec.stats()["exported"] == 1               # the queued incident was flushed
    assert len(rec.exporter.incidents) == 1  # type: ignore[attr-defined]


def test_bad_site_fails_early(tiny_gpt2):  # type: ignore[no-untyped-def]
    from integrations.errors import SiteError

    with pytest.raises(SiteError, match=r"blocks\.0\.mlp"):
        _rec(tiny_gpt2, sites=["blocks.0.mpl"])


def test_disabled_recorder_installs_nothing(tiny_gpt2, tmp_path):  # type: ignore[no-untyped-def]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("recorder:\n  enabled: false\n")
    with _rec(tiny_gpt2, trigger=triggers.Always(), config=str(cfg)) as rec:
        with rec.request(request_id="off"):
            tiny_gpt2(_ids())
        rec.force_flush(timeout_s=5)
        assert rec.exporter.incidents == []  # type: ignore[attr-defined]


def test_arrow_file_exporter_roundtrip(tiny_gpt2, tmp_path):  # type: ignore[no-untyped-def]
    ex = exporters.ArrowFileExporter(tmp_path)
    with _rec(tiny_gpt2, sites=["blocks.1.attn"], trigger=triggers.Always(), exporter=ex) as rec:
        with rec.request(request_id="file"):
            with torch.no_grad():
                tiny_gpt2(_ids())
    (path,) = list(tmp_path.glob("*.arrow"))
    inc = Incident.open(path)
    assert inc.manifest["request"]["id"] == "file"
    assert inc.manifest["model"]["fingerprint"]
    assert inc.tensor("blocks.1.attn", step=0).shape == (1, 6, 32)


def test_compression_ratio_below_one_writes_zstd_losslessly(tiny_gpt2, tmp_path):  # type: ignore[no-untyped-def]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("recorder:\n  compression_ratio: 0.5\n")
    ids = _ids(32)
    with _rec(tiny_gpt2, sites=["blocks.*.resid_post"], trigger=triggers.Always()) as plain, \
            _rec(tiny_gpt2, sites=["blocks.*.resid_post"], trigger=triggers.Always(),
                 config=str(cfg)) as comp:
        for rec in (plain, comp):
            with rec.request(request_id="z"):
                with torch.no_grad():
                    tiny_gpt2(ids)
            rec.shutdown()
    a = plain.exporter.incidents[-1]  # type: ignore[attr-defined]
    b = comp.exporter.incidents[-1]  # type: ignore[attr-defined]
    assert len(b.to_bytes()) < len(a.to_bytes())  # zstd body compression is on
    for site in a.sites():
        assert torch.equal(a.tensor(site, step=0), b.tensor(site, step=0))
    reread = Incident.from_bytes(b.to_bytes())
    assert torch.equal(reread.tensor("blocks.0.resid_post", step=0),
                       a.tensor("blocks.0.resid_post", step=0))


def test_two_recorders_share_one_registry(tiny_gpt2, tiny_llama):  # type: ignore[no-untyped-def]
    reg = CollectorRegistry()
    with Recorder(tiny_gpt2, trigger=triggers.Always(), metrics_registry=reg) as a, \
            Recorder(tiny_llama, trigger=triggers.Always(), metrics_registry=reg) as b:
        for rec, model in ((a, tiny_gpt2), (b, tiny_llama)):
            with rec.request(request_id="x"):
                with torch.no_grad():
                    model(_ids())
            rec.shutdown()
    assert a.stats()["captured"] == 1 and b.stats()["captured"] == 1  # per recorder
    assert reg.get_sample_value("forensics_recorder_captured_total") == 2.0  # process-wide
