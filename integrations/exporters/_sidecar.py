"""The exporter that ships incidents to the sidecar over gRPC, with retry and a disk spool.

``export`` (called on the recorder's worker thread, never on the serving path) streams the
incident's Arrow bytes to ``forensics.v1.IncidentService/UploadIncident``: one header, chunks of
at most 1 MiB, a trailer with the sha256. The sidecar acknowledges only once the incident is
durable and indexed, and uploads are idempotent on the incident id, so re-sending is always safe.

Failures are classified by gRPC status:

* ``UNAVAILABLE`` (sidecar down / restarting): with a spool, the incident goes to the spool at
  once and ``export`` returns SUCCESS (durable locally); a background thread re-sends spooled
  incidents in order, with exponential backoff and full jitter, as long as it takes, deleting
  each file only after the ack. Without a spool: retried up to ``max_retries`` times.
* ``DEADLINE_EXCEEDED`` / ``RESOURCE_EXHAUSTED`` (sidecar busy or the incident over its caps),
  and ``UNKNOWN`` / ``INTERNAL`` / ``ABORTED`` (a stream torn down mid-upload):
  retried with backoff up to ``max_retries`` times, then spooled (the drain gives each spooled
  incident another ``max_retries`` attempts for these codes before dropping it, so one poison
  incident never blocks the spool).
* anything else (``INVALID_ARGUMENT``, ``DATA_LOSS``, ``ALREADY_EXISTS``, ``UNAUTHENTICATED``,
  ``PERMISSION_DENIED``, ...): never retried; dropped as ``export_failed`` with the reason logged.

A full spool drops the incident as ``spool_full``. Every drop is counted (``metrics`` — the
recorder's :class:`~integrations._metrics.RecorderMetrics` — and :meth:`SidecarExporter.stats`),
so captured = acknowledged + spooled-then-acknowledged + dropped-and-counted. The gRPC channel is
created on first use and again in a forked child (a channel never crosses ``fork``); the drain
thread is restarted in the child as well.

Example::

    from integrations import Recorder, exporters
    ex = exporters.SidecarExporter("127.0.0.1:7431", token="s3cret",
                                   spool_dir="/var/spool/forensics")
    rec = Recorder(model, exporter=ex)
    ...
    rec.force_flush(timeout_s=10)      # also waits for the spool to drain
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
import weakref
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from ._base import ExportResult
from ._drain import (
    _CHUNK,
    SpoolDrain,
    _fmt,
    _manifest_from_arrow,
    _Outcome,
    _request_traceparent,
)
from ._spool import DiskSpool, SpoolFullError

if TYPE_CHECKING:
    from .._metrics import RecorderMetrics
    from ..incident import Incident

__all__ = ["SidecarExporter", "TLSConfig"]

_log = logging.getLogger(__name__)



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


def _incident_bytes(incident: Any) -> bytes:
    """The exact Arrow IPC bytes of an incident (or raw bytes passed through)."""
    if isinstance(incident, (bytes, bytearray, memoryview)):
        return bytes(incident)
    for name in ("to_bytes", "tobytes"):
        fn = getattr(incident, name, None)
        if callable(fn):
            return bytes(fn())
    buf = getattr(incident, "buffer", None)
    if buf is not None:
        return bytes(memoryview(buf))
    raise TypeError(f"cannot serialise {type(incident).__name__} for upload: expected an "
                    "integrations.incident.Incident (with to_bytes()) or bytes")


_LIVE: weakref.WeakSet[SidecarExporter] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for ex in list(_LIVE):
        ex._reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class SidecarExporter(SpoolDrain):
    """Uploads incidents to the sidecar (``host:port``) with retry, backoff and a disk spool.

    Args:
        target: the sidecar's gRPC address.
        token: bearer token (sent as ``authorization: Bearer <token>``); maps to a tenant.
        tls: None (plaintext), a :class:`TLSConfig` (TLS / mTLS), a mapping with its fields,
            ``True`` (TLS with the system roots) or ready ``grpc.ChannelCredentials``.
        spool_dir: directory of the local disk spool (None = no spool). An existing spool is
            picked up and drained (a restarted serving process re-sends what was left).
        spool_max_bytes: the spool's byte bound; beyond it incidents are dropped (spool_full).
        deadline_s: deadline of one upload attempt.
        max_retries: retries of one incident for retryable codes (see the module docstring).
        backoff_initial_s / backoff_max_s: exponential backoff with full jitter:
            ``sleep = uniform(0, min(backoff_max_s, backoff_initial_s * 2**attempt))``.
        metrics: the recorder's metrics (``dropped(...)``, ``spool_bytes``); see
            :meth:`bind_metrics`.
    """

    def __init__(self, target: str = "127.0.0.1:7431", *, token: str | None = None,
                 tls: TLSConfig | Mapping[str, Any] | grpc.ChannelCredentials | bool | None = None,
                 spool_dir: str | os.PathLike[str] | None = None,
                 spool_max_bytes: int = 1 << 30, deadline_s: float = 30.0,
                 max_retries: int = 5, backoff_initial_s: float = 0.2,
                 backoff_max_s: float = 10.0, metrics: RecorderMetrics | None = None) -> None:
        if max_retries < 0 or deadline_s <= 0 or backoff_initial_s < 0 or backoff_max_s < 0:
            from ..errors import ConfigError

            raise ConfigError("SidecarExporter: deadline_s must be > 0 and max_retries, "
                              "backoff_initial_s, backoff_max_s >= 0")
        self.target = target
        self._token = token
        if isinstance(tls, Mapping):
            tls = TLSConfig(**tls)
        self._tls = tls
        self.deadline_s = float(deadline_s)
        self.max_retries = int(max_retries)
        self.backoff_initial_s = float(backoff_initial_s)
        self.backoff_max_s = float(backoff_max_s)
        self._metrics = metrics
        self._rng = random.Random()
        self._spool = (DiskSpool(spool_dir, max_bytes=spool_max_bytes)
                       if spool_dir is not None else None)
        self._init_runtime_state()
        self._stats: Counter[str] = Counter()
        self._drops: Counter[str] = Counter()
        self._closed = False
        _LIVE.add(self)
        self._update_spool_gauge()
        if self._spool is not None and not self._spool.is_empty():
            self._ensure_drain()  # pick up what a previous process left behind

    def _init_runtime_state(self) -> None:
        """Locks, channel and drain thread: per process (re-created after fork)."""
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._channel: grpc.Channel | None = None
        self._stub: Any = None
        self._pid = os.getpid()
        self._drain_thread: threading.Thread | None = None
        self._draining = False  # an entry is being sent right now

    def _reset_after_fork(self) -> None:
        # The parent's channel and threads do not exist here; its locks may be held forever.
        # Keep a reference to the old channel (closing it in the child could touch the
        # parent's sockets) and start over.
        old = getattr(self, "_channel", None)
        if old is not None:
            self._stale_channels = [*getattr(self, "_stale_channels", []), old]
        self._init_runtime_state()
        if self._spool is not None:
            self._spool.forget_drain_lock_after_fork()

    # ------------------------------------------------------------------ wiring
    def bind_metrics(self, metrics: RecorderMetrics) -> None:
        """Report drops and the spool size to ``metrics`` (the recorder calls this)."""
        self._metrics = metrics
        self._update_spool_gauge()

    @property
    def counts_own_drops(self) -> bool:
        """True when a FAILURE from :meth:`export` was already counted (with its reason) in the
        bound metrics, so the caller must not count it again."""
        return self._metrics is not None

    @property
    def spool(self) -> DiskSpool | None:
        return self._spool

    def stats(self) -> dict[str, Any]:
        """Tallies: acked (direct), spooled, drained (acked from the spool), retries,
        backoff_s (total slept), dropped by reason, spool bytes and entries."""
        with self._lock:
            out: dict[str, Any] = dict(self._stats)
            out["dropped"] = dict(self._drops)
        for k in ("acked", "spooled", "drained", "retries"):
            out.setdefault(k, 0)
        out.setdefault("backoff_s", 0.0)
        out["spool_bytes"] = 0 if self._spool is None else self._spool.nbytes
        out["spool_entries"] = 0 if self._spool is None else len(self._spool)
        return out

    def _count(self, key: str, n: float = 1) -> None:
        with self._lock:
            self._stats[key] += n  # type: ignore[assignment]

    def _drop(self, reason: str, incident_id: str, why: str) -> None:
        _log.warning("SidecarExporter: incident %s dropped (%s): %s", incident_id, reason, why)
        with self._lock:
            self._drops[reason] += 1
        if self._metrics is not None:
            self._metrics.dropped(reason)

    def _update_spool_gauge(self) -> None:
        if self._metrics is not None and self._spool is not None:
            self._metrics.spool_bytes.set(self._spool.nbytes)

    # ------------------------------------------------------------------ channel
    def _credentials(self) -> grpc.ChannelCredentials | None:
        tls = self._tls
        if tls is None or tls is False:
            return None
        if tls is True:
            return grpc.ssl_channel_credentials()
        if isinstance(tls, TLSConfig):
            return tls.credentials()
        return tls  # type: ignore[return-value]

    def _get_stub(self) -> Any:
        """The stub on this process's channel; created lazily, re-created after fork."""
        if os.getpid() != self._pid:  # forked without the at-fork hook (defensive)
            self._reset_after_fork()
        with self._lock:
            if self._stub is None:
                from sidecar.api.v1 import incidents_pb2_grpc

                ms = self.backoff_max_s * 1000
                options: list[tuple[str, Any]] = [
                    ("grpc.enable_retries", 0),  # retries are ours (classified, counted)
                    ("grpc.max_send_message_length", 4 * _CHUNK),
                    ("grpc.initial_reconnect_backoff_ms", max(100, int(
                        self.backoff_initial_s * 1000))),
                    ("grpc.min_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", max(100, int(ms))),
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
            return self._stub

    def _metadata(self) -> list[tuple[str, str]]:
        return [] if self._token is None else [("authorization", f"Bearer {self._token}")]

    # ------------------------------------------------------------------ upload
    # ------------------------------------------------------------------ export
    def export(self, incident: Incident) -> ExportResult:
        """Upload one incident (or spool it); SUCCESS = durable at the sidecar or in the spool."""
        incident_id = str(getattr(incident, "id", "") or "")
        if self._closed:
            self._drop("shutdown", incident_id, "export() after shutdown()")
            return ExportResult.FAILURE
        try:
            data = _incident_bytes(incident)
        except Exception as e:
            self._drop("export_failed", incident_id, f"cannot serialise: {e}")
            return ExportResult.FAILURE
        manifest = getattr(incident, "manifest", None)
        if not isinstance(manifest, Mapping):
            manifest = _manifest_from_arrow(data)
        if not incident_id and manifest is not None:
            incident_id = str(manifest.get("id", ""))
        traceparent = _request_traceparent(manifest)
        if self._spool is not None:
            self._ensure_drain()
            if not self._spool.is_empty():  # keep the order: behind what is already spooled
                return self._to_spool(incident_id, data)
        attempt = 0
        while True:
            res = self._upload_once(incident_id, data, traceparent)
            if res.outcome is _Outcome.ACKED:
                self._count("acked")
                return ExportResult.SUCCESS
            if res.outcome is _Outcome.REJECTED:
                self._drop("export_failed", incident_id,
                           f"sidecar rejected it: {_fmt(res)} (not retried)")
                return ExportResult.FAILURE
            if self._spool is not None and res.code == grpc.StatusCode.UNAVAILABLE:
                return self._to_spool(incident_id, data)  # the drain thread retries
            if attempt >= self.max_retries or self._closed:
                if self._spool is not None:
                    return self._to_spool(incident_id, data)
                self._drop("export_failed", incident_id,
                           f"{_fmt(res)} after {attempt + 1} attempts and no spool_dir")
                return ExportResult.FAILURE
            self._count("retries")
            if self._sleep(self._backoff(attempt)):
                attempt = self.max_retries  # stopping: one last decision, no more sleeping
            else:
                attempt += 1

    def _to_spool(self, incident_id: str, data: bytes) -> ExportResult:
        assert self._spool is not None
        try:
            self._spool.put(incident_id, data)
        except SpoolFullError as e:
            self._drop("spool_full", incident_id, str(e))
            return ExportResult.FAILURE
        except OSError as e:
            self._drop("export_failed", incident_id, f"cannot write the spool: {e}")
            return ExportResult.FAILURE
        self._count("spooled")
        self._update_spool_gauge()
        self._wake.set()
        return ExportResult.SUCCESS

    # ------------------------------------------------------------------ lifecycle
    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Flush the spool for up to ``timeout_s``, stop the drain thread, close the channel.

        What is still spooled stays on disk (durable) and is sent by the next exporter that
        opens the same ``spool_dir``. Idempotent; later ``export`` calls return FAILURE."""
        if self._closed:
            return
        flushed = self.force_flush(timeout_s)
        self._closed = True
        self._stop.set()
        self._wake.set()
        t = self._drain_thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=max(1.0, self.deadline_s))
        if not flushed and self._spool is not None:
            _log.warning("SidecarExporter: %d incident(s) left in the spool %s; they are sent "
                         "when an exporter opens that spool again", len(self._spool),
                         self._spool.directory)
        with self._lock:
            channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            with contextlib.suppress(Exception):
                channel.close()
