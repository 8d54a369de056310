"""The sidecar process in one object: gRPC server, health, reflection, store, jobs, telemetry.

``create_server`` builds everything from a :class:`SidecarConfig` and binds the port (``0`` =
any free port); ``start`` resumes jobs, starts serving and reports ``SERVING`` on
``grpc.health.v1``; ``stop`` reports ``NOT_SERVING``, drains RPCs for ``grace`` seconds, stops
the jobs and closes the store.

Example::

    sidecar, port = create_server(SidecarConfig.defaults(data_dir="/tmp/fx"), port=0)
    sidecar.start()
    ...                                  # clients on 127.0.0.1:{port}
    sidecar.stop()
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc

from integrations.errors import ConfigError, SidecarError

from ._auth import Authenticator, AuthInterceptor
from ._config import SidecarConfig
from ._ingest import INCIDENTS_RECEIVED, INGEST_BYTES
from ._observer import CountingTelemetry, Telemetry, fan_out
from ._reject import INGEST_REJECTED
from ._servicer import IncidentServicer
from ._store import LocalStore
from ._store_verify import INCIDENTS_QUARANTINED
from .api import v1
from .jobs import JobKind, JobRunner, builtin_kinds

__all__ = ["TRANSPORT_MAX_MESSAGE", "Sidecar", "create_server", "grpc_options"]

log = logging.getLogger("sidecar.server")


#: The largest message gRPC itself accepts (plus 64 KiB framing): the largest chunk any config
#: allows, so a chunk over ``limits.max_chunk_bytes`` reaches the servicer and is refused and
#: counted as ``chunk_too_large``. A message over this is refused by gRPC itself
#: (RESOURCE_EXHAUSTED "Received message larger than max", counted ``cancelled``); it is not
#: larger because every concurrent RPC may buffer one such message.
TRANSPORT_MAX_MESSAGE = 4 * 1024 * 1024


def grpc_options(config: SidecarConfig) -> list[tuple[str, Any]]:
    """Channel options of the server: message-size caps (received: up to
    :data:`TRANSPORT_MAX_MESSAGE`; sent: a chunk or a response page, plus framing headroom)."""
    limits = config.limits
    return [
        ("grpc.max_receive_message_length", TRANSPORT_MAX_MESSAGE + 64 * 1024),
        ("grpc.max_send_message_length",
         max(limits.max_chunk_bytes + 64 * 1024, limits.max_response_bytes)),
        ("grpc.so_reuseport", 0),
    ]


def _credentials(config: SidecarConfig) -> grpc.ServerCredentials | None:
    tls = config.grpc.tls
    if not tls.enabled:
        return None
    assert tls.cert_file is not None and tls.key_file is not None
    try:
        key = Path(tls.key_file).read_bytes()
        cert = Path(tls.cert_file).read_bytes()
        ca = Path(tls.client_ca_file).read_bytes() if tls.client_ca_file else None
    except OSError as e:
        raise ConfigError(f"grpc.tls: cannot read {e.filename}: {e.strerror}") from e
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=tls.require_client_auth)


class Sidecar:
    """A configured sidecar (use :func:`create_server`); ``kinds`` are the analysis job kinds
    its runner knows (default: :func:`sidecar.jobs.builtin_kinds`)."""

    def __init__(self, config: SidecarConfig, *, port: int | None = 0,
                 telemetry: Telemetry | None = None,
                 kinds: Iterable[JobKind] | None = None) -> None:
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        from grpc_reflection.v1alpha import reflection

        self.config = config
        self.counters = CountingTelemetry()
        self.telemetry = fan_out(self.counters, telemetry)
        self.store = LocalStore.from_config(config, telemetry=self.telemetry)
        self.jobs = JobRunner(self.store, config=config, telemetry=self.telemetry,
                              kinds=builtin_kinds() if kinds is None else kinds)
        self.auth = Authenticator(config.auth)
        self.servicer = IncidentServicer(store=self.store, jobs=self.jobs, auth=self.auth,
                                         config=config, telemetry=self.telemetry)
        # incidents acknowledged while the catalog was down get their analyses once indexed
        self.store.backfill.listeners.append(self.servicer.enqueue_ingest_jobs)
        self.health = health.HealthServicer()
        self._serving = health_pb2.HealthCheckResponse.SERVING
        self._not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", v1.SERVICE_NAME):
            self.health.set(name, self._not_serving)
        self.server = grpc.server(
            cf.ThreadPoolExecutor(max_workers=config.grpc.max_workers,
                                  thread_name_prefix="forensics-grpc"),
            interceptors=[AuthInterceptor(self.auth, telemetry=self.telemetry)],
            options=grpc_options(config),
            maximum_concurrent_rpcs=config.grpc.max_concurrent_rpcs)
        v1.add_IncidentServiceServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (v1.SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), self.server)
        bind_port = config.grpc.port if port is None else port
        address = f"{config.grpc.host}:{bind_port}"
        creds = _credentials(config)
        try:
            self.port = (self.server.add_secure_port(address, creds) if creds is not None
                         else self.server.add_insecure_port(address))
        except RuntimeError as e:
            self.port = 0
            err: Exception | None = e
        else:
            err = None
        if not self.port:
            self.store.close()
            raise SidecarError(f"cannot listen on {address}: {err or 'address in use?'}; "
                               "choose another grpc.address port")
        self.address = f"{config.grpc.host}:{self.port}"
        self._started = False
        self._stopped = False

    def start(self) -> Sidecar:
        """Resume jobs, start serving, report SERVING."""
        self.jobs.start()
        self.server.start()
        for name in ("", v1.SERVICE_NAME):
            self.health.set(name, self._serving)
        self._started = True
        log.info("forensics sidecar serving on %s (data in %s)", self.address,
                 self.config.data_dir)
        return self

    def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, drain for ``grace`` s (default ``grpc.grace_s``), stop jobs, close."""
        if self._stopped:
            return
        self._stopped = True
        self.health.enter_graceful_shutdown()
        self.servicer.closing = True
        grace_s = self.config.grpc.grace_s if grace is None else grace
        log.info("health NOT_SERVING; refusing new uploads, draining RPCs for up to %.1f s",
                 grace_s)
        self.server.stop(grace_s).wait()
        self.servicer.guard.close()
        log.info("gRPC server stopped; stopping analysis jobs (%s)", self.jobs.counts())
        self.jobs.stop(timeout_s=grace_s)
        left = self.jobs.counts()
        if left.get("running"):
            log.info("%d job(s) left running are resumed at the next start", left["running"])
        self.store.close()
        log.info("store closed (%s)", self.config.data_dir)

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until the server stops (or ``timeout``); True when it stopped."""
        return bool(self.server.wait_for_termination(timeout))

    def stats(self) -> dict[str, Any]:
        """In-process counters: received, received_bytes, rejected and quarantined by reason,
        job counts."""
        c = self.counters
        return {"received": int(c.total(INCIDENTS_RECEIVED)),
                "received_bytes": int(c.total(INGEST_BYTES)),
                "rejected": {k: int(v) for k, v in c.totals(INGEST_REJECTED, "reason").items()},
                "quarantined": {k: int(v) for k, v in
                                c.totals(INCIDENTS_QUARANTINED, "reason").items()},
                "jobs": self.jobs.counts()}

    def __enter__(self) -> Sidecar:
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop(grace=1.0)


def create_server(config: SidecarConfig, *, port: int | None = 0,
                  telemetry: Telemetry | None = None,
                  kinds: Iterable[JobKind] | None = None) -> tuple[Sidecar, int]:
    """Build a :class:`Sidecar` bound to ``port`` (``0``: any free port; ``None``: the port of
    ``config.grpc.address``) with the job ``kinds`` (default: the built-in ones); returns it
    (not started) and the bound port."""
    sidecar = Sidecar(config, port=port, telemetry=telemetry, kinds=kinds)
    return sidecar, sidecar.port
