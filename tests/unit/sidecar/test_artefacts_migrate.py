"""``forensics baseline to-store``: a local sidecar's baselines (a row from before digests, one
with its digest) are copied to a shared store (a ``file://`` directory) and work from there;
an altered file is reported and not copied; a row whose file is nowhere is reported."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from sidecar._artefacts import artefact_ref, read_artefact
from sidecar._catalog import open_catalog
from sidecar._config import SidecarConfig
from sidecar._store import LocalStore
from sidecar.jobs import JobRunner, builtin_kinds

FP = "f" * 64


def test_baselines_move_to_a_shared_store_and_legacy_rows_get_their_digest(
        tmp_path: Path, make_incident: Callable[..., bytes],
        capsys: pytest.CaptureFixture[str]) -> None:
    from model_forensics.cli import main as cli

    raw = {"data_dir": str(tmp_path / "data"), "jobs": {"poll_interval_s": 0.05},
           "modules": {"cf": {"enabled": False}}, "baselines": {"detector": "norm"}}
    cfg = SidecarConfig.from_dict(raw)
    with LocalStore.from_config(cfg) as store:
        for i in range(3):
            store.put(f"b-{i}", make_incident(f"b-{i}", rule="ratio", seed=i + 1), tenant="acme")
        runner = JobRunner(store, config=cfg, kinds=builtin_kinds())
        runner.start()
        try:
            for _ in range(3):
                job = runner.submit("b-0", "baseline", tenant="acme", params={"fingerprint": FP})
                assert runner.wait(job.id, timeout_s=60).state == "done"
        finally:
            runner.stop()
        with store.index.write() as con:      # v1: a row from before digests; v3: altered
            con.execute("UPDATE baselines SET sha256 = NULL WHERE version = 1")
            con.execute("INSERT INTO baselines SELECT scope, fingerprint, detector, 4, "
                        "replace(path, 'v0003', 'v0004'), model_name, sample_count, sites_json, "
                        "incident_ids_json, job_id, created_at, sha256 FROM baselines "
                        "WHERE version = 3")       # v4: a row whose file is nowhere
    d = tmp_path / "data" / "baselines" / "tenant-acme" / FP
    (d / "norm-v0003.npz").write_bytes(b"altered")
    shared = tmp_path / "store"
    config = tmp_path / "to-store.yaml"
    config.write_text(yaml.safe_dump({**raw, "store": {"uri": f"file://{shared}"}}))
    capsys.readouterr()
    assert cli(["baseline", "to-store", "--config", str(config)]) == 1     # one altered
    out, err = capsys.readouterr()
    assert "copied 2 baseline/probe file(s)" in out and "0 already there" in out
    assert "1 altered" in err and "norm-v0003.npz" in err
    assert "1 absent" in err and "norm-v0004.npz" in err
    moved = SidecarConfig.from_dict({**raw, "store": {"uri": f"file://{shared}"}})
    catalog = open_catalog(moved)        # (the incidents move separately: README)
    try:
        rows = {r["version"]: r for r in catalog.read_dicts("SELECT * FROM baselines")}
    finally:
        catalog.close()
    for version in (1, 2):                                  # both readable from the store
        data = read_artefact(moved, artefact_ref(rows[version], what="baseline"))
        assert hashlib.sha256(data).hexdigest() == rows[version]["sha256"]
        assert (shared / rows[version]["path"]).read_bytes() == data
    assert not (shared / rows[3]["path"]).exists()
    assert cli(["baseline", "to-store", "--config", str(config)]) == 1     # idempotent
    assert "copied 2" in capsys.readouterr().out
