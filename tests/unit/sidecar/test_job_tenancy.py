"""Tenancy of analysis jobs (issue 14, DESIGN §10), against a real store and runner.

A caller names incidents by id and only its own resolve; job options are a declared set (never a
host path); baselines are per (tenant, model) unless an operator declared a shared one; each
tenant has a queue quota and the runner claims fairly between tenants.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar._config import SidecarConfig
from sidecar._observer import CountingTelemetry
from sidecar._store import LocalStore
from sidecar.jobs import JobFailed, JobOptionsError, JobQuotaError, JobRunner, builtin_kinds
from sidecar.jobs._cca import CCA
from sidecar.jobs._host import RunnerHost

FP = "f" * 64
Make = Callable[..., bytes]


def _config(tmp_path: Path, **raw: Any) -> SidecarConfig:
    return SidecarConfig.from_dict({"data_dir": str(tmp_path),
                                    "jobs": {"poll_interval_s": 0.05, **raw.pop("jobs", {})},
                                    "modules": {"cf": {"enabled": False}}, **raw})


@contextlib.contextmanager
def _started(store: LocalStore, cfg: SidecarConfig) -> Iterator[JobRunner]:
    runner = JobRunner(store, config=cfg, kinds=builtin_kinds())
    runner.start()
    try:
        yield runner
    finally:
        runner.stop()


def _two_tenants(store: LocalStore, make: Make, *, benign: int = 3) -> None:
    """acme: one flagged incident ``a-1``; globex: ``benign`` sampled ones ``g-<i>``."""
    store.put("a-1", make("a-1", tenant="acme"), tenant="acme")
    for i in range(benign):
        store.put(f"g-{i}", make(f"g-{i}", tenant="globex", rule="ratio", seed=i),
                  tenant="globex")


def test_a_caller_cannot_pass_a_host_path_or_an_undeclared_option(tmp_path: Path,
                                                                   make_incident: Make) -> None:
    with LocalStore(tmp_path) as store:
        _two_tenants(store, make_incident, benign=0)
        runner = JobRunner(store, config=_config(tmp_path), kinds=builtin_kinds())
        for params in ({"benign_paths": ["/etc/passwd"]}, {"cf_ranked_sites": [["x", 1.0]]}):
            with pytest.raises(JobOptionsError, match=r"no option\(s\) .*; its options: "
                                                      r"benign_ids, "):
                runner.submit("a-1", "cca", tenant="acme", params=params, caller=True)
        with pytest.raises(JobOptionsError, match=r"replay.*its options: none"):
            runner.submit("a-1", "replay", tenant="acme", params={"x": 1}, caller=True)
        assert runner.counts()["pending"] == 0


def test_cca_resolves_benign_incidents_in_the_job_tenant_only(tmp_path: Path,
                                                             make_incident: Make) -> None:
    cfg = _config(tmp_path, baselines={"cca_benign": 8})
    with LocalStore(tmp_path) as store:
        _two_tenants(store, make_incident)
        store.put("a-2", make_incident("a-2", tenant="acme", rule="ratio"), tenant="acme")
        runner = JobRunner(store, config=cfg, kinds=builtin_kinds())
        job = runner.submit("a-1", "cca", tenant="acme")
        host = RunnerHost(store, config=cfg, job=job, submit=runner.submit,
                          telemetry=CountingTelemetry(), traceparent=None)
        assert CCA.prepare is not None
        # an injected path (even from inside the sidecar) is dropped; the tenant's own are used
        out = CCA.prepare(host, job, {"benign_paths": ["/etc/passwd"]})
        assert out["benign_paths"] == [str(store.path("a-2"))]
        said = {}
        for name in ("g-0", "../../etc/passwd", "nope"):     # another tenant's = absent
            with pytest.raises(JobFailed, match="not found") as e:
                CCA.prepare(host, job, {"benign_ids": [name]})
            said[name] = str(e.value).replace(repr(name), "<id>")
        assert len(set(said.values())) == 1 and "globex" not in said["g-0"]
        assert CCA.prepare(host, job, {"benign_ids": ["a-2"]})["benign_paths"] == \
            [str(store.path("a-2"))]


def test_baseline_is_built_from_and_for_the_job_tenant_only(tmp_path: Path,
                                                           make_incident: Make) -> None:
    with LocalStore(tmp_path) as store:
        _two_tenants(store, make_incident)
        with _started(store, _config(tmp_path, baselines={"detector": "norm"})) as runner:
            by_fp = runner.wait(runner.submit("a-1", "baseline", tenant="acme",
                                              params={"fingerprint": FP}, caller=True).id)
            by_ids = runner.wait(runner.submit("a-1", "baseline", tenant="acme",
                                               params={"incident_ids": ["g-0", "g-1"]},
                                               caller=True).id)
            own = runner.wait(runner.submit("g-0", "baseline", tenant="globex",
                                            params={"fingerprint": FP}, caller=True).id)
        assert by_fp.state == "failed" and "found 0" in (by_fp.error or "")
        assert by_ids.state == "failed" and "not found" in (by_ids.error or "")
        assert "g-" not in (by_fp.error or "") + str(by_fp.result)
        assert own.state == "done", own.error
        assert own.result is not None and own.result["scope"] == "tenant:globex"
        assert sorted(own.result["incident_ids"]) == ["g-0", "g-1", "g-2"]
        assert "tenant-globex" in own.result["path"]
        scopes = store.index.read("SELECT DISTINCT scope FROM baselines")
        assert scopes == [("tenant:globex",)]


def test_an_operator_declared_shared_baseline_pools_its_tenants(tmp_path: Path,
                                                               make_incident: Make) -> None:
    shared = [{"name": "fleet", "fingerprint": FP, "tenants": ["acme", "globex"]}]
    cfg = _config(tmp_path, baselines={"detector": "norm", "shared": shared})
    with LocalStore(tmp_path) as store:
        _two_tenants(store, make_incident)
        with _started(store, cfg) as runner:
            job = runner.wait(runner.submit("a-1", "baseline", tenant="acme",
                                            params={"fingerprint": FP}, caller=True).id)
        assert job.state == "done", job.error
        assert job.result is not None and job.result["scope"] == "shared:fleet"
        assert len(job.result["incident_ids"]) == 3


def test_per_tenant_queue_quota_refuses_only_that_tenant(tmp_path: Path,
                                                        make_incident: Make) -> None:
    with LocalStore(tmp_path) as store:
        _two_tenants(store, make_incident, benign=1)
        cfg = _config(tmp_path, jobs={"max_pending_per_tenant": 2})
        runner = JobRunner(store, config=cfg, kinds=builtin_kinds())     # not started
        first = runner.submit("a-1", "stats", tenant="acme", caller=True, request_id="r1")
        runner.submit("a-1", "stats", tenant="acme", caller=True)
        with pytest.raises(JobQuotaError, match="max_pending_per_tenant = 2"):
            runner.submit("a-1", "stats", tenant="acme", caller=True)
        assert runner.submit("a-1", "stats", tenant="acme", caller=True,
                             request_id="r1").id == first.id          # a retry is not new
        runner.submit("g-0", "stats", tenant="globex", caller=True)   # another tenant is not
        runner.submit("a-1", "stats", tenant="acme")                  # the sidecar's own jobs
        assert runner.counts()["pending"] == 4


def test_claim_is_fair_between_tenants(tmp_path: Path, make_incident: Make) -> None:
    with LocalStore(tmp_path) as store:
        _two_tenants(store, make_incident, benign=1)
        runner = JobRunner(store, config=_config(tmp_path), kinds=builtin_kinds())
        for _ in range(20):
            runner.submit("a-1", "stats", tenant="acme")
        late = runner.submit("g-0", "stats", tenant="globex")
        first, second = runner.queue.claim(), runner.queue.claim()
        assert first is not None and first.tenant == "acme"
        assert second is not None and second.id == late.id      # not behind acme's 19 others


def test_an_index_from_before_scopes_keeps_old_baselines_as_legacy_never_used(
        tmp_path: Path) -> None:
    import duckdb

    from sidecar._store_index import Index

    path = tmp_path / "index.duckdb"
    with duckdb.connect(str(path)) as con:      # the baselines table as it was: no scope
        con.execute("CREATE TABLE baselines (fingerprint VARCHAR NOT NULL, detector VARCHAR NOT "
                    "NULL, version INTEGER NOT NULL, path VARCHAR NOT NULL, model_name VARCHAR, "
                    "sample_count INTEGER NOT NULL, sites_json VARCHAR NOT NULL, "
                    "incident_ids_json VARCHAR NOT NULL, job_id VARCHAR, created_at TIMESTAMP "
                    "NOT NULL, PRIMARY KEY (fingerprint, detector, version))")
        con.execute("INSERT INTO baselines VALUES (?, 'norm', 1, 'baselines/x/norm-v0001.npz', "
                    "NULL, 3, '[]', '[\"g-0\"]', NULL, now())", [FP])
    index = Index(path)
    try:
        assert index.read("SELECT scope, fingerprint, version FROM baselines") == \
            [("legacy:unscoped", FP, 1)]
    finally:
        index.close()
    with LocalStore(tmp_path) as store:     # opening it again changes nothing
        assert store.index.read("SELECT count(*) FROM baselines") == [(1,)]


def test_job_options_naming_an_id_both_tenants_hold_resolve_to_the_callers_own(
        tmp_path: Path, make_incident: Make) -> None:
    """Ids are unique per tenant: an option naming ``x`` (held by acme and by globex) means the
    job tenant's ``x``, for every kind that takes incident ids; a pooled (shared) baseline
    reads each tenant's own file of a shared id."""
    from sidecar.jobs._baseline import BASELINE
    from sidecar.jobs._investigate import INVESTIGATE

    shared = [{"name": "fleet", "fingerprint": FP, "tenants": ["acme", "globex"]}]
    cfg = _config(tmp_path, baselines={"cca_benign": 8, "shared": shared})
    with LocalStore(tmp_path) as store:
        store.put("a-1", make_incident("a-1", tenant="acme"), tenant="acme")
        for tenant, seed in (("acme", 1), ("globex", 2)):
            store.put("x", make_incident("x", rule="ratio", seed=seed), tenant=tenant)
        mine = str(store.path("x", tenant="acme"))
        runner = JobRunner(store, config=cfg, kinds=builtin_kinds())
        job = runner.submit("a-1", "cca", tenant="acme")
        host = RunnerHost(store, config=cfg, job=job, submit=runner.submit,
                          telemetry=CountingTelemetry(), traceparent=None)
        assert CCA.prepare is not None and BASELINE.prepare is not None
        assert INVESTIGATE.prepare is not None
        assert CCA.prepare(host, job, {"benign_ids": ["x"]})["benign_paths"] == [mine]
        assert CCA.prepare(host, job, {})["benign_paths"] == [mine]     # sampled: own only
        assert INVESTIGATE.prepare(host, job, {"benign": ["x"], "steps": ["spans"]}
                                   )["benign_paths"] == [mine]
        assert BASELINE.prepare(host, job, {"incident_ids": ["x"]})["incident_paths"] == [mine]
        pooled = BASELINE.prepare(host, job, {"fingerprint": FP})["incident_paths"]
        assert sorted(pooled) == sorted([mine, str(store.path("x", tenant="globex"))])


def test_baseline_scope_directories_never_collide() -> None:
    """A tenant literally named like a hashed scope gets its own directory (helper finding)."""
    import hashlib

    from sidecar.jobs._baselines import scope_dir

    odd = "tenant acme/../x"                           # not a safe file name: hashed
    hashed = scope_dir(f"tenant:{odd}")
    lookalike = hashed.split("-", 1)[1]                # 'h' + 24 hex, a legal plain name
    assert scope_dir(f"tenant:{lookalike}") != hashed
    assert scope_dir("tenant:acme") == "tenant-acme" and scope_dir("shared:acme") != "tenant-acme"
    assert hashed == "tenant-h" + hashlib.sha256(odd.encode()).hexdigest()[:24]
