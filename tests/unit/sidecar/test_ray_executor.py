"""The ``JobExecutor`` seam with a real local Ray (``ray.init(num_cpus=2)``, started once for
this module): a CCA job of the planted-head GPT-2 gives the identical result as a Ray task and on
the local thread pool; a Ray worker killed mid-job → the attempt is retryable, the job goes
back to pending in the catalog and completes on attempt 2 (Ray's own retries are off);
``JobFailed`` crosses the task boundary with its message and ``retryable``; shutting the
executor down never hangs on a running task. Plus the ``jobs.executor`` / ``jobs.ray`` keys and
the error mapping, without a cluster."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from integrations.errors import ConfigError
from sidecar._config import SidecarConfig
from sidecar._store import LocalStore
from sidecar.jobs import (
    JobContext,
    JobFailed,
    JobKind,
    JobResources,
    JobRunner,
    LocalExecutor,
    RayExecutor,
    builtin_kinds,
    make_executor,
)
from sidecar.jobs._ray import _shippable, job_error
from tests._waiting import wait_for

from .test_jobs import _running

REPO = Path(__file__).resolve().parents[3]


def _config(tmp_path: Path, **raw: Any) -> SidecarConfig:
    jobs = {"poll_interval_s": 0.05, "workers": 1, **raw.pop("jobs", {})}
    return SidecarConfig.from_dict({"data_dir": str(tmp_path), "jobs": jobs, **raw})


# -- job kinds the Ray workers import from this module --------------------------------------

def hold_until_killed(ctx: JobContext) -> dict[str, Any]:
    """Attempt 1 logs its worker's pid and waits to be killed; attempt 2 finishes."""
    with Path(ctx.params["log"]).open("a") as f:
        f.write(f"{ctx.attempt} {os.getpid()}\n")
    if ctx.attempt == 1:
        time.sleep(120)
        raise JobFailed("attempt 1 was never killed", retryable=False)
    return {"attempt": ctx.attempt, "pid": os.getpid()}


def fail_as_told(ctx: JobContext) -> dict[str, Any]:
    """Raise what ``params.fail`` says, in the Ray worker."""
    if ctx.params["fail"] == "retryable":
        raise JobFailed("the GPU is busy, later", retryable=True)
    if ctx.params["fail"] == "permanent":
        raise JobFailed("this incident has no logits")
    raise OSError("disk hiccup")


def open_by_reference(ctx: JobContext) -> dict[str, Any]:
    """What the attempt was given for its incident, and what it read there."""
    return {"ref": ctx.incident_path, "n_sites": len(ctx.open_incident().sites()),
            "pid": os.getpid()}


def report_pid(ctx: JobContext) -> dict[str, Any]:
    """The process the attempt ran in."""
    return {"pid": os.getpid()}


# -- a real local Ray, once for the module --------------------------------------------------

@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    """A Ray instance of this test module only (``address="local"``: never another's)."""
    ray = pytest.importorskip("ray", reason="Ray (extra `fleet`) is not installed")
    temp_dir = tempfile.mkdtemp(prefix="rf-ray-", dir="/tmp")   # short: socket path limits
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",   # workers import this checkout
           # the S3 API emulator's credentials, as a worker gets them in production: from its
           # own environment (they never travel in a job context)
           "AWS_ACCESS_KEY_ID": "emulator-key", "AWS_SECRET_ACCESS_KEY": "emulator-secret",
           "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 object_store_memory=96 * 1024 * 1024, namespace="forensics-tests",
                 runtime_env={"env_vars": env}, _temp_dir=temp_dir)
    except Exception as e:   # e.g. no /dev/shm, ports refused
        pytest.skip(f"a local Ray instance cannot start here: {type(e).__name__}: {e}")
    try:
        yield ray
    finally:
        ray.shutdown()


def _ray_config(tmp_path: Path, **raw: Any) -> SidecarConfig:
    jobs = {"executor": "ray", "ray": {"num_cpus": 1}, **raw.pop("jobs", {})}
    return _config(tmp_path, jobs=jobs, **raw)


# -- bar: a CCA job on Ray gives the local executor's result ---------------------------------

def _cca_result(tmp_path: Path, cfg: SidecarConfig, incidents: list[Any],
                executor: Any) -> dict[str, Any]:
    with LocalStore(tmp_path) as store:
        for inc in incidents:
            store.put(inc.id, inc.to_bytes(), tenant="acme")
        runner = JobRunner(store, config=cfg, kinds=builtin_kinds(), executor=executor)
        with _running(runner):
            job = runner.submit(incidents[0].id, "cca", tenant="acme",
                                params={"permutations": 19, "variants": 4})
            done = runner.wait(job.id, timeout_s=300)
    assert done.state == "done" and done.attempts == 1, done.error
    assert done.result is not None
    return done.result


@pytest.mark.slow
def test_cca_job_on_ray_is_identical_to_the_local_executor(
        ray_cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sidecar.jobs import _models

    from ._rca_cases import model_entry, record_cases

    cases = record_cases(4)
    incidents = [cases["failing"][0], *cases["benign"]]
    raw = {"models": [model_entry()], "baselines": {"cca_benign": 4},
           "modules": {"cca": {"max_fix_set_size": 4}}}
    monkeypatch.setattr(_models, "_MODEL_CACHE", {})    # loaded here = ran here
    cfg = _ray_config(tmp_path, **raw)
    on_ray = _cca_result(tmp_path / "ray", cfg, incidents, make_executor(cfg))
    assert _models._MODEL_CACHE == {}                  # the model was replayed on a Ray worker
    local_cfg = _config(tmp_path, **raw)
    local = _cca_result(tmp_path / "local", local_cfg, incidents, LocalExecutor(workers=1))
    assert len(_models._MODEL_CACHE) == 1              # ... and here on the thread pool
    assert local["status"] == "found" and local["fidelity"]["exact"] is True
    assert local["benign_incidents"] == 4
    differ = sorted(k for k in local.keys() | on_ray.keys() if local.get(k) != on_ray.get(k))
    assert differ == [], f"fields that differ between the executors: {differ}"
    assert on_ray == local       # every field, fix set and statistics included


# -- bar: a Ray worker killed mid-job → retried from the catalog, done on attempt 2 ----------

@pytest.mark.slow
def test_a_killed_ray_worker_is_retried_from_the_catalog(
        ray_cluster: Any, tmp_path: Path, make_incident: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    log = tmp_path / "attempts.log"
    cfg = _ray_config(tmp_path, jobs={"max_attempts": 3})
    kind = JobKind("hold", run=hold_until_killed)
    with LocalStore(tmp_path / "data") as store:
        store.put("inc-1", make_incident("inc-1"), tenant="acme")
        with _running(JobRunner(store, config=cfg, kinds=[kind])) as runner:
            job = runner.submit("inc-1", "hold", tenant="acme", params={"log": str(log)})
            first = wait_for(lambda: log.is_file() and log.read_text().split(), 120,
                             "attempt 1 to start on a Ray worker")
            pid = int(first[1])
            assert first[0] == "1" and pid != os.getpid()   # another process: the worker
            with caplog.at_level(logging.WARNING, logger="sidecar.jobs"):
                os.kill(pid, signal.SIGKILL)
                done = runner.wait(job.id, timeout_s=120)
    lines = [tuple(map(int, line.split())) for line in log.read_text().splitlines()]
    assert (done.state, done.attempts, done.error) == ("done", 2, None)
    assert [a for a, _ in lines] == [1, 2]      # no retry by Ray itself (max_retries=0)
    assert lines[1][1] != pid and done.result == {"attempt": 2, "pid": lines[1][1]}
    lost = [r.getMessage() for r in caplog.records if "was lost" in r.getMessage()]
    assert len(lost) == 1 and "WorkerCrashedError" in lost[0]    # mapped: retryable


@pytest.mark.slow
def test_job_errors_cross_the_ray_task_boundary(ray_cluster: Any, tmp_path: Path,
                                                make_incident: Any) -> None:
    cfg = _ray_config(tmp_path, jobs={"max_attempts": 2, "workers": 2})
    with LocalStore(tmp_path / "data") as store:
        store.put("inc-1", make_incident("inc-1"), tenant="acme")
        runner = JobRunner(store, config=cfg, kinds=[JobKind("fail", run=fail_as_told)])
        with _running(runner):
            jobs = {how: runner.submit("inc-1", "fail", tenant="acme", params={"fail": how})
                    for how in ("retryable", "permanent", "os")}
            got = {how: runner.wait(j.id, timeout_s=120) for how, j in jobs.items()}
    seen = {how: (j.state, j.attempts, j.error) for how, j in got.items()}
    assert seen == {"retryable": ("failed", 2, "the GPU is busy, later"),
                    "permanent": ("failed", 1, "this incident has no logits"),
                    "os": ("failed", 2, "OSError: disk hiccup")}


@pytest.mark.slow
def test_kinds_that_use_the_data_dir_stay_on_the_sidecar(ray_cluster: Any, tmp_path: Path,
                                                         make_incident: Any) -> None:
    cfg = _ray_config(tmp_path, jobs={"workers": 2})
    kinds = [JobKind("anywhere", run=report_pid),
             JobKind("files", run=report_pid, uses_data_dir=True)]
    with LocalStore(tmp_path / "data") as store:
        store.put("inc-1", make_incident("inc-1"), tenant="acme")
        with _running(JobRunner(store, config=cfg, kinds=kinds)) as runner:
            jobs = [runner.submit("inc-1", k.name, tenant="acme") for k in kinds]
            pids = [(runner.wait(j.id, timeout_s=120).result or {}).get("pid") for j in jobs]
    assert pids[0] is not None and pids[0] != os.getpid()      # a Ray worker
    assert pids[1] == os.getpid()                              # the sidecar's thread pool


@pytest.mark.slow
def test_a_request_no_node_has_is_logged_once(ray_cluster: Any, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    executor = RayExecutor(_ray_config(tmp_path).jobs.ray)
    with caplog.at_level(logging.WARNING, logger="sidecar.jobs"):
        for want in (JobResources(num_cpus=1), JobResources(num_gpus=1),
                     JobResources(num_gpus=1)):
            executor._warn_if_unavailable(ray_cluster, want)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "0.0 num_gpus in all" in said[0] and "jobs.ray.num_gpus" in said[0]


@pytest.mark.slow
def test_shutdown_never_waits_on_a_running_task_and_the_job_resumes(
        ray_cluster: Any, tmp_path: Path, make_incident: Any) -> None:
    log = tmp_path / "attempts.log"
    cfg = _ray_config(tmp_path)
    kind = JobKind("hold", run=hold_until_killed)
    with LocalStore(tmp_path / "data") as store:
        store.put("inc-1", make_incident("inc-1"), tenant="acme")
        runner = JobRunner(store, config=cfg, kinds=[kind])
        runner.start()
        job = runner.submit("inc-1", "hold", tenant="acme", params={"log": str(log)})
        wait_for(lambda: log.is_file() and log.read_text(), 120, "attempt 1 to start")
        t0 = time.monotonic()
        runner.stop(timeout_s=0.5)         # the attempt is still running on Ray
        assert time.monotonic() - t0 < 10
        left = runner.get(job.id)
        assert left is not None and left.state == "running"   # left for the next start
        with _running(JobRunner(store, config=cfg, kinds=[kind])) as again:
            done = again.wait(job.id, timeout_s=120)
    assert (done.state, done.attempts) == ("done", 2)


_OWN_RAY = """
import json, sys
import ray
from sidecar._config import SidecarConfig
from sidecar._store import LocalStore
from sidecar.jobs import JobRunner, builtin_kinds
from tests.unit.sidecar.conftest import build_incident

data = sys.argv[1]
cfg = SidecarConfig.from_dict({"data_dir": data, "jobs": {
    "executor": "ray", "poll_interval_s": 0.05, "workers": 1}})
with LocalStore(data) as store:
    store.put("inc-1", build_incident("inc-1"), tenant="acme")
    runner = JobRunner(store, config=cfg, kinds=builtin_kinds())
    runner.start()
    before = ray.is_initialized()
    done = runner.wait(runner.submit("inc-1", "stats", tenant="acme").id, timeout_s=120)
    during = ray.is_initialized()
    runner.stop()
print(json.dumps({"before": before, "during": during, "after": ray.is_initialized(),
                  "state": done.state, "error": done.error, "result": done.result}))
"""


@pytest.mark.slow
def test_a_sidecar_starts_its_own_ray_at_the_first_job_and_shuts_it_down(
        tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="Ray (extra `fleet`) is not installed")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-c", _OWN_RAY, str(tmp_path)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert (got["before"], got["during"], got["after"]) == (False, True, False)
    assert got["state"] == "done", got["error"]
    assert got["result"]["n_tensors"] == 2       # the 2 activation sites, read on a Ray worker


# -- without a cluster -----------------------------------------------------------------------

def test_ray_errors_map_to_job_failures() -> None:
    rx = pytest.importorskip("ray.exceptions", reason="Ray is not installed")

    def task_error(cause: Exception) -> Exception:
        return rx.RayTaskError("execute_job", "Traceback ...", cause, proctitle="ray::job",
                               pid=1, ip="127.0.0.1")

    lost = [rx.WorkerCrashedError(), rx.NodeDiedError("node 10.0.0.7 died"),
            rx.LocalRayletDiedError(), rx.OutOfMemoryError("memory monitor killed it")]
    for err in lost:
        mapped = job_error(err)
        assert isinstance(mapped, JobFailed) and mapped.retryable, err
        assert type(err).__name__ in str(mapped) and "runs again" in str(mapped)
    for retryable in (True, False):
        mapped = job_error(task_error(JobFailed("no logits", retryable=retryable)))
        assert isinstance(mapped, JobFailed)
        assert (str(mapped), mapped.retryable) == ("no logits", retryable)
    cause = ValueError("bad tensor")
    assert job_error(task_error(cause)) is cause          # the kind's own error, as itself
    setup = job_error(rx.RuntimeEnvSetupError("pip failed"))
    assert isinstance(setup, JobFailed) and not setup.retryable


def test_executor_keys_are_validated_naming_the_key(tmp_path: Path) -> None:
    cfg = _config(tmp_path, jobs={"executor": "ray", "ray": {
        "address": "ray://head:10001", "namespace": "fleet", "num_cpus": 2, "num_gpus": 0.5}})
    assert cfg.jobs.ray.num_cpus == 2.0 and cfg.jobs.ray.num_gpus == 0.5
    assert isinstance(make_executor(cfg), RayExecutor)
    assert isinstance(make_executor(_config(tmp_path)), LocalExecutor)   # the default
    bad = {"jobs.executor": {"executor": "dask"},
           "jobs.ray.num_gpus": {"ray": {"num_gpus": -1}},
           "jobs.ray.num_cpus": {"ray": {"num_cpus": "two"}},
           "jobs.ray.address": {"ray": {"address": "head-without-port"}},
           "jobs.ray.namespace": {"ray": {"namespace": " "}},
           "jobs.ray.gpus": {"ray": {"gpus": 1}}}
    for key, jobs in bad.items():
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            _config(tmp_path, jobs=jobs)


def test_the_ray_keys_come_from_the_environment_too() -> None:
    from sidecar._config import load_config

    cfg = load_config(REPO / "configs" / "sidecar.yaml", env={
        "FORENSICS_SIDECAR__JOBS__EXECUTOR": "ray",
        "FORENSICS_SIDECAR__JOBS__RAY__ADDRESS": "ray://head:10001",
        "FORENSICS_SIDECAR__JOBS__RAY__NUM_GPUS": "1"})
    assert (cfg.jobs.executor, cfg.jobs.ray.address, cfg.jobs.ray.num_gpus) == \
        ("ray", "ray://head:10001", 1.0)
    assert load_config(REPO / "configs" / "sidecar.yaml", env={}).jobs.executor == "local"


def test_the_builtin_kinds_that_touch_the_data_dir_are_marked() -> None:
    # cf/probe_score read baselines/probes, baseline/probe write them, investigate writes its
    # report: all under <data_dir> with the local store (a shared one: test_ray_artefacts.py)
    assert {k.name for k in builtin_kinds() if k.uses_data_dir} == {
        "baseline", "cf", "investigate", "probe", "probe_score"}


def test_a_kind_hint_only_raises_the_request() -> None:
    base = JobResources(num_cpus=2)
    assert base.at_least(None) == base
    assert base.at_least(JobResources(num_cpus=1, num_gpus=1)) == \
        JobResources(num_cpus=2, num_gpus=1)
    with pytest.raises(ValueError, match="num_gpus"):
        JobResources(num_gpus=-1)


def test_the_local_executor_never_imports_ray(tmp_path: Path) -> None:
    code = ("import sys; from sidecar._config import SidecarConfig; "
            "from sidecar.jobs import make_executor; "
            "make_executor(SidecarConfig.from_dict({'jobs': {'executor': 'local'}})).shutdown(); "
            "make_executor(SidecarConfig.from_dict({'jobs': {'executor': 'ray'}})).shutdown(); "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"     # not even a RayExecutor imports Ray before a job


def test_the_job_context_goes_to_ray_without_the_auth_tokens(tmp_path: Path) -> None:
    cfg = _config(tmp_path, auth={"tokens": [{"token": "s3cret-token", "tenant": "acme"}]})
    ctx = JobContext(job_id="j", incident_id="i", kind="k", attempt=1, params={"a": 1},
                     incident_path=str(tmp_path / "i.arrow"), config=cfg, tenant="acme")
    shipped = _shippable(ctx)
    assert "s3cret-token" not in pickle.dumps(shipped).decode("latin-1")
    assert "s3cret-token" in pickle.dumps(ctx).decode("latin-1")      # the check can see it
    assert shipped == dataclasses.replace(ctx, config=dataclasses.replace(
        cfg, auth=dataclasses.replace(cfg.auth, tokens={})))


def test_a_ray_executor_shut_down_refuses_work_retryably(tmp_path: Path) -> None:
    executor = RayExecutor(_ray_config(tmp_path).jobs.ray)
    executor.shutdown()
    ctx = JobContext(job_id="j", incident_id="i", kind="k", attempt=1, params={},
                     incident_path=str(tmp_path / "i.arrow"), config=_config(tmp_path))
    with pytest.raises(JobFailed) as e:
        executor.run(fail_as_told, ctx)
    assert e.value.retryable and "shut down" in str(e.value)


# -- remote workers open object-store incidents by reference ---------------------------------


@pytest.mark.slow
def test_a_ray_task_opens_an_object_store_incident_by_reference(
        ray_cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """S3 API EMULATOR (moto) + a real local Ray: the task gets the object's URI with the index
    row's digest (never the sidecar's local path), fetches it with its own credentials and opens
    it; an object altered in the bucket after the ack is refused by the worker (the job fails
    with the digest mismatch, it never analyses other bytes)."""
    from tests._s3 import s3_emulator, store_config
    from tests.integration.conftest import build_incident

    kind = JobKind("open_by_reference", run=open_by_reference)
    with s3_emulator(monkeypatch) as s3:
        cfg = _ray_config(tmp_path, store=store_config(s3))
        blobs = {"inc-1": build_incident("inc-1", n_sites=3), "inc-2": build_incident(
            "inc-2", n_sites=2, seed=1)}
        with LocalStore.from_config(cfg) as store:
            for incident_id, blob in blobs.items():
                store.put(incident_id, blob, tenant="acme")
            key = f"{s3.bucket}/fleet/a/incidents/t-acme/inc-2.arrow"
            with s3.fs().open_output_stream(key) as f:       # tampered after the ack
                f.write(build_incident("inc-2", n_sites=4, seed=2))
            runner = JobRunner(store, config=cfg, kinds=(*builtin_kinds(), kind))
            with _running(runner):
                jobs = {i: runner.submit(i, "open_by_reference", tenant="acme") for i in blobs}
                done = {i: runner.wait(j.id, timeout_s=180) for i, j in jobs.items()}
    ok, tampered = done["inc-1"], done["inc-2"]
    assert ok.state == "done", ok.error
    assert ok.result is not None
    assert ok.result["ref"].startswith(f"s3://{s3.bucket}/fleet/a/incidents/t-acme/inc-1.arrow"
                                       "#sha256=")
    assert ok.result["n_sites"] == 3 and ok.result["pid"] != os.getpid()
    assert tampered.state == "failed" and tampered.attempts == 1
    assert "does not hold the acknowledged incident" in (tampered.error or "")


def test_joining_a_cluster_never_lets_a_ray_outage_end_the_sidecar(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ray driver exits when its GCS stays unreachable for RAY_gcs_rpc_server_reconnect_
    timeout_s (60 s): the sidecar (a driver) raises it before joining a cluster — the fleet chaos
    run lost both sidecars to this — and keeps an operator's own value. (``ray.init`` is
    replaced by a recorder: the setting must be in place when it runs; no cluster here.)"""
    import types

    from sidecar._config_sections import RayConfig
    from sidecar.jobs._ray import GCS_RECONNECT_ENV, GCS_RECONNECT_S

    seen: list[str | None] = []
    ray = types.SimpleNamespace(init=lambda **kw: seen.append(os.environ.get(GCS_RECONNECT_ENV)))
    monkeypatch.delenv(GCS_RECONNECT_ENV, raising=False)
    RayExecutor(RayConfig(address="127.0.0.1:6379"))._init(ray)
    monkeypatch.setenv(GCS_RECONNECT_ENV, "120")
    RayExecutor(RayConfig(address="127.0.0.1:6379"))._init(ray)
    assert seen == [str(GCS_RECONNECT_S), "120"]
