"""The fleet's laboratory (issue 16): several real sidecar processes on one PostgreSQL catalog,
sharing one incident store, optionally running their jobs on a real Ray cluster — all local, in
one temp dir, always cleaned up.

Built on the chaos run's :class:`~benchmarks.chaos_lab.Lab` (sidecar processes, tokens, clean
up). :func:`start_ray_head` runs ``ray start --head`` as a child process (its workers import this
checkout); :func:`ray_worker_pids` finds the Ray worker processes so a run can ``kill -9`` them.

Example::

    with Lab(seed=0) as lab, PostgresServer.start_new() as pg:
        fleet = start_fleet(lab, n=2, dsn=pg.create_database("f2"), name="f2")
        with lab.client(fleet[0], "acme") as c:
            c.upload("inc-1", data)                  # listed through fleet[1] too
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.chaos_lab import REPO, Lab, SidecarProc, free_port

__all__ = ["DSN_ENV", "ray_worker_pids", "start_fleet", "start_ray_head"]

#: The environment variable the fleet's sidecars read the catalog DSN from.
DSN_ENV = "FORENSICS_CATALOG_DSN"


def start_fleet(lab: Lab, *, n: int, dsn: str, name: str, jobs: dict[str, Any] | None = None,
                cf: bool = False, env: dict[str, str] | None = None) -> list[SidecarProc]:
    """``n`` started sidecars (own data dirs and ports) on the catalog ``dsn``, sharing the
    store ``<lab>/<name>/store`` (a directory: the object-store path of ``pyarrow.fs``)."""
    import yaml

    shared = lab.root / name / "store"
    shared.mkdir(parents=True, exist_ok=True)
    fleet = []
    for i in range(n):
        sc_name = f"{name}-{i}"
        data, home = lab.root / sc_name / "data", lab.root / sc_name
        data.mkdir(parents=True, exist_ok=True)
        address, maddr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        cfg = {"data_dir": str(data), "grpc": {"address": address},
               "metrics": {"enabled": True, "address": maddr},
               "auth": {"tokens": [{"tenant": t, "token": k} for t, k in lab.tokens.items()],
                        "admin_tokens": [lab.admin_token]},
               "store": {"uri": shared.as_uri()},
               "catalog": {"kind": "postgres", "dsn_env": DSN_ENV, "backfill_interval_s": 1.0},
               "jobs": {"poll_interval_s": 0.1, "on_ingest": [], **(jobs or {})},
               "modules": {"cf": {"enabled": cf}}}
        config = home / "sidecar.yaml"
        config.write_text(yaml.safe_dump(cfg))
        sc = SidecarProc(sc_name, config, home / "sidecar.log", address=address,
                         metrics_address=maddr, data_dir=data, env={DSN_ENV: dsn, **(env or {})})
        lab.sidecars[sc_name] = sc
        sc.start()
        fleet.append(sc)
    return fleet


def start_ray_head(lab: Lab, *, num_cpus: int = 2) -> tuple[str, dict[str, str]]:
    """``ray start --head`` (no dashboard) as a child of the lab: its GCS address once up, and
    the environment a driver (a sidecar) needs to join it — Ray 2.60 clusters authenticate
    with a token (``RAY_AUTH_MODE=token``; the lab's own, made up here)."""
    import secrets

    port = free_port()
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    temp = Path(f"/tmp/rf-{os.getpid()}")          # short: Ray's socket paths are limited
    argv = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
            "--node-ip-address=127.0.0.1", f"--port={port}", f"--num-cpus={num_cpus}", "--include-dashboard=false",
            f"--temp-dir={temp}", "--object-store-memory=100000000"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "RAY_USAGE_STATS_ENABLED": "0", **auth}
    child = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    lab.children.append(child)
    lab.cleanups.append(lambda: _stop_ray(temp, auth["RAY_AUTH_TOKEN"]))
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        probe = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "status",
                                f"--address={address}"], env=env, capture_output=True,
                               check=False, timeout=60)
        if probe.returncode == 0:
            return address, auth
        if child.poll() is not None:
            raise RuntimeError("ray start --head exited")
        time.sleep(1.0)
    raise RuntimeError(f"the Ray head at {address} did not come up in 90 s")


def _cmdlines() -> Iterator[tuple[int, bytes]]:
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                yield int(proc.name), (proc / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue


def _stop_ray(temp: Path, token: str) -> None:
    """Stop this lab's Ray only (never another Ray on the machine, as ``ray stop`` would):
    every process that holds the lab's Ray token in its environment (GCS, raylet, workers) or
    a file open under the lab's Ray temp dir (the node's agents, which get neither the token
    nor the dir on their command line), then remove the dir."""
    mark, where = f"RAY_AUTH_TOKEN={token}".encode(), str(temp)
    for pid, _ in _cmdlines():
        if pid == os.getpid():
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            files = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        if mark in env or any(f == where or f.startswith(where + "/") for f in files):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    time.sleep(1.0)
    shutil.rmtree(temp, ignore_errors=True)


def ray_worker_pids() -> list[int]:
    """The pids of Ray's worker processes on this machine (``ray::IDLE``, ``ray::<task>``;
    not the raylet, the GCS, the node's agents or a driver)."""
    pids = []
    for pid, cmd in _cmdlines():
        name = cmd.split(b" ", 1)[0].rstrip()
        # workers retitle themselves ray::IDLE / ray::<task>; the raylet's own command line
        # names default_worker.py too (as a flag), so only the title counts
        if name.startswith(b"ray::") and not name.endswith(b"Agent"):
            pids.append(pid)
    return pids
