"""One upload of an incident to the sidecar, and the gRPC channel it goes over.

:class:`UploadClient` owns the channel (plaintext, TLS or mTLS; created on first use, one per
process) and the bearer token. :meth:`UploadClient.attempt` streams
``forensics.v1.IncidentService/UploadIncident``: one header (with the request's traceparent so
the sidecar's ``ingest`` span links to the request trace, and the incident's content digest),
chunks of at most 1 MiB with their CRC32C, and a trailer with the whole stream's CRC32C (see
:mod:`._upload_stream`); the outcome is classified as acked, unreachable-retryable or rejected
(:data:`~integrations.exporters._retry.RETRYABLE`).

Example::

    client = UploadClient("127.0.0.1:7431", token="s3cret", tls=None, deadline_s=30.0,
                          reconnect_backoff_s=(0.2, 10.0))
    res = client.attempt("inc-1", data, traceparent)
    res.outcome is Outcome.ACKED
"""

from __future__ import annotations

import contextlib
import enum
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from ._retry import RETRYABLE
from ._upload_stream import manifest_from_arrow

__all__ = [
    "TLS",
    "Attempt",
    "Outcome",
    "TLSConfig",
    "UploadClient",
    "manifest_from_arrow",
    "request_traceparent",
]

_CHUNK = 1024 * 1024  # sidecar.api.v1.MAX_CHUNK_BYTES (kept literal: no import cost here)
_HEALTH_CHECK = "/grpc.health.v1.Health/Check"


def _raw(b: bytes) -> bytes:
    return b


@dataclass(frozen=True)
class TLSConfig:
    """TLS for the sidecar channel: server roots, and a client certificate + key for mTLS.

    Each field is PEM bytes or a path to a PEM file. ``server_name`` overrides the name checked
    against the server certificate (e.g. when dialling an IP address).

    Example::

        TLSConfig(root_certificates="ca.pem", certificate_chain="client.pem",
                  private_key="client.key", server_name="forensics-sidecar")
    """

    root_certificates: bytes | str | os.PathLike[str] | None = None
    certificate_chain: bytes | str | os.PathLike[str] | None = None
    private_key: bytes | str | os.PathLike[str] | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.certificate_chain is None) != (self.private_key is None):
            from ..errors import ConfigError

            raise ConfigError("TLSConfig: mTLS needs both certificate_chain and private_key")
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.root_certificates),
            private_key=_pem(self.private_key),
            certificate_chain=_pem(self.certificate_chain))


def _pem(v: bytes | str | os.PathLike[str] | None) -> bytes | None:
    if v is None or isinstance(v, bytes):
        return v
    return Path(v).read_bytes()


class Outcome(enum.Enum):
    ACKED = "acked"
    UNREACHABLE = "unreachable"  # retryable code still failing: spool (or drop without spool)
    REJECTED = "rejected"        # non-retryable: drop


@dataclass
class Attempt:
    """The classified result of one upload attempt."""

    outcome: Outcome
    code: grpc.StatusCode | None = None
    detail: str = ""

    def __str__(self) -> str:
        name = self.code.name if self.code is not None else "error"
        return f"{name}: {self.detail}" if self.detail else name


def request_traceparent(manifest: Mapping[str, Any] | None) -> str:
    """The request's W3C traceparent from a manifest ("" when absent)."""
    req = (manifest or {}).get("request")
    tp = req.get("traceparent") if isinstance(req, Mapping) else None
    return tp if isinstance(tp, str) else ""


#: What ``tls=`` may be once a mapping was turned into a :class:`TLSConfig`.
TLS = TLSConfig | grpc.ChannelCredentials | bool | None


class UploadClient:
    """The gRPC client of one process: a lazily created channel and the upload call.

    ``reconnect_backoff_s`` is ``(initial, max)`` for gRPC's own reconnect backoff. A client
    never crosses ``fork``: the exporter makes a new one in the child (see ``SidecarExporter``).
    """

    def __init__(self, target: str, *, token: str | None, tls: TLS, deadline_s: float,
                 reconnect_backoff_s: tuple[float, float]) -> None:
        self.target = target
        self._token = token
        self._tls = tls
        self._deadline_s = deadline_s
        self._reconnect = reconnect_backoff_s
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._stub: Any = None

    def _credentials(self) -> grpc.ChannelCredentials | None:
        tls = self._tls
        if tls is None or isinstance(tls, bool):
            return grpc.ssl_channel_credentials() if tls else None  # True: the system roots
        if isinstance(tls, TLSConfig):
            return tls.credentials()
        return tls

    def _get_stub(self) -> Any:
        return self._connect()[1]

    def _connect(self) -> tuple[grpc.Channel, Any]:
        """The channel and the IncidentService stub, created on first use."""
        with self._lock:
            if self._stub is None or self._channel is None:
                from sidecar.api.v1 import incidents_pb2_grpc

                initial, most = self._reconnect
                options: list[tuple[str, Any]] = [
                    ("grpc.enable_retries", 0),  # retries are ours (classified, counted)
                    ("grpc.max_send_message_length", 4 * _CHUNK),
                    ("grpc.initial_reconnect_backoff_ms", max(100, int(initial * 1000))),
                    ("grpc.min_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", max(100, int(most * 1000))),
                    ("grpc.keepalive_time_ms", 30_000),
                ]
                creds = self._credentials()
                if creds is None:
                    channel = grpc.insecure_channel(self.target, options=options)
                else:
                    if isinstance(self._tls, TLSConfig) and self._tls.server_name:
                        options.append(("grpc.ssl_target_name_override", self._tls.server_name))
                    channel = grpc.secure_channel(self.target, creds, options=options)
                self._channel = channel
                self._stub = incidents_pb2_grpc.IncidentServiceStub(channel)
            return self._channel, self._stub

    def _metadata(self) -> list[tuple[str, str]]:
        return [] if self._token is None else [("authorization", f"Bearer {self._token}")]

    def attempt(self, incident_id: str, data: bytes, traceparent: str = "",
                deadline_s: float | None = None) -> Attempt:
        """One UploadIncident call, classified (never raises). ``deadline_s`` overrides the
        client's deadline for this call (the exporter's short inline attempt)."""
        from ._upload_stream import UploadStream

        parts = UploadStream(incident_id, data, traceparent=traceparent)
        try:
            timeout = self._deadline_s if deadline_s is None else deadline_s
            resp = self._get_stub().UploadIncident(iter(parts), timeout=timeout,
                                                   metadata=self._metadata())
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
            detail = (e.details() if hasattr(e, "details") else str(e)) or ""
            kind = Outcome.UNREACHABLE if code in RETRYABLE else Outcome.REJECTED
            return Attempt(kind, code, detail)
        except Exception as e:  # bad credentials file, ...: not something retrying fixes
            return Attempt(Outcome.REJECTED, None, f"{type(e).__name__}: {e}")
        if resp.HasField("crc32c") and resp.crc32c != parts.crc32c:
            return Attempt(Outcome.REJECTED, grpc.StatusCode.DATA_LOSS,
                           f"sidecar acknowledged CRC32C {resp.crc32c:#010x}, sent "
                           f"{parts.crc32c:#010x}")
        if parts.sha256 and resp.sha256 and resp.sha256 != parts.sha256:
            return Attempt(Outcome.REJECTED, grpc.StatusCode.DATA_LOSS,
                           f"sidecar acknowledged sha256 {resp.sha256}, sent {parts.sha256}")
        return Attempt(Outcome.ACKED)

    def responsive(self, timeout_s: float) -> bool:
        """Whether the sidecar process answers at all: a ``grpc.health.v1`` check within
        ``timeout_s``. Any answer (SERVING, NOT_SERVING, even UNIMPLEMENTED) is True; a
        deadline or an unreachable sidecar is False. Tells a hung or unreachable sidecar (an
        upload timed out because nothing answers) from one that answers but cannot take this
        incident. Sent as raw bytes: the middleware does not need grpcio-health-checking (an
        empty ``HealthCheckRequest`` serialises to no bytes)."""
        try:
            channel, _ = self._connect()
            check = channel.unary_unary(_HEALTH_CHECK, request_serializer=_raw,
                                        response_deserializer=_raw)
            check(b"", timeout=timeout_s)
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
            return code not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
        except Exception:
            return False
        return True

    def close(self) -> None:
        """Close the channel (idempotent); a later :meth:`attempt` opens a new one."""
        with self._lock:
            channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            with contextlib.suppress(Exception):
                channel.close()
