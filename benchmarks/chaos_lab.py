"""The chaos run's laboratory: real sidecar processes on loopback, in one temp dir, always cleaned.

:class:`SidecarProc` is ``forensics sidecar serve`` as a subprocess in its own process group (a
Ctrl-C in the terminal reaches only the chaos run, which then stops it): start, ``kill -9``,
SIGSTOP/SIGCONT, restart on the same data dir and ports, its RSS (``/proc``: VmRSS, and the
peak VmHWM after resetting it through ``clear_refs``), its ``/metrics`` scraped over HTTP.
:class:`Lab` owns the temp dir, the tenants' tokens, every process started and every tmpfs
mounted, and undoes all of it in :meth:`Lab.close` (called from a ``finally`` and on SIGTERM).
:class:`Row` is one line of the result table.

Example::

    with Lab(seed=0) as lab:
        sc = lab.sidecar("main")
        with lab.client(sc, "acme") as c:
            c.upload("inc-1", data)
        sc.rejected()            # {'busy': 0.0, 'cancelled': 1.0, ...} from /metrics
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MiB = 1024 * 1024
REPO = Path(__file__).resolve().parents[1]
#: Tenants of every chaos sidecar (bearer tokens; the run's own, made up here).
TENANTS = ("acme", "globex")
_REJECTED = re.compile(r'^forensics_ingest_rejected_total\{reason="([a-z_]+)"\} ([0-9.e+-]+)$')


@dataclasses.dataclass
class Row:
    """One line of the table: an attack, what should happen, what did, and whether that matched."""

    probe: str
    attack: str
    expected: str
    observed: str
    passed: bool | None   # None: not run (and why is in ``observed``)
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return {True: "pass", False: "FAIL", None: "not run"}[self.passed]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (bytes) of ``pid`` from ``/proc/<pid>/status``."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


class SidecarProc:
    """One sidecar subprocess with a fixed config (data dir, ports); see the module doc."""

    def __init__(self, name: str, config: Path, log: Path, *, address: str,
                 metrics_address: str, data_dir: Path, env: dict[str, str] | None = None) -> None:
        self.name, self.config, self.log = name, config, log
        self.env = env or {}
        self.address, self.metrics_address, self.data_dir = address, metrics_address, data_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, *, timeout_s: float = 60.0) -> float:
        """Start it (same data dir and ports) and wait until it listens; seconds that took."""
        t0 = time.monotonic()
        mark = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as out:
            env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **self.env}
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "model_forensics", "sidecar", "serve", "--config",
                 str(self.config), "--log-level", "WARNING"],
                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        self.starts += 1
        while time.monotonic() - t0 < timeout_s:
            with open(self.log, "rb") as f:
                f.seek(mark)
                if b"listening on" in f.read():
                    return time.monotonic() - t0
            if self.proc.poll() is not None:
                raise RuntimeError(f"sidecar {self.name} exited at start; see {self.log}")
            time.sleep(0.02)
        raise RuntimeError(f"sidecar {self.name} did not listen in {timeout_s} s; see {self.log}")

    def kill9(self) -> None:
        """``kill -9`` and reap it."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def stop(self) -> None:
        """SIGCONT (it may be stopped), SIGTERM, then SIGKILL after 20 s."""
        if not self.alive():
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill9()

    # ------------------------------------------------------------------ observation
    def rss(self) -> int:
        return proc_status(self.pid)["VmRSS"]

    def reset_peak(self) -> bool:
        """Reset VmHWM to the current RSS (``clear_refs`` 5); False where not permitted."""
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def peak(self) -> int:
        return proc_status(self.pid)["VmHWM"]

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://{self.metrics_address}/metrics", timeout=10) as r:
            return str(r.read().decode())

    def rejected(self) -> dict[str, float]:
        """``forensics_ingest_rejected_total`` by reason, scraped over HTTP now."""
        out = {}
        for line in self.metrics_text().splitlines():
            m = _REJECTED.match(line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    def temp_files(self) -> list[Path]:
        """Upload temp files anywhere under the data dir (whatever the store's layout)."""
        return sorted(p for p in self.data_dir.rglob("*.tmp") if p.is_file())


def rejected_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    """The reasons whose count changed, and by how much."""
    return {k: int(v - before.get(k, 0.0)) for k, v in after.items()
            if v != before.get(k, 0.0)}


class Lab:
    """The temp dir, tokens, sidecars, child processes and mounts of one chaos run."""

    def __init__(self, *, seed: int, keep: bool = False) -> None:
        self.seed = seed
        self.keep = keep
        self.root = Path(tempfile.mkdtemp(prefix="forensics-chaos-"))
        self.tokens = {t: f"chaos-{t}-{os.urandom(8).hex()}" for t in TENANTS}
        self.admin_token = f"chaos-admin-{os.urandom(8).hex()}"
        #: Called last by :meth:`close` (e.g. ``ray stop``).
        self.cleanups: list[Any] = []
        self.sidecars: dict[str, SidecarProc] = {}
        self.children: list[subprocess.Popen[bytes]] = []
        self.mounts: list[Path] = []

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def sidecar(self, name: str, *, data_dir: Path | None = None,
                limits: dict[str, Any] | None = None) -> SidecarProc:
        """A started sidecar with its own config, ports and (by default) data dir."""
        import yaml

        data = data_dir or self.root / name / "data"
        for d in (data, self.root / name):
            d.mkdir(parents=True, exist_ok=True)
        address, maddr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        cfg = {"data_dir": str(data), "grpc": {"address": address},
               "metrics": {"enabled": True, "address": maddr},
               "auth": {"tokens": [{"tenant": t, "token": k} for t, k in self.tokens.items()]},
               "limits": limits or {}}
        config = self.root / name / "sidecar.yaml"
        config.write_text(yaml.safe_dump(cfg))
        sc = SidecarProc(name, config, self.root / name / "sidecar.log", address=address,
                         metrics_address=maddr, data_dir=data)
        self.sidecars[name] = sc
        sc.start()
        return sc

    def client(self, sc: SidecarProc, tenant: str, *, timeout_s: float = 30.0) -> Any:
        """A ``SidecarClient`` of ``tenant`` to ``sc``."""
        from sidecar import SidecarClient

        return SidecarClient(sc.address, token=self.tokens[tenant], timeout_s=timeout_s)

    def exporter(self, sc: SidecarProc, tenant: str, spool: str, **kw: Any) -> tuple[Any, Any]:
        """The middleware's ``SidecarExporter`` with a disk spool under the lab, and its own
        ``RecorderMetrics`` (drops by reason); returns (exporter, metrics)."""
        from prometheus_client import CollectorRegistry

        from integrations._metrics import RecorderMetrics
        from integrations.exporters import SidecarExporter

        metrics = RecorderMetrics(registry=CollectorRegistry())
        opts = {"deadline_s": 10.0, "backoff_initial_s": 0.05, "backoff_max_s": 0.5, **kw}
        ex = SidecarExporter(sc.address, token=self.tokens[tenant],
                             spool_dir=self.root / "spools" / spool, metrics=metrics, **opts)
        return ex, metrics

    def spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        """A child process (stopped by :meth:`close` if still running)."""
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        child = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, start_new_session=True)
        self.children.append(child)
        return child

    def mount_tmpfs(self, path: Path, *, size_mib: int) -> str | None:
        """Mount a tmpfs of ``size_mib`` at ``path``; None, or why it could not."""
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            return "not root: cannot mount a tmpfs"
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs",
                              str(path)], capture_output=True, text=True, check=False)
        if res.returncode != 0:
            return f"mount -t tmpfs failed: {res.stderr.strip() or res.returncode}"
        self.mounts.append(path)
        return None

    def umount(self, path: Path) -> None:
        if path in self.mounts:
            subprocess.run(["umount", str(path)], check=False, capture_output=True)
            self.mounts.remove(path)

    def close(self) -> None:
        """Stop every child and sidecar, unmount, remove the temp dir (unless ``keep``); a
        second Ctrl-C or SIGTERM meanwhile is ignored, so the cleanup always finishes."""
        with _uninterrupted():
            self._close()

    def _close(self) -> None:
        for child in self.children:
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.kill()
                child.wait(timeout=10)
        for sc in self.sidecars.values():
            sc.stop()
        for path in list(self.mounts):
            self.umount(path)
        for cleanup in self.cleanups:
            with contextlib.suppress(Exception):
                cleanup()
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def _uninterrupted() -> Iterator[None]:
    """SIGINT and SIGTERM ignored while inside (main thread only; elsewhere a no-op)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt while inside (so ``finally`` cleans up as on Ctrl-C)."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def make_incident(incident_id: str, *, tenant: str, floats: int, seed: int,
                  rule: str = "OnFlag", fingerprint: str = "c4" * 32) -> Any:
    """A real incident (``Incident``): one activation row of ``floats`` float32 values."""
    import torch

    from integrations.incident import Incident, IncidentBuilder, new_manifest

    m = new_manifest(id=incident_id,
                     model={"name": "chaos", "revision": None, "fingerprint": fingerprint},
                     request={"id": f"req-{incident_id}", "tenant": tenant, "traceparent": None},
                     trigger={"rule": rule, "reason": "chaos", "step": 0},
                     runtime={"python": "3.11"})
    b = IncidentBuilder(manifest=m)
    gen = torch.Generator().manual_seed(seed)
    b.add(kind="activation", site="blocks.0.resid_post", module_path="h.0", step=0,
          tensor=torch.randn(1, floats, generator=gen))   # [batch, d_model]
    return Incident.from_bytes(b.to_bytes())


def stored_ids(lab: Lab, sc: SidecarProc, tenant: str) -> list[str]:
    """Every incident id ``tenant`` sees (all pages; duplicates kept, to be counted)."""
    with lab.client(sc, tenant) as c:
        return [i.id for i in c.list_all(page_size=1000)]


@dataclasses.dataclass(frozen=True)
class Answer:
    """How the sidecar answered one call: status name, counted reason, message."""

    code: str
    reason: str = ""
    details: str = ""

    def __str__(self) -> str:
        return f"{self.code} {self.reason}".strip()


def answer_of(call: Any) -> Answer:
    """The :class:`Answer` of a finished call: ``OK`` or the error's status and reason."""
    import grpc

    err = call if isinstance(call, grpc.RpcError) else None
    if err is None:
        return Answer("OK")
    metadata: Any = err.trailing_metadata() or ()
    reason = dict(metadata).get("forensics-reject-reason", "")
    return Answer(err.code().name, str(reason), err.details() or "")


def upload_answer(client: Any, messages: Iterator[Any], *, timeout_s: float = 60.0) -> Answer:
    """Send one UploadIncident message stream with ``client``'s token; its answer."""
    import grpc

    try:
        client.stub.UploadIncident(messages, timeout=timeout_s, metadata=client.metadata)
    except grpc.RpcError as e:
        return answer_of(e)
    return Answer("OK")


def try_upload(client: Any, incident: Any, **kwargs: Any) -> Answer:
    """``client.upload`` (the public client) of an ``Incident``; its answer, never raising."""
    import grpc

    try:
        client.upload(incident.id, incident.to_bytes(), **kwargs)
    except grpc.RpcError as e:
        return answer_of(e)
    return Answer("OK")
