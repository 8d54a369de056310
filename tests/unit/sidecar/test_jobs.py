"""Analysis jobs: persisted in DuckDB, bounded workers, retries, resume after a restart; kinds
are injected (each test passes the kinds it needs: no global registry)."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

from sidecar._config import SidecarConfig
from sidecar._observer import CountingTelemetry
from sidecar._store import LocalStore
from sidecar.jobs import (
    JOB_STATES,
    JobContext,
    JobFailed,
    JobHost,
    JobKind,
    JobRunner,
    UnknownJobKindError,
    builtin_kinds,
)
from sidecar.jobs._runner import JOB_QUEUE_WAIT, JOBS, JOBS_FINISHED


def _config(tmp_path: Path, **jobs: object) -> SidecarConfig:
    return SidecarConfig.from_dict({"data_dir": str(tmp_path),
                                    "jobs": {"poll_interval_s": 0.05, **jobs}})


@contextlib.contextmanager
def _running(runner: JobRunner) -> Iterator[JobRunner]:
    """A started runner, stopped on the way out (also when an assertion fails)."""
    runner.start()
    try:
        yield runner
    finally:
        runner.stop()


def _runner(store: LocalStore, cfg: SidecarConfig, *extra: JobKind,
            kinds: Iterable[JobKind] | None = None, **kwargs: object) -> JobRunner:
    return JobRunner(store, config=cfg, kinds=(*(builtin_kinds() if kinds is None else kinds),
                                               *extra), **kwargs)  # type: ignore[arg-type]


def test_stats_job_end_to_end(tmp_path: Path, make_incident: Callable[..., bytes]) -> None:
    from integrations.incident import Incident

    cfg = _config(tmp_path)
    tel = CountingTelemetry()
    data = make_incident("inc-1", n_sites=2, steps=2)
    with LocalStore(tmp_path) as store:
        store.put("inc-1", data, tenant="acme")
        with _running(_runner(store, cfg, telemetry=tel)) as runner:
            job = runner.submit("inc-1", "stats", tenant="acme")
            assert job.state == "pending"
            done = runner.wait(job.id, timeout_s=30)
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
        assert tel.total(JOBS_FINISHED, kind="stats", state="done") == 1
        assert tel.latest(JOBS, "state") == {"pending": 0, "running": 0, "done": 1, "failed": 0}
        assert tuple(tel.latest(JOBS, "state")) == JOB_STATES
        assert "job.stats" in tel.spans
        assert runner.list_for("inc-1", tenant="other") == []
        assert runner.get(job.id, tenant="other") is None


def test_unknown_kind_and_idempotent_submit(tmp_path: Path,
                                            make_incident: Callable[..., bytes]) -> None:
    with LocalStore(tmp_path) as store:
        store.put("inc-1", make_incident("inc-1"), tenant="acme")
        runner = _runner(store, _config(tmp_path))
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
        t0 = dt.datetime(2025, 1, 1)
        times = iter(t0 + dt.timedelta(seconds=i) for i in range(10))  # explicit created_at
        runner = _runner(store, cfg, clock=lambda: next(times))  # never started: the "old" process
        interrupted = runner.submit("inc-1", "stats", tenant="acme")
        exhausted = runner.submit("inc-1", "stats", tenant="acme")
        waiting = runner.submit("inc-1", "stats", tenant="acme")
        assert interrupted.created_at < exhausted.created_at < waiting.created_at
        claimed = runner.queue.claim()
        assert claimed is not None and claimed.id == interrupted.id  # running when it "died"
        with store.index.write() as con:                # a job already interrupted twice
            con.execute("UPDATE jobs SET state = 'running', attempts = 2 WHERE id = ?",
                        [exhausted.id])
    with LocalStore(tmp_path) as store:                 # restart: same files, same DuckDB
        with _running(_runner(store, cfg)) as runner:
            a = runner.wait(interrupted.id, timeout_s=30)
            b = runner.wait(exhausted.id, timeout_s=30)
            c = runner.wait(waiting.id, timeout_s=30)
    assert (a.state, a.attempts) == ("done", 2)
    assert (b.state, b.attempts) == ("failed", 2) and "interrupted 2 time(s)" in (b.error or "")
    assert (c.state, c.attempts) == ("done", 1)


def test_retries_then_fails_and_pool_is_bounded(tmp_path: Path,
                                                make_incident: Callable[..., bytes]) -> None:
    calls: list[int] = []
    running = 0
    peak = 0
    lock = threading.Lock()

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
        with _running(_runner(store, cfg, kinds=[JobKind("flaky", run=flaky)])) as runner:
            oks = [runner.submit("inc-1", "flaky", tenant="acme") for _ in range(5)]
            t = runner.submit("inc-1", "flaky", tenant="acme", params={"fail": "transient"})
            p = runner.submit("inc-1", "flaky", tenant="acme", params={"fail": "permanent"})
            results = [runner.wait(j.id, timeout_s=30) for j in [*oks, t, p]]
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
        with _running(_runner(store, _config(tmp_path))) as runner:
            job = runner.wait(runner.submit("inc-1", "replay", tenant="acme").id, timeout_s=30)
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
    import torch

    with Recorder(model, sites=["blocks.*.resid_post"], trigger=triggers.Always(),
                  exporter=ex) as rec:
        with rec.request(request_id="r-1", tenant="acme"):
            model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False,
                           pad_token_id=2)
        assert rec.force_flush(timeout_s=30)
    inc = ex.incidents[-1]
    cfg = SidecarConfig.from_dict({
        "data_dir": str(tmp_path), "jobs": {"poll_interval_s": 0.05},
        "models": [{"name": "tiny", "loader": "tests.conftest:make_tiny_gpt2",
                    "fingerprint": model_fingerprint(model)}]})
    with LocalStore(tmp_path) as store:
        store.put(inc.id, inc.to_bytes(), tenant="acme")
        with _running(_runner(store, cfg)) as runner:
            job = runner.wait(runner.submit(inc.id, "replay", tenant="acme").id, timeout_s=120)
    assert job.state == "done", job.error
    result = job.result or {}
    assert result["fidelity"]["exact"] is True
    assert result["tensors"]


def test_kind_hooks_prepare_record_after(tmp_path: Path,
                                         make_incident: Callable[..., bytes]) -> None:
    """prepare (runner side, index access) → run (plain data) → record (same transaction as
    'done') → after (follow-ups); a failing record turns the job into a visible failure."""
    calls: list[str] = []

    def prepare(host: JobHost, job: object, params: dict) -> dict:  # type: ignore[type-arg]
        calls.append("prepare")
        n = host.read("SELECT count(*) FROM incidents")[0][0]
        return {**params, "n_incidents": n}

    def fn(ctx: JobContext) -> dict:  # type: ignore[type-arg]
        calls.append("fn")
        return {"seen": ctx.params["n_incidents"], "fail_record": ctx.params.get("bad", False)}

    def record(con: object, job: object, result: dict) -> None:  # type: ignore[type-arg]
        calls.append("record")
        if result["fail_record"]:
            raise ValueError("result table refused the row")

    def after(host: JobHost, job: object, result: dict) -> None:  # type: ignore[type-arg]
        calls.append("after")

    hooks = JobKind("test_hooks", run=fn, prepare=prepare, record=record, after=after)
    with LocalStore(tmp_path) as store:
        store.put("inc-1", make_incident("inc-1"), tenant="acme")
        with _running(_runner(store, _config(tmp_path), kinds=[hooks])) as runner:
            ok = runner.wait(runner.submit("inc-1", "test_hooks", tenant="acme").id,
                             timeout_s=30)
            assert calls == ["prepare", "fn", "record", "after"]
            assert ok.state == "done" and ok.result == {"seen": 1, "fail_record": False}
            bad = runner.wait(runner.submit("inc-1", "test_hooks", tenant="acme",
                                            params={"bad": True}).id, timeout_s=30)
    assert bad.state == "failed" and bad.result is None
    assert bad.error is not None and "result table refused the row" in bad.error


def test_kinds_are_injected_not_registered(tmp_path: Path) -> None:
    """A runner knows exactly the kinds it was given; names must be unique."""
    with LocalStore(tmp_path) as store:
        only_stats = _runner(store, _config(tmp_path), kinds=builtin_kinds()[:1])
        assert only_stats.kinds.names() == ["stats"]
        with pytest.raises(UnknownJobKindError, match="registered kinds: stats"):
            only_stats.submit("inc-1", "cf", tenant="acme")
        assert _runner(store, _config(tmp_path)).kinds.names() == \
            ["baseline", "cca", "cf", "investigate", "probe", "probe_score", "replay",
             "stats"]
        with pytest.raises(ValueError, match="two job kinds are named 'stats'"):
            _runner(store, _config(tmp_path), builtin_kinds()[0])


def test_queue_wait_is_observed_from_submit_to_first_claim(
        tmp_path: Path, make_incident: Callable[..., bytes]) -> None:
    t0 = dt.datetime(2025, 1, 1)
    now = [t0]
    tel = CountingTelemetry()
    with LocalStore(tmp_path) as store:
        store.put("inc-1", make_incident("inc-1"), tenant="acme")
        runner = _runner(store, _config(tmp_path), telemetry=tel, clock=lambda: now[0])
        job = runner.submit("inc-1", "stats", tenant="acme")
        now[0] = t0 + dt.timedelta(seconds=2.5)           # claimed 2.5 s after the submit
        with _running(runner):
            assert runner.wait(job.id, timeout_s=30).state == "done"
    assert tel.values(JOB_QUEUE_WAIT, kind="stats") == [2.5]


def _echo(ctx: JobContext) -> dict[str, object]:
    return {"params": dict(ctx.params)}


def test_configured_default_params_are_under_each_jobs_own(
        tmp_path: Path, make_incident: Callable[..., bytes]) -> None:
    cfg = _config(tmp_path, params={"echo": {"permutations": 19, "variants": 4}})
    assert cfg.jobs.params == {"echo": {"permutations": 19, "variants": 4}}
    with LocalStore(tmp_path) as store:
        store.put("inc-1", make_incident("inc-1"), tenant="acme")
        with _running(_runner(store, cfg, kinds=(JobKind("echo", run=_echo),))) as runner:
            plain = runner.submit("inc-1", "echo", tenant="acme")
            own = runner.submit("inc-1", "echo", tenant="acme", params={"variants": 2})
            got = [runner.wait(j.id, timeout_s=30).result for j in (plain, own)]
    assert got == [{"params": {"permutations": 19, "variants": 4}},
                   {"params": {"permutations": 19, "variants": 2}}]


def test_job_params_config_must_map_kinds_to_mappings(tmp_path: Path) -> None:
    from integrations.errors import ConfigError

    with pytest.raises(ConfigError, match=r"jobs\.params\.cca"):
        _config(tmp_path, params={"cca": 19})
