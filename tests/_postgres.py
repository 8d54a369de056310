"""A real, throw-away PostgreSQL server for the shared-catalog tests (DESIGN §12).

:class:`PostgresServer` runs ``initdb`` into a temporary directory and ``pg_ctl start`` on a
free localhost port. The binaries come from ``PATH`` or Debian's ``/usr/lib/postgresql/<v>/bin``
(``.ci/run`` installs the ``postgresql`` package there). PostgreSQL refuses to run as root, so
as root the cluster belongs to the ``postgres`` user (the directory is chowned to it); where
neither works :func:`postgres_or_skip_reason` says why and the tests skip with that reason.

Example::

    with PostgresServer.start_new() as pg:
        dsn = pg.create_database("t1")       # 'host=127.0.0.1 port=… dbname=t1 user=postgres'
        pg.stop(); pg.start()                # the catalog is down in between
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["PostgresServer", "find_pg_bin", "postgres_or_skip_reason"]


def find_pg_bin() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl``: on PATH, else the newest Debian one."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).parent
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(d) / "pg_ctl").exists() and (Path(d) / "initdb").exists():
            return Path(d)
    return None


def _run_as() -> str | None:
    """The user the server runs as: None (this user) unless we are root, then ``postgres``."""
    return "postgres" if os.geteuid() == 0 else None


def postgres_or_skip_reason() -> str | None:
    """None when a server can be started here, else why not (the skip reason)."""
    if find_pg_bin() is None:
        return ("PostgreSQL binaries (initdb, pg_ctl) are neither on PATH nor in "
                "/usr/lib/postgresql/*/bin; install Debian's postgresql package (.ci/run does)")
    user = _run_as()
    if user is not None:
        try:
            pwd.getpwnam(user)
        except KeyError:
            return ("running as root and there is no 'postgres' user to run PostgreSQL as "
                    "(it refuses to run as root); create one or run the tests unprivileged")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg (extra 'fleet') is not installed"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One temporary cluster (see the module doc); :meth:`close` stops it and deletes it."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port
        self.data, self.log = root / "data", root / "server.log"
        self._bin = find_pg_bin()
        self._user = _run_as()

    def _run(self, *args: str, timeout: float = 60) -> None:
        assert self._bin is not None
        kwargs: dict[str, Any] = {"user": self._user} if self._user else {}
        proc = subprocess.run([str(self._bin / args[0]), *args[1:]], capture_output=True,
                              text=True, timeout=timeout, cwd=self.root, check=False, **kwargs)
        if proc.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{args[0]} failed ({proc.returncode}): {proc.stderr}\n{log}")

    @classmethod
    def start_new(cls) -> PostgresServer:
        """initdb + start a new cluster on a free port."""
        root = Path(tempfile.mkdtemp(prefix="forensics-pg-"))
        server = cls(root, _free_port())
        if server._user is not None:
            info = pwd.getpwnam(server._user)
            os.chown(root, info.pw_uid, info.pw_gid)
        server._run("initdb", "-D", str(server.data), "-U", "postgres", "--auth=trust",
                    "--locale=C", "-E", "UTF8")
        server.start()
        return server

    def start(self) -> None:
        opts = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data), "-l",
                  str(self.log), "-o", opts)

    def stop(self) -> None:
        """Stop now (``-m fast``: open connections are cut, as when a server goes away)."""
        self._run("pg_ctl", "stop", "-w", "-m", "fast", "-D", str(self.data))

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} dbname={dbname} user=postgres"

    def create_database(self, name: str) -> str:
        """A new empty database; its DSN."""
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True) as con:
            con.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def close(self) -> None:
        try:
            self.stop()
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
