"""``forensics incidents``: piped output keeps whole ids, ``--json`` streams into ``| head``
without a traceback, the score columns, and ``push`` — against a real sidecar on port 0, the CLI
run as a real process where a pipe matters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar._cli_incidents import LIST_COLUMNS, _print_table
from sidecar._client import SidecarClient
from sidecar._config import SidecarConfig
from sidecar._server import Sidecar, create_server
from sidecar.api import v1

from .conftest import build_incident

REPO = Path(__file__).resolve().parents[3]
LONG_ID = "incident-" + "0123456789abcdef" * 4      # longer than any table column at 80 chars


@pytest.fixture
def sidecar(tmp_path: Path) -> Iterator[tuple[Sidecar, str]]:
    cfg = SidecarConfig.from_dict({"data_dir": str(tmp_path / "data"),
                                   "jobs": {"poll_interval_s": 0.05},
                                   "baselines": {"detector": "norm"}})
    sc, port = create_server(cfg, port=0)
    with sc:
        yield sc, f"127.0.0.1:{port}"


def _forensics(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "model_forensics", *argv], cwd=REPO, env=env,
                          input=stdin, capture_output=True, text=True, timeout=120)


def test_piped_list_prints_whole_ids_that_show_then_finds(sidecar: tuple[Sidecar, str]) -> None:
    _, addr = sidecar
    with SidecarClient(addr) as c:
        c.upload(LONG_ID, build_incident(LONG_ID))
    listed = _forensics("incidents", "list", "--address", addr)   # stdout is a pipe here
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()
    assert header.split("\t") == list(LIST_COLUMNS)
    got = dict(zip(LIST_COLUMNS, row.split("\t")))
    assert got["id"] == LONG_ID and got["anomaly_score"] == "" and got["sites"] == "2"
    shown = _forensics("incidents", "show", got["id"], "--address", addr)
    assert shown.returncode == 0, shown.stderr


def test_the_terminal_table_never_cuts_an_id(capsys: pytest.CaptureFixture[str]) -> None:
    msg = v1.Incident(id=LONG_ID, tenant="acme", model_name="m", trigger_rule="flag",
                      trigger_reason="prompt_injection", n_sites=2, size_bytes=1234,
                      anomaly_score=4.25, anomaly_p=0.0099)
    _print_table([msg], total=1, next_token="")
    out = capsys.readouterr().out
    assert LONG_ID in out and "4.25" in out and "0.0099" in out


def test_json_into_head_ends_quietly(sidecar: tuple[Sidecar, str]) -> None:
    _, addr = sidecar
    with SidecarClient(addr) as c:       # > 64 KiB of JSON lines: more than a pipe buffers
        for i in range(200):
            iid = f"inc-{i:03d}-{'x' * 100}"
            c.upload(iid, build_incident(iid, seed=i))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = (f"set -o pipefail; {sys.executable} -m model_forensics incidents list --json --all "
           f"--page-size 50 --address {addr} | head -n 2")
    r = subprocess.run(["bash", "-c", cmd], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["id"].startswith("inc-")
    assert json.loads(lines[0])["anomaly_score"] is None     # not scored (no baseline): null


def test_json_and_show_carry_the_anomaly_score_and_p(sidecar: tuple[Sidecar, str]) -> None:
    sc, addr = sidecar
    ids = [f"b-{i}" for i in range(8)]
    with SidecarClient(addr) as c:
        for i, iid in enumerate(ids):
            c.upload(iid, build_incident(iid, rule="ratio", seed=i))
        job = c.run_analysis(ids[0], "baseline", params_json=json.dumps({"incident_ids": ids}))
        assert sc.jobs.wait(job.analysis_id, timeout_s=60).state == "done"
        c.upload("scored", build_incident("scored", seed=42))
        cf = next(a for a in c.list_analyses("scored") if a.kind == "cf")
        result = json.loads(sc.jobs.wait(cf.analysis_id, timeout_s=60).result_json)
    assert result["status"] == "scored"
    r = _forensics("incidents", "list", "--json", "--order-by", "anomaly_score desc",
                   "--address", addr)
    assert r.returncode == 0, r.stderr
    rows = {row["id"]: row for row in map(json.loads, r.stdout.splitlines())}
    assert rows["scored"]["anomaly_score"] == pytest.approx(result["anomaly_score"])
    assert rows["scored"]["anomaly_p"] == pytest.approx(result["anomaly_p"])
    scores = [row["anomaly_score"] for row in map(json.loads, r.stdout.splitlines())]
    assert scores == sorted(scores, reverse=True) and len(scores) == 9
    shown = _forensics("incidents", "show", "scored", "--json", "--address", addr)
    assert json.loads(shown.stdout)["anomaly_p"] == pytest.approx(result["anomaly_p"])


def test_push_uploads_files_idempotently_and_reports_bad_ones(
        sidecar: tuple[Sidecar, str], tmp_path: Path) -> None:
    sc, addr = sidecar
    files = []
    for i in range(2):
        f = tmp_path / f"p-{i}.arrow"
        f.write_bytes(build_incident(f"p-{i}", seed=i))
        files.append(str(f))
    bad = tmp_path / "bad.arrow"
    bad.write_bytes(b"not an incident")
    first = _forensics("incidents", "push", *files, str(bad), "--address", addr)
    assert first.returncode == 1                              # one file failed ...
    assert "bad.arrow: not pushed" in first.stderr
    assert [line.split("\t")[:2] for line in first.stdout.splitlines()] == [
        ["p-0", "stored"], ["p-1", "stored"]]                 # ... the others were pushed
    assert sc.store.get("p-1") is not None
    again = _forensics("incidents", "push", files[0], "--address", addr)
    assert again.returncode == 0 and "already stored" in again.stdout
