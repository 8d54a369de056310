"""Failure signatures in the sidecar, end to end with real components: a planted-head tiny GPT-2
served through the real Recorder, its incidents uploaded to a real sidecar on port 0 (real
DuckDB, real Arrow files); the ``probe`` job trains a linear probe from flagged vs sampled
incidents (out-of-fold AUROC, the decodability curve, a versioned probe file and a ``probes``
row), every labelled incident gets an out-of-fold ``failure_p``; new incidents are scored by
``probe_score`` after CF (``forensics_failure_p`` histogram, the column in ListIncidents — filter
and order — in ``forensics incidents list`` and in the report); too few labels store nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from sidecar._client import SidecarClient
from sidecar._config import SidecarConfig
from sidecar._server import Sidecar, create_server
from sidecar.api import v1
from sidecar.telemetry import SidecarTelemetry
from tests._waiting import jobs_idle, wait_for

from ._rca_cases import model_entry, record, record_cases

REPO = Path(__file__).resolve().parents[3]




def _job(c: SidecarClient, incident_id: str, kind: str, params: dict[str, Any] | None = None,
         ) -> dict[str, Any]:
    job = c.run_analysis(incident_id, kind, params_json=json.dumps(params or {}))
    done = wait_for(lambda: (a := c.get_analysis(job.analysis_id)).state in
                 (v1.JOB_STATE_DONE, v1.JOB_STATE_FAILED) and a, 120, f"the {kind} job")
    assert done.state == v1.JOB_STATE_DONE, done.error
    return dict(json.loads(done.result_json))


@pytest.fixture
def sidecar(tmp_path: Path) -> Iterator[tuple[Sidecar, str, CollectorRegistry]]:
    cfg = SidecarConfig.from_dict({
        "data_dir": str(tmp_path / "data"), "jobs": {"poll_interval_s": 0.05, "workers": 1},
        "metrics": {"enabled": False}, "modules": {"cca": {"enabled": False}},
        "baselines": {"min_samples": 1000}, "models": [model_entry()]})
    registry = CollectorRegistry()
    with SidecarTelemetry(registry=registry, span_exporter=InMemorySpanExporter(),
                          metrics_port=0) as tel, create_server(cfg, port=0, telemetry=tel)[0] as sc:
        yield sc, f"127.0.0.1:{sc.port}", registry


def _upload(c: SidecarClient, incs: list[Any]) -> list[str]:
    for inc in incs:
        c.upload(inc.id, inc.to_bytes())
    return [inc.id for inc in incs]


def test_probe_trains_on_flags_and_scores_new_incidents(
        sidecar: tuple[Sidecar, str, CollectorRegistry], tmp_path: Path) -> None:
    sc, addr, registry = sidecar
    cases = record_cases(12)
    with SidecarClient(addr) as c:
        pos = _upload(c, cases["failing"][:10])
        neg = _upload(c, [*cases["contrast"][:10], *cases["benign"][:10]])
        wait_for(lambda: jobs_idle(sc), 120, "CF on the uploads")
        before = c.list(filter="failure_p:*").total_size
        trained = _job(c, pos[0], "probe")
        _check_trained(sc, trained, pos, neg, tmp_path, before)
        _check_listing(c, pos, neg)
        # new traffic: CF runs on ingest and, the (tenant, model) having a probe, probe_score
        new_fail, new_ctrl = _upload(c, [cases["failing"][10], cases["contrast"][10]])
        wait_for(lambda: sc.store.index.read(
            "SELECT count(*) FROM jobs WHERE kind = 'probe_score' AND state = 'done'")[0][0] == 2
            and jobs_idle(sc), 120, "probe_score after CF")
        fail, ctrl = c.get(new_fail), c.get(new_ctrl)
        assert fail.HasField("failure_p") and ctrl.HasField("failure_p")
        assert fail.failure_p > 0.5 > ctrl.failure_p
        scored = _job(c, new_fail, "probe_score")      # the same score, with the probe's facts
        assert scored["status"] == "scored" and scored["serving_flag"] == "flagged"
        assert scored["failure_p"] == pytest.approx(fail.failure_p)
        assert scored["probe"]["version"] == 1 and scored["features"] == "recorded"
    for flag, n in (("flagged", 2.0), ("unflagged", 1.0)):   # the job above scored it again
        assert registry.get_sample_value("forensics_failure_p_count",
                                         {"serving_flag": flag}) == n
    assert registry.get_sample_value("forensics_failure_p_bucket",
                                     {"serving_flag": "unflagged", "le": "0.5"}) == 1.0
    _check_cli_and_report(addr, new_fail, fail.failure_p, tmp_path)


def _check_trained(sc: Sidecar, r: dict[str, Any], pos: list[str], neg: list[str],
                   tmp_path: Path, before: int) -> None:
    assert before == 0                                 # nothing is scored before a probe
    assert r["status"] == "trained" and (r["n_pos"], r["n_neg"]) == (10, 20)
    assert r["features"] == {"recorded": 30, "replayed": 0}
    sites = [c["label"] for c in r["curve"]]
    assert sites == [f"blocks.{i}.resid_post" for i in range(4)]
    # the planted head (layer 2) writes the trigger into the stream: decodable from there on
    by_site = {c["label"]: c["auroc"] for c in r["curve"]}
    assert by_site["blocks.2.resid_post"] >= 0.9 and by_site["blocks.3.resid_post"] >= 0.9
    assert r["quality"]["auroc"] == max(by_site.values())
    lo, hi = r["quality"]["auroc_ci"]
    assert lo <= r["quality"]["auroc"] <= hi
    assert (tmp_path / "data" / r["path"]).is_file() and r["version"] == 1
    (row,) = sc.store.index.read_dicts("SELECT * FROM probes")
    assert (row["version"], row["site"], row["n_pos"], row["n_neg"]) == \
        (1, r["site"], 10, 20)
    assert row["auroc"] == pytest.approx(r["quality"]["auroc"])
    assert set(r["scores"]) == {*pos, *neg}            # out of fold, one per labelled incident


def _check_listing(c: SidecarClient, pos: list[str], neg: list[str]) -> None:
    """The out-of-fold scores separate the planted failures: filter and order on failure_p."""
    likely = list(c.list_all(filter="failure_p >= 0.5", order_by="failure_p desc, id"))
    assert {i.id for i in likely} == set(pos)
    scores = [i.failure_p for i in likely]
    assert scores == sorted(scores, reverse=True)
    assert not list(c.list_all(filter='failure_p < 0.5 AND trigger_rule = "flag"'))
    unlikely = list(c.list_all(filter="failure_p < 0.5", order_by="failure_p"))
    assert {i.id for i in unlikely} == set(neg)


def _forensics(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "model_forensics", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def _check_cli_and_report(addr: str, inc_id: str, p: float, tmp_path: Path) -> None:
    from sidecar._cli_incidents import LIST_COLUMNS

    listed = _forensics("incidents", "list", "--address", addr, "--filter",
                        f'id = "{inc_id}"')
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()
    got = dict(zip(header.split("\t"), row.split("\t")))
    assert header.split("\t") == list(LIST_COLUMNS) and got["failure_p"] == f"{p:.3f}"
    as_json = _forensics("incidents", "list", "--address", addr, "--json", "--filter",
                         f'id = "{inc_id}"')
    assert json.loads(as_json.stdout.splitlines()[0])["failure_p"] == pytest.approx(p)
    out = tmp_path / "report.html"
    made = _forensics("report", inc_id, "--address", addr, "-o", str(out))
    assert made.returncode == 0, made.stderr
    html = out.read_text()
    assert 'id="failure-p"' in html and f"{p:.3f}" in html and 'id="card-failure-p"' in html


def test_too_few_labels_store_and_score_nothing(
        sidecar: tuple[Sidecar, str, CollectorRegistry], tmp_path: Path) -> None:
    sc, addr, _ = sidecar
    got = record([(f"r-{k}", [3 + k, 4, 5, 6, 7, 8, 9]) for k in range(3)], tenant="small")
    with SidecarClient(addr) as c:
        ids = _upload(c, list(got.values()))
        wait_for(lambda: jobs_idle(sc), 60, "CF on the uploads")
        r = _job(c, ids[0], "probe")
        assert r["status"] == "insufficient_labels" and "at least" in r["message"]
        assert sc.store.index.read("SELECT count(*) FROM probes")[0][0] == 0
        assert not (tmp_path / "data" / "probes").exists() or \
            not list((tmp_path / "data" / "probes").rglob("*.json"))
        s = _job(c, ids[0], "probe_score")
        assert s["status"] == "no_probe" and s["failure_p"] is None
        assert not c.get(ids[0]).HasField("failure_p")
