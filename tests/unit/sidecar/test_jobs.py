"""Analysis jobs: persisted in DuckDB, bounded workers, retries, resume after a restart."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from sidecar._config import SidecarConfig
from sidecar._hooks import CountingTelemetry
from sidecar._jobs import JobContext, JobFailed, JobRunner, UnknownJobKindError, register_job_kind
from sidecar._store import LocalStore


def _config(tmp_path: Path, **jobs: object) -> SidecarConfig:
    return SidecarConfig.from_dict({"data_dir": str(tmp_path),
                                    "jobs": {"poll_interval_s": 0.05, **jobs}})


def test_stats_job_end_to_end(tmp_path: Path, make_incident: Callable[..., bytes]) -> None:
    from integrations.incident import Incident

    cfg = _config(tmp_path)
    tel = CountingTelemetry()
    data = make_incident("inc-1", n_sites=2, steps=2)
    with LocalStore(tmp_path) as store:
        store.put("inc-1", data, tenant="acme")
        runner = JobRunner(store, config=cfg, telemetry=tel)
        runner.start()
        try:
            job = runner.submit("inc-1", "stats", tenant="acme")
            assert job.state == "pending"
            done = runner.wait(job.id, timeout_s=30)
        finally:
            runner.stop()
        assert done.state == "done" and done.attempts == 1 and done.error is None
        result = done.result
        assert result is not None and result["n_tensors"] == 4
        inc = Incident.from_bytes(data)
        first = result["tensors"][0]
        t = inc.tensor(first["site"], step=first["step"]).double()
        assert first["shape"] == [1, 4, 8] and first["nonfinite"] == 0
        assert first["mean"] == pytest.approx(float(t.mean()), rel=1e-12)
        assert first["std"] == pytest.approx(float(t.std(unbiased=False)), rel=1e-12)
        assert first["norm"] == pytest.approx(float(t.norm()), rel=1e-12)
        assert tel.jobs_finished[("stats", "done")] == 1
        assert tel.job_counts == {"pending": 0, "running": 0, "done": 1, "failed": 0}
        assert "job.stats" in tel.spans
        assert runner.list_for("inc-1", tenant="other") == []
        assert runner.get(job.id, tenant="other") is None


def test_unknown_kind_and_idempotent_submit(tmp_path: Path,
                                            make_incident: Callable[..., bytes]) -> None:
    with LocalStore(tmp_path) as store:
        store.put("inc-1", make_incident("inc-1"), tenant="acme")
        runner = JobRunner(store, config=_config(tmp_path))
        with pytest.raises(UnknownJobKindError, match=r"registered kinds: .*replay.*stats"):
            runner.submit("inc-1", "nope", tenant="acme")
        a = runner.submit("inc-1", "stats", tenant="acme", request_id="k1")
        b = runner.submit("inc-1", "stats", tenant="acme", request_id="k1")
        c = runner.submit("inc-1", "stats", tenant="acme")
        assert a.id == b.id != c.id
        assert runner.counts()["pending"] == 2


def test_jobs_resume_after_restart(tmp_path: Path, make_incident: Callable[..., bytes]) -> None:
    cfg = _config(tmp_path, max_attempts=2)
    with LocalStore(tmp_path) as store:
        store.put("inc-1", make_incident("inc-1"), tenant="acme")
        runner = JobRunner(store, config=cfg)           # never started: acts as the "old" process
        interrupted = runner.submit("inc-1", "stats", tenant="acme")
        exhausted = runner.submit("inc-1", "stats", tenant="acme")
        waiting = runner.submit("inc-1", "stats", tenant="acme")
        assert runner._claim().id == interrupted.id    # running when the process "died"
        with store.index.write() as con:                # a job already interrupted twice
            con.execute("UPDATE jobs SET state = 'running', attempts = 2 WHERE id = ?",
                        [exhausted.id])
    with LocalStore(tmp_path) as store:                 # restart: same files, same DuckDB
        runner = JobRunner(store, config=cfg)
        runner.start()
        try:
            a = runner.wait(interrupted.id, timeout_s=30)
            b = runner.wait(exhausted.id, timeout_s=30)
            c = runner.wait(waiting.id, timeout_s=30)
        finally:
            runner.stop()
    assert (a.state, a.attempts) == ("done", 2)
    assert (b.state, b.attempts) == ("failed", 2) and "interrupted 2 time(s)" in (b.error or "")
    assert (c.state, c.attempts) == ("done", 1)


def test_retries_then_fails_and_pool_is_bounded(tmp_path: Path,
                                                make_incident: Callable[..., bytes]) -> None:
    calls: list[int] = []
    running = 0
    peak = 0
    lock = threading.Lock()

    @register_job_kind("_test_flaky", replace=True)
    def flaky(ctx: JobContext) -> dict[str, object]:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            calls.append(ctx.attempt)
        try:
            threading.Event().wait(0.05)
            if ctx.params.get("fail") == "transient":
                raise OSError("disk hiccup")
            if ctx.params.get("fail") == "permanent":
                raise JobFailed("cannot analyse this one", retryable=False)
            return {"ok": ctx.attempt}
        finally:
            with lock:
                running -= 1

    cfg = _config(tmp_path, workers=2, max_attempts=3)
    with LocalStore(tmp_path) as store:
        store.put("inc-1", make_incident("inc-1"), tenant="acme")
        runner = JobRunner(store, config=cfg)
        runner.start()
        try:
            oks = [runner.submit("inc-1", "_test_flaky", tenant="acme") for _ in range(5)]
            t = runner.submit("inc-1", "_test_flaky", tenant="acme", params={"fail": "transient"})
            p = runner.submit("inc-1", "_test_flaky", tenant="acme", params={"fail": "permanent"})
            results = [runner.wait(j.id, timeout_s=30) for j in [*oks, t, p]]
        finally:
            runner.stop()
    assert all(r.state == "done" and json.loads(r.result_json or "") == {"ok": 1}
               for r in results[:5])
    assert (results[5].state, results[5].attempts) == ("failed", 3)
    assert "OSError: disk hiccup" in (results[5].error or "")
    assert (results[6].state, results[6].attempts) == ("failed", 1)
    assert results[6].error == "cannot analyse this one"
    assert peak <= 2 and len(calls) == 5 + 3 + 1


def test_replay_without_registered_model_fails_clearly(
        tmp_path: Path, make_incident: Callable[..., bytes]) -> None:
    with LocalStore(tmp_path) as store:
        store.put("inc-1", make_incident("inc-1", model="tiny-gpt2"), tenant="acme")
        runner = JobRunner(store, config=_config(tmp_path))
        runner.start()
        try:
            job = runner.wait(runner.submit("inc-1", "replay", tenant="acme").id, timeout_s=30)
        finally:
            runner.stop()
    assert job.state == "failed" and job.attempts == 1
    assert "model not registered" in (job.error or "")
    assert "'tiny-gpt2'" in (job.error or "") and "models:" in (job.error or "")


def test_model_registry_matching() -> None:
    cfg = SidecarConfig.from_dict({"models": [
        {"name": "gpt2", "loader": "m:f", "fingerprint": "aa"},
        {"name": "gpt2", "loader": "m:g"},
    ]})
    assert cfg.find_model(name="x", fingerprint="aa").loader == "m:f"
    assert cfg.find_model(name="gpt2", fingerprint="bb").loader == "m:g"
    assert cfg.find_model(name="llama", fingerprint="bb") is None


@pytest.mark.slow
def test_replay_job_with_registered_model(tmp_path: Path) -> None:
    """Records a real incident of the tiny GPT-2 and replays it in the sidecar's job runner."""
    pytest.importorskip("analysis.replay")
    from integrations import Recorder, exporters, triggers
    from integrations.incident import model_fingerprint
    from tests.conftest import make_tiny_gpt2

    model = make_tiny_gpt2()
    ex = exporters.InMemoryExporter()
    rec = Recorder(model, sites=["blocks.*.resid_post"], trigger=triggers.Always(), exporter=ex)
    import torch

    with rec.request(request_id="r-1", tenant="acme"):
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False,
                       pad_token_id=2)
    rec.force_flush(timeout_s=30)
    inc = ex.incidents[-1]
    cfg = SidecarConfig.from_dict({
        "data_dir": str(tmp_path), "jobs": {"poll_interval_s": 0.05},
        "models": [{"name": "tiny", "loader": "tests.conftest:make_tiny_gpt2",
                    "fingerprint": model_fingerprint(model)}]})
    with LocalStore(tmp_path) as store:
        store.put(inc.id, inc.to_bytes(), tenant="acme")
        runner = JobRunner(store, config=cfg)
        runner.start()
        try:
            job = runner.wait(runner.submit(inc.id, "replay", tenant="acme").id, timeout_s=120)
        finally:
            runner.stop()
    assert job.state == "done", job.error
    result = job.result or {}
    assert result["fidelity"]["exact"] is True
    assert result["tensors"]


def test_kind_hooks_prepare_record_after(tmp_path: Path,
                                         make_incident: Callable[..., bytes]) -> None:
    """prepare (runner side, index access) → fn (plain data) → record (same transaction as
    'done') → after (follow-ups); a failing record turns the job into a visible failure."""
    calls: list[str] = []

    def prepare(runner: JobRunner, job: object, params: dict) -> dict:  # type: ignore[type-arg]
        calls.append("prepare")
        n = runner.store.index.read("SELECT count(*) FROM incidents")[0][0]
        return {**params, "n_incidents": n}

    def fn(ctx: JobContext) -> dict:  # type: ignore[type-arg]
        calls.append("fn")
        return {"seen": ctx.params["n_incidents"], "fail_record": ctx.params.get("bad", False)}

    def record(con: object, job: object, result: dict) -> None:  # type: ignore[type-arg]
        calls.append("record")
        if result["fail_record"]:
            raise ValueError("result table refused the row")

    def after(runner: JobRunner, job: object, result: dict) -> None:  # type: ignore[type-arg]
        calls.append("after")

    register_job_kind("test_hooks", fn, replace=True, prepare=prepare, record=record,
                      after=after)
    with LocalStore(tmp_path) as store:
        store.put("inc-1", make_incident("inc-1"), tenant="acme")
        runner = JobRunner(store, config=_config(tmp_path))
        runner.start()
        try:
            ok = runner.wait(runner.submit("inc-1", "test_hooks", tenant="acme").id,
                             timeout_s=30)
            assert calls == ["prepare", "fn", "record", "after"]
            assert ok.state == "done" and ok.result == {"seen": 1, "fail_record": False}
            bad = runner.wait(runner.submit("inc-1", "test_hooks", tenant="acme",
                                            params={"bad": True}).id, timeout_s=30)
        finally:
            runner.stop()
    assert bad.state == "failed" and bad.result is None
    assert bad.error is not None and "result table refused the row" in bad.error
