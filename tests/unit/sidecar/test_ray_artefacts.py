"""CF on Ray with a shared store (``sidecar._artefacts``), with a real local Ray
(``ray.init(num_cpus=2)``, this module's own): the ``baseline`` job writes on the sidecar, the
``cf`` job runs as a Ray task that fetches the baseline by reference (parsed in the worker, not
in the sidecar), and its result is identical to the local executor's on the same incident and
baseline. Plus which built-in kinds stay on the sidecar with and without a shared store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sidecar._store import LocalStore
from sidecar.jobs import JobRunner, LocalExecutor, builtin_kinds

from .test_jobs import _running
from .test_ray_executor import _config, _ray_config, ray_cluster  # noqa: F401 (a fixture)

FP = "f" * 64


def _cf(store: LocalStore, runner: JobRunner) -> dict[str, Any]:
    with _running(runner):
        done = runner.wait(runner.submit("a-1", "cf", tenant="acme").id, timeout_s=180)
    assert (done.state, done.attempts) == ("done", 1), done.error
    assert done.result is not None and done.result["status"] == "scored"
    return done.result


@pytest.mark.slow
def test_a_cf_job_on_ray_with_a_shared_store_equals_the_local_executors(
        ray_cluster: Any, tmp_path: Path, make_incident: Any,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    from sidecar import _artefacts

    monkeypatch.setattr(_artefacts, "_PARSED", {})     # parsed here = ran here
    cfg = _ray_config(tmp_path / "data", store={"uri": f"file://{tmp_path / 'store'}"},
                      modules={"cf": {"enabled": False}}, baselines={"detector": "norm"})
    with LocalStore.from_config(cfg) as store:
        store.put("a-1", make_incident("a-1"), tenant="acme")
        for i in range(3):
            store.put(f"b-{i}", make_incident(f"b-{i}", rule="ratio", seed=i + 1),
                      tenant="acme")
        runner = JobRunner(store, config=cfg, kinds=builtin_kinds())
        with _running(runner):
            built = runner.wait(runner.submit("b-0", "baseline", tenant="acme",
                                              params={"fingerprint": FP}).id, timeout_s=180)
        assert built.state == "done", built.error
        on_ray = _cf(store, JobRunner(store, config=cfg, kinds=builtin_kinds()))
        assert _artefacts._PARSED == {}                # the baseline was parsed on a worker
        local = _cf(store, JobRunner(store, config=cfg, kinds=builtin_kinds(),
                                     executor=LocalExecutor(workers=1)))
        assert list(_artefacts._PARSED) == ["baseline"]    # ... and here on the thread pool
    assert on_ray["baseline"]["version"] == 1
    assert on_ray["baseline"]["sha256"] == built.result["sha256"]
    differ = sorted(k for k in local.keys() | on_ray.keys() if local.get(k) != on_ray.get(k))
    assert differ == [], f"fields that differ between the executors: {differ}"
    assert on_ray == local


def test_with_a_shared_store_only_the_kinds_that_write_stay_on_the_sidecar(
        tmp_path: Path) -> None:
    local = _config(tmp_path)
    shared = _config(tmp_path, store={"uri": f"file://{tmp_path / 'store'}"})
    assert {k.name for k in builtin_kinds() if k.on_sidecar(local)} == {
        "baseline", "cf", "investigate", "probe", "probe_score"}
    # cf / probe_score read baselines / probes by reference from the store; baseline and probe
    # write them with the sidecar's credentials; investigate writes its report under data_dir
    assert {k.name for k in builtin_kinds() if k.on_sidecar(shared)} == {
        "baseline", "investigate", "probe"}
