"""The demo's child processes: started in their own session, logged to files, waited for by a
line they print, and stopped — in reverse order, politely, then firmly — whatever happens.

Example::

    with Processes() as procs:
        sc = procs.start("sidecar", [sys.executable, "-m", "model_forensics", "sidecar",
                                     "serve", "--config", cfg], log=dir / "sidecar.log")
        line = sc.wait_for(r"listening on (\\S+)", timeout_s=60)
        ...                              # Ctrl-C, an error or the end: every child is stopped
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["Child", "ChildFailed", "DemoError", "Processes", "child_env", "until"]


class ChildFailed(RuntimeError):
    """A child exited or never printed what it was waited for (its log tail is included)."""


class DemoError(RuntimeError):
    """A demo step did not happen in time (the message says which)."""


def until(fn: Callable[[], T | None], *, timeout_s: float, what: str) -> T:
    """``fn()`` once it returns something truthy, polled every 0.25 s (DemoError after
    ``timeout_s``: ``what`` says what was waited for)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.25)


class Child:
    """One started process: its ``Popen``, its log file and a name for messages."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], log: Path) -> None:
        self.name, self.popen, self.log = name, popen, log

    def tail(self, n: int = 25) -> str:
        """The last ``n`` lines of the child's log."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_for(self, pattern: str, *, timeout_s: float) -> re.Match[str]:
        """Block until the log has a line matching ``pattern``; :class:`ChildFailed` if the
        child exits first or ``timeout_s`` passes."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        while True:
            found = rx.search(self.log.read_text(errors="replace")) if self.log.exists() else None
            if found:
                return found
            if self.popen.poll() is not None:
                raise ChildFailed(f"{self.name} exited with status {self.popen.returncode}:\n"
                                  f"{self.tail()}")
            if time.monotonic() > deadline:
                raise ChildFailed(f"{self.name} did not print /{pattern}/ within "
                                  f"{timeout_s:.0f} s:\n{self.tail()}")
            time.sleep(0.1)

    def stop(self, *, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, wait up to ``timeout_s``, then SIGKILL; returns the exit status."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.kill()
                self.popen.wait(10)
        return self.popen.returncode


class Processes:
    """Every child the demo started; leaving the ``with`` block stops them all, the last
    started first (the server flushes its incidents before the sidecar goes)."""

    def __init__(self) -> None:
        self.children: list[Child] = []

    def start(self, name: str, argv: Sequence[str], *, log: Path,
              env: Mapping[str, str] | None = None, cwd: Path | None = None) -> Child:
        """Start ``argv`` in its own session (a terminal's Ctrl-C reaches only the demo, which
        then stops the children in order), stdout and stderr to ``log``."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as out:
            popen = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT,
                                     env=dict(env) if env is not None else None, cwd=cwd,
                                     start_new_session=True)
        child = Child(name, popen, log)
        self.children.append(child)
        return child

    def stop_all(self, *, timeout_s: float = 30.0) -> dict[str, int | None]:
        """Stop every child still running (last started first); their exit statuses."""
        return {c.name: c.stop(timeout_s=timeout_s) for c in reversed(self.children)}

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop_all()


def child_env(repo: Path, **extra: str) -> dict[str, str]:
    """The environment for a child: this checkout first on ``PYTHONPATH`` (so the children run
    the same code as the demo), one torch thread each (the children share the CPU), extras."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH"))
                                        if p)
    return env
