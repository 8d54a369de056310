"""The examples run as documented: plain torch as a script; the ASGI app in-process (health,
metrics, HTTP 400 for bad bodies) and as ``uvicorn examples.asgi_app:app`` with the real
SmolLM2, answering the deploy README's request with a flagged incident that carries live
activations (the flight recorder)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import runpy
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry

from integrations import Recorder, exporters

ROOT = Path(__file__).resolve().parents[2]


def test_plain_torch_example_runs(capsys):  # type: ignore[no-untyped-def]
    runpy.run_path(str(ROOT / "examples" / "plain_torch.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "torch:hidden" in out and "steps=[0]" in out


def test_asgi_app_serves_health_metrics_and_refuses_bad_bodies_with_400() -> None:
    import httpx

    from examples.asgi_app import create_app

    reg = CollectorRegistry()
    model = torch.nn.Sequential(torch.nn.Linear(4, 2))

    async def go(app: Any) -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://app") as c:
            return [await c.get("/healthz"), await c.get("/metrics"),
                    await c.post("/classify", content=b"not json at all"),
                    await c.post("/classify", content=b"\xff\xfe"),
                    await c.post("/classify", json={"text": "no review key"}),
                    await c.post("/classify", json=["a", "list"])]

    with Recorder(model, sites=["torch:0"], exporter=exporters.InMemoryExporter(),
                  metrics_registry=reg) as rec:
        health, metrics, *bad = asyncio.run(go(create_app(model=model, tokenizer=None,
                                                          recorder=rec, registry=reg)))
    assert health.status_code == 200 and health.text == "ok"
    assert "forensics_recorder_queue_depth" in metrics.text
    for r in bad:
        assert r.status_code == 400 and "review" in r.json()["error"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"the app did not start: {log.read_text()}")


@pytest.mark.slow
@pytest.mark.real_model
def test_uvicorn_serves_the_example_and_the_readme_request_is_flagged(tmp_path: Path) -> None:
    readme = (ROOT / "deploy" / "README.md").read_text()
    body = re.search(r"curl -s localhost:8000/classify -d '(\{.*?\})'", readme)
    assert body, "deploy/README.md shows no request"
    port, out_dir, log = _free_port(), tmp_path / "incidents", tmp_path / "uvicorn.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "FORENSICS_EXAMPLE_DIR": str(out_dir), "FORENSICS_SAMPLE_RATIO": "0"}
    env.pop("FORENSICS_SIDECAR", None)
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "examples.asgi_app:app",
                                 "--port", str(port)], cwd=ROOT, env=env, stdout=f,
                                stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(f"{base}/healthz", proc, log)
        status, answer = _post(f"{base}/classify", body.group(1).encode())
        assert status == 200 and "HACKED" in answer["answer"] and answer["flagged"], answer
        status, benign = _post(f"{base}/classify", b'{"review": "I loved this movie."}')
        assert status == 200 and not benign["flagged"], benign
        assert _post(f"{base}/classify", b"review=plain form")[0] == 400
    finally:
        proc.send_signal(signal.SIGTERM)          # lifespan shutdown flushes the recorder
        # uvicorn shuts down gracefully, then re-raises the signal (exit status -SIGTERM)
        assert proc.wait(60) in (0, -signal.SIGTERM), log.read_text()
    assert "Application shutdown complete" in log.read_text()
    files = sorted(out_dir.glob("*.arrow"))
    assert len(files) == 1                        # the benign request left nothing
    from integrations.incident import Incident

    inc = Incident.open(files[0])
    m = inc.manifest
    assert m["trigger"]["reason"] == "prompt_injection"
    assert m["activations"] == "captured" and m["trigger"]["captured_by"]["rule"] == \
        "flight_recorder"
    assert len(inc.steps(inc.sites()[0])) >= 2   # prefill + decode steps, recorded live
