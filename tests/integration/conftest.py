"""Fixtures for the sidecar integration tests: real incidents and real in-process sidecars."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from integrations.incident import IncidentBuilder, new_manifest
from sidecar._config import SidecarConfig
from sidecar._server import Sidecar, create_server

KiB = 1024
REPO = Path(__file__).resolve().parents[2]


def build_incident(incident_id: str, *, tenant: str = "acme", n_sites: int = 2, seed: int = 0,
                   created_at: str | None = None, rule: str = "flag") -> bytes:
    """A small real incident: ``n_sites`` activation sites of [1, 4, 8] at step 0."""
    gen = torch.Generator().manual_seed(seed)
    m = new_manifest(id=incident_id, created_at=created_at,
                     model={"name": "tiny-gpt2", "revision": None, "fingerprint": "f" * 64},
                     trigger={"rule": rule, "reason": "prompt_injection", "step": 0},
                     request={"id": f"req-{incident_id}", "tenant": tenant, "traceparent": None},
                     runtime={"python": "3.11"})
    b = IncidentBuilder(manifest=m)
    for i in range(n_sites):
        b.add(kind="activation", site=f"blocks.{i}.resid_post", module_path=f"h.{i}", step=0,
              tensor=torch.randn(1, 4, 8, generator=gen))   # [batch, pos, d_model]
    return b.to_bytes()


def make_config(tmp_path: Path, **raw: Any) -> SidecarConfig:
    """A test config in ``tmp_path`` (fast job polling, small limits); ``raw`` sections are
    merged over it."""
    base: dict[str, Any] = {"data_dir": str(tmp_path / "data"),
                            "jobs": {"poll_interval_s": 0.05},
                            "limits": {"max_chunk_bytes": 64 * KiB,
                                       "max_incident_bytes": 1024 * KiB}}
    for key, value in raw.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return SidecarConfig.from_dict(base)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., tuple[Sidecar, str]]]:
    """Start in-process sidecars (``serve(**raw_config)`` → (sidecar, address)); every one is
    stopped at teardown, also when the test failed."""
    started: list[Sidecar] = []

    def start(**raw: Any) -> tuple[Sidecar, str]:
        sc, port = create_server(make_config(tmp_path, **raw), port=0)
        sc.start()
        started.append(sc)
        return sc, f"127.0.0.1:{port}"

    yield start
    for sc in started:
        sc.stop(grace=0.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SidecarProcess:
    """``forensics sidecar serve --config config`` as a subprocess (log in ``log``); stopped
    on exit whatever happened, also when a test left it SIGSTOPped."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SidecarProcess:
        out = open(self.log, "ab")
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = proc = subprocess.Popen(
            [sys.executable, "-m", "model_forensics", "sidecar", "serve", "--config",
             str(self.config), "--log-level", "WARNING"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        out.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if "listening on" in self.log.read_text(errors="replace"):
                return self
            if proc.poll() is not None:
                raise AssertionError(f"sidecar exited early:\n{self.log.read_text(errors='replace')}")
            time.sleep(0.05)
        raise AssertionError(f"sidecar did not start:\n{self.log.read_text(errors='replace')}")

    def __enter__(self) -> SidecarProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(timeout=30)
