"""Baselines and probes through the store seam (``sidecar._artefacts``), with a real store and
runner: the local store keeps today's files byte for byte and the catalog row (with the
object's sha256) decides which version is used; an object altered after its row was written
fails the job with ``ArtefactError``; on a shared store (``store.uri``, a ``file://`` directory
here) the bytes live outside ``data_dir`` and a reader with another ``data_dir`` (another
machine) fetches and checks them; rows without a digest are refused there, read as before on
the local store."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from integrations.errors import ArtefactError
from sidecar._artefacts import artefact_ref, put_artefact, read_artefact
from sidecar._config import SidecarConfig
from sidecar._store import LocalStore
from sidecar.jobs import JobRunner, builtin_kinds

FP = "f" * 64
Make = Callable[..., bytes]


def _config(data_dir: Path, *, store_uri: str = "") -> SidecarConfig:
    return SidecarConfig.from_dict({
        "data_dir": str(data_dir), "jobs": {"poll_interval_s": 0.05},
        "modules": {"cf": {"enabled": False}}, "baselines": {"detector": "norm"},
        **({"store": {"uri": store_uri}} if store_uri else {})})


@contextlib.contextmanager
def _runner(cfg: SidecarConfig, make: Make) -> Iterator[tuple[LocalStore, JobRunner]]:
    """acme: flagged ``a-1`` and three sampled benign ``b-<i>``; a started runner."""
    with LocalStore.from_config(cfg) as store:
        store.put("a-1", make("a-1"), tenant="acme")
        for i in range(3):
            store.put(f"b-{i}", make(f"b-{i}", rule="ratio", seed=i + 1), tenant="acme")
        runner = JobRunner(store, config=cfg, kinds=builtin_kinds())
        runner.start()
        try:
            yield store, runner
        finally:
            runner.stop()


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _run(runner: JobRunner, kind: str, **params: Any) -> Any:
    job = runner.submit("a-1", kind, tenant="acme", params=params or None)
    return runner.wait(job.id, timeout_s=60)


def test_local_store_keeps_todays_layout_and_an_altered_baseline_fails_the_job(
        tmp_path: Path, make_incident: Make) -> None:
    cfg = _config(tmp_path / "data")
    with _runner(cfg, make_incident) as (store, runner):
        built = _run(runner, "baseline", fingerprint=FP)
        assert built.state == "done", built.error
        path = tmp_path / "data" / "baselines" / "tenant-acme" / FP / "norm-v0001.npz"
        assert built.result["path"] == str(path.relative_to(tmp_path / "data"))
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        assert store.index.read("SELECT version, path, sha256 FROM baselines") == \
            [(1, built.result["path"], sha)]
        scored = _run(runner, "cf")
        assert scored.state == "done", scored.error
        assert scored.result["status"] == "scored"
        assert (scored.result["baseline"]["version"], scored.result["baseline"]["sha256"]) == \
            (1, sha)
        _flip_a_byte(path)                                      # altered after its row
        tampered = _run(runner, "cf")
    assert (tampered.state, tampered.attempts) == ("failed", 1)
    assert (tampered.error or "").startswith("ArtefactError: ")
    assert "differs from the sha256 its catalog row carries" in (tampered.error or "")


def test_the_catalog_row_not_the_directory_decides_the_version(
        tmp_path: Path, make_incident: Make) -> None:
    cfg = _config(tmp_path / "data")
    with _runner(cfg, make_incident) as (_, runner):
        assert _run(runner, "baseline", fingerprint=FP).state == "done"
        d = tmp_path / "data" / "baselines" / "tenant-acme" / FP
        (d / "norm-v0002.npz").write_bytes(b"a file nobody recorded")   # no row: never used
        scored = _run(runner, "cf")
        assert scored.result["baseline"]["version"] == 1, scored.error
        again = _run(runner, "baseline", fingerprint=FP)            # ... and never overwritten
        assert (again.state, again.result["version"]) == ("done", 3), again.error
        assert (d / "norm-v0002.npz").read_bytes() == b"a file nobody recorded"
        assert _run(runner, "cf").result["baseline"]["version"] == 3


def test_a_shared_store_holds_the_baseline_and_another_machine_reads_it_checked(
        tmp_path: Path, make_incident: Make) -> None:
    shared = tmp_path / "store"
    uri = f"file://{shared}"
    cfg = _config(tmp_path / "a", store_uri=uri)
    with _runner(cfg, make_incident) as (store, runner):
        built = _run(runner, "baseline", fingerprint=FP)
        assert built.state == "done", built.error
        assert _run(runner, "cf").result["baseline"]["version"] == 1
        row = store.index.read_dicts("SELECT * FROM baselines")[0]
    rel = built.result["path"]
    assert rel.startswith(f"baselines/tenant-acme/{FP}/norm-v0001-") and rel.endswith(".npz")
    assert (shared / rel).is_file() and not (tmp_path / "a" / "baselines").exists()
    for name in ("b", "c"):
        (tmp_path / name).mkdir()                          # each its own <data_dir>/ref-cache
    elsewhere = _config(tmp_path / "b", store_uri=uri)     # another sidecar / worker
    ref = artefact_ref(row, what="baseline")
    assert hashlib.sha256(read_artefact(elsewhere, ref)).hexdigest() == row["sha256"]
    _flip_a_byte(shared / rel)
    fresh = _config(tmp_path / "c", store_uri=uri)         # nothing cached there yet
    with pytest.raises(ArtefactError, match="does not hold the acknowledged baseline"):
        read_artefact(fresh, ref)
    with pytest.raises(ArtefactError, match="carries no sha256"):
        read_artefact(fresh, {**ref, "sha256": ""})
    for bad in ("incidents/t-acme/a-1.arrow", "baselines/../incidents/x", "/etc/passwd"):
        with pytest.raises(ArtefactError, match="is not an artefact of the store"):
            read_artefact(fresh, {**ref, "path": bad})


def test_a_row_from_before_digests_is_read_as_before_on_the_local_store(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    rel = "probes/0123456789abcdef/ff/probe-v0001.json"
    sha = put_artefact(cfg, rel, b'{"x": 1}')
    assert (tmp_path / rel).read_bytes() == b'{"x": 1}'
    assert sha == hashlib.sha256(b'{"x": 1}').hexdigest()
    legacy = {"what": "probe", "path": rel, "sha256": "", "version": 1}
    assert read_artefact(cfg, legacy) == b'{"x": 1}'
    with pytest.raises(ArtefactError, match="cannot be read"):
        read_artefact(cfg, {**legacy, "path": rel.replace("v0001", "v0002")})


def test_a_probe_that_is_not_a_probe_document_fails_as_an_artefact_error(
        tmp_path: Path) -> None:
    from sidecar.jobs._probe_files import load_probe, write_probe

    cfg = _config(tmp_path)
    rel = "probes/0123456789abcdef/ff/probe-v0001.json"
    ok = write_probe(cfg, rel, {"probe": {"w": [1.0]}, "site": "blocks.0.resid_post"})
    assert load_probe(cfg, {"what": "probe", "path": rel, "sha256": ok, "version": 1}
                      )["site"] == "blocks.0.resid_post"
    bad = put_artefact(cfg, rel, b'{"format": "forensics-probe/1"}')
    with pytest.raises(ArtefactError, match="is not a forensics-probe/1 probe document"):
        load_probe(cfg, {"what": "probe", "path": rel, "sha256": bad, "version": 1})


def test_s3_emulator_a_baseline_object_is_written_once_and_read_checked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """S3 API EMULATOR (moto), not AWS S3: the artefact is one object under the store's prefix;
    a reader with another data dir fetches and checks it; an altered object is refused."""
    from tests._s3 import s3_emulator, store_config

    rel = f"baselines/tenant-acme/{FP}/norm-v0001-0123456789ab.npz"
    with s3_emulator(monkeypatch) as s3:
        raw = {"store": store_config(s3), "data_dir": str(tmp_path / "a")}
        writer = SidecarConfig.from_dict(raw)
        sha = put_artefact(writer, rel, b"baseline bytes")
        assert s3.keys("fleet/a/baselines") == [f"fleet/a/{rel}"]
        ref = {"what": "baseline", "path": rel, "sha256": sha, "version": 1}
        (tmp_path / "b").mkdir()
        reader = SidecarConfig.from_dict({**raw, "data_dir": str(tmp_path / "b")})
        assert read_artefact(reader, ref) == b"baseline bytes"
        with s3.fs().open_output_stream(f"{s3.bucket}/fleet/a/{rel}") as f:
            f.write(b"other bytes")
        (tmp_path / "c").mkdir()
        fresh = SidecarConfig.from_dict({**raw, "data_dir": str(tmp_path / "c")})
        with pytest.raises(ArtefactError, match="does not hold the acknowledged baseline"):
            read_artefact(fresh, ref)


def test_a_probe_lives_in_the_shared_store_and_an_altered_one_fails_probe_score(
        tmp_path: Path) -> None:
    """The planted-head tiny GPT-2's incidents (``_rca_cases``): the ``probe`` job writes its
    JSON to the store (not ``data_dir``) with the sha256 in its ``probes`` row; ``probe_score``
    reads it from there, refuses it once altered and scores with it once restored."""
    from ._rca_cases import model_entry, record_cases

    shared = tmp_path / "store"
    cfg = SidecarConfig.from_dict({
        "data_dir": str(tmp_path / "a"), "store": {"uri": f"file://{shared}"},
        "jobs": {"poll_interval_s": 0.05}, "models": [model_entry()],
        "modules": {"cf": {"enabled": False}, "cca": {"enabled": False}}})
    cases = record_cases(8)
    with LocalStore.from_config(cfg) as store:
        for inc in (*cases["failing"], *cases["contrast"], *cases["benign"]):
            store.put(inc.id, inc.to_bytes(), tenant="acme")
        runner = JobRunner(store, config=cfg, kinds=builtin_kinds())
        first = cases["failing"][0].id

        def run(kind: str) -> Any:
            return runner.wait(runner.submit(first, kind, tenant="acme").id, timeout_s=120)

        runner.start()
        try:
            trained = run("probe")
            assert trained.state == "done" and trained.result["status"] == "trained", \
                trained.error
            obj = shared / trained.result["path"]
            original = obj.read_bytes()
            (row,) = store.index.read_dicts("SELECT path, sha256 FROM probes")
            assert row == {"path": trained.result["path"],
                           "sha256": hashlib.sha256(original).hexdigest()}
            assert not (tmp_path / "a" / "probes").exists()
            _flip_a_byte(obj)
            tampered = run("probe_score")
            obj.write_bytes(original)
            scored = run("probe_score")
        finally:
            runner.stop()
    assert tampered.state == "failed" and (tampered.error or "").startswith("ArtefactError: ")
    assert scored.state == "done" and scored.result["status"] == "scored", scored.error
    assert scored.result["probe"]["sha256"] == row["sha256"]


def test_jobs_resolve_baselines_and_probes_of_their_own_tenant_only(
        tmp_path: Path, make_incident: Make) -> None:
    """The runner resolves the artefact (prepare) in the job's tenant; whatever the params say
    (a caller cannot pass them: not a declared option) is replaced."""
    from sidecar._observer import CountingTelemetry
    from sidecar.jobs import JobOptionsError
    from sidecar.jobs._cf import CF
    from sidecar.jobs._host import RunnerHost
    from sidecar.jobs._probe import PROBE_SCORE

    cfg = _config(tmp_path)
    with LocalStore.from_config(cfg) as store:
        for tenant in ("acme", "globex"):
            store.put("x", make_incident("x", tenant=tenant), tenant=tenant)
        with store.index.write() as con:
            con.execute("INSERT INTO baselines (scope, fingerprint, detector, version, path, "
                        "sample_count, sites_json, incident_ids_json, created_at, sha256) "
                        "VALUES ('tenant:acme', ?, 'norm', 1, 'baselines/tenant-acme/f/n.npz', "
                        "3, '[]', '[]', now(), 'ab')", [FP])
            con.execute("INSERT INTO probes (tenant, fingerprint, version, site, path, n_pos, "
                        "n_neg, created_at, sha256) VALUES ('acme', ?, 2, 's', "
                        "'probes/k/f/probe-v0002.json', 8, 8, now(), 'cd')", [FP])
        runner = JobRunner(store, config=cfg, kinds=builtin_kinds())
        with pytest.raises(JobOptionsError, match="no option"):
            runner.submit("x", "cf", tenant="globex", params={"baseline": {}}, caller=True)
        got = {}
        for tenant in ("acme", "globex"):
            job = runner.submit("x", "cf", tenant=tenant)
            host = RunnerHost(store, config=cfg, job=job, submit=runner.submit,
                              telemetry=CountingTelemetry(), traceparent=None)
            assert CF.prepare is not None and PROBE_SCORE.prepare is not None
            injected = {"what": "baseline", "path": "baselines/tenant-acme/f/n.npz",
                        "sha256": "ab", "version": 1, "fingerprint": FP}
            got[tenant] = (CF.prepare(host, job, {"baseline": injected})["baseline"],
                           PROBE_SCORE.prepare(host, job, {"probe": injected})["probe"])
    assert got["globex"] == (None, None)
    assert got["acme"] == ({"what": "baseline", "path": "baselines/tenant-acme/f/n.npz",
                            "sha256": "ab", "version": 1, "fingerprint": FP},
                           {"what": "probe", "path": "probes/k/f/probe-v0002.json",
                            "sha256": "cd", "version": 2, "fingerprint": FP})


def test_two_builds_of_one_scope_at_once_never_share_an_object_and_one_row_wins(
        tmp_path: Path, make_incident: Make) -> None:
    """Shared store: two baseline jobs prepared before either finished claim the same version;
    their objects have distinct names (the job id), the catalog keeps the first row and
    refuses the second."""
    import duckdb

    from sidecar._observer import CountingTelemetry
    from sidecar.jobs import JobContext
    from sidecar.jobs._baseline import BASELINE, baseline_job, record_baseline
    from sidecar.jobs._host import RunnerHost

    cfg = _config(tmp_path / "a", store_uri=f"file://{tmp_path / 'store'}")
    with LocalStore.from_config(cfg) as store:
        for i in range(3):
            store.put(f"b-{i}", make_incident(f"b-{i}", rule="ratio", seed=i + 1), tenant="acme")
        runner = JobRunner(store, config=cfg, kinds=builtin_kinds())
        jobs = [runner.submit("b-0", "baseline", tenant="acme", params={"fingerprint": FP})
                for _ in range(2)]
        results = []
        for job in jobs:
            host = RunnerHost(store, config=cfg, job=job, submit=runner.submit,
                              telemetry=CountingTelemetry(), traceparent=None)
            assert BASELINE.prepare is not None
            params = BASELINE.prepare(host, job, {"fingerprint": FP})
            results.append(baseline_job(JobContext(
                job_id=job.id, incident_id="b-0", kind="baseline", attempt=1, params=params,
                incident_path="", config=cfg, tenant="acme")))
        assert [r["version"] for r in results] == [1, 1]
        assert results[0]["path"] != results[1]["path"]
        with store.index.write() as con:
            record_baseline(con, jobs[0], results[0])
        with pytest.raises(duckdb.ConstraintException, match=r"(?i)primary key"), \
                store.index.write() as con:
            record_baseline(con, jobs[1], results[1])
        rows = store.index.read("SELECT path, sha256 FROM baselines")
    assert rows == [(results[0]["path"], results[0]["sha256"])]
    assert all((tmp_path / "store" / r["path"]).is_file() for r in results)
