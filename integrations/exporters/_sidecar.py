"""The exporter that ships incidents to the sidecar over gRPC, with retry and a disk spool.

``export`` (called on the recorder's worker thread, never on the serving path) streams the
incident's Arrow bytes to ``forensics.v1.IncidentService/UploadIncident``: one header, chunks of
at most 1 MiB, a trailer with the sha256. The sidecar acknowledges only once the incident is
durable and indexed, and uploads are idempotent on the incident id, so re-sending is always safe.

With a spool, the export worker makes **one** attempt per incident, under a short inline
deadline (``inline_deadline_s`` plus 1 s per 32 MiB, at most ``deadline_s``), so a hung sidecar
(process stopped, handlers stuck: the connection stays up and nothing answers) holds the single
export worker for about a second, not ``deadline_s`` times ``max_retries`` while the recorder's
bounded queue overflows. Failures are classified by gRPC status:

* retryable (``UNAVAILABLE``: down / restarting; ``DEADLINE_EXCEEDED``: hung or slow;
  ``RESOURCE_EXHAUSTED``: busy or over its caps; ``UNKNOWN`` / ``INTERNAL`` / ``ABORTED``: a
  stream torn down mid-upload): with a spool, the incident goes to the spool at once and
  ``export`` returns SUCCESS (durable locally); while the spool holds anything, later incidents
  go behind it without an attempt (order is kept, the worker never waits on the network). The
  drain thread re-sends spooled incidents in order with the full ``deadline_s``, exponential
  backoff and full jitter, deleting each file only after the ack: as long as it takes while the
  sidecar does not answer a health check (down or hung), and ``max_retries`` times for an entry
  the answering sidecar keeps failing (then dropped and counted, so one poison incident never
  blocks the spool). Without a spool: retried inline up to ``max_retries`` times, then dropped.
* anything else (``INVALID_ARGUMENT``, ``DATA_LOSS``, ``ALREADY_EXISTS``, ``UNAUTHENTICATED``,
  ``PERMISSION_DENIED``, ...): never retried; dropped as ``export_failed`` with the reason logged.

``shutdown(timeout_s)`` is bounded: it waits up to ``timeout_s`` for the spool to drain, then
cancels an upload still in flight (a hung sidecar) instead of waiting up to ``deadline_s``; the
cancelled entry and everything else unsent stay in the spool on disk for the next exporter.
``deadline_s`` and ``inline_deadline_s`` default to the ``exporter:`` section of the
middleware's YAML config (``integrations.config``). A full spool drops the incident as ``spool_full``. Every drop is counted (``metrics`` — the
recorder's :class:`~integrations._metrics.RecorderMetrics` — and :meth:`SidecarExporter.stats`),
so captured = acknowledged + spooled-then-acknowledged + dropped-and-counted. The gRPC channel is
created on first use and again in a forked child (a channel never crosses ``fork``); the drain
thread is restarted in the child as well.

Parts, one concept each: :class:`~integrations.exporters._upload.UploadClient` (the channel and
one upload attempt), :class:`~integrations.exporters._retry.Backoff` (the retry policy),
:class:`~integrations.exporters._drain.SpoolDrainer` (owned by the exporter when it has a spool:
re-sends spooled incidents in order) and :class:`~integrations.exporters._tally.ExportTally`
(the accounting both paths report to).

Example::

    from integrations import Recorder, exporters
    ex = exporters.SidecarExporter("127.0.0.1:7431", token="s3cret",
                                   spool_dir="/var/spool/forensics")
    rec = Recorder(model, exporter=ex)
    ...
    rec.force_flush(timeout_s=10)      # also waits for the spool to drain
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import grpc

from ._base import ExportResult
from ._drain import SpoolDrainer
from ._retry import Backoff
from ._spool import DiskSpool, SpoolFullError
from ._tally import ExportTally
from ._upload import (
    TLS,
    Attempt,
    Outcome,
    TLSConfig,
    UploadClient,
    manifest_from_arrow,
    request_traceparent,
)

if TYPE_CHECKING:
    from .._metrics import RecorderMetrics
    from ..config import ForensicsConfig
    from ..incident import Incident

__all__ = ["SidecarExporter"]

_log = logging.getLogger(__name__)
#: The inline attempt's deadline grows by 1 s per this many bytes (a large incident is not a hang).
_INLINE_BYTES_PER_S = 32 << 20
#: Deadline of the drain's health check after an upload timed out (hung, or this incident?).
_PROBE_S = 1.0
#: How long ``shutdown`` waits for the drain thread once its upload in flight was cancelled.
_CANCEL_GRACE_S = 1.0


def _timing(config: ForensicsConfig | str | os.PathLike[str] | None, deadline_s: float | None,
            inline_deadline_s: float | None) -> tuple[float, float]:
    """(deadline_s, inline_deadline_s): the arguments, else the ``exporter:`` section of
    ``config`` (a ForensicsConfig, a YAML path, or None: ``$FORENSICS_CONFIG``, the environment
    and the embedded defaults — :func:`integrations.config.load_config`)."""
    if config is None and deadline_s is not None and inline_deadline_s is not None:
        return deadline_s, inline_deadline_s
    from ..config import ForensicsConfig, load_config

    cfg = config if isinstance(config, ForensicsConfig) else load_config(config)
    return (cfg.exporter.deadline_s if deadline_s is None else deadline_s,
            cfg.exporter.inline_deadline_s if inline_deadline_s is None else inline_deadline_s)


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


class SidecarExporter:
    """Uploads incidents to the sidecar (``host:port``) with retry, backoff and a disk spool.

    Args:
        target: the sidecar's gRPC address.
        token: bearer token (sent as ``authorization: Bearer <token>``); maps to a tenant.
        tls: None (plaintext), a :class:`TLSConfig` (TLS / mTLS), a mapping with its fields,
            ``True`` (TLS with the system roots) or ready ``grpc.ChannelCredentials``.
        spool_dir: directory of the local disk spool (None = no spool). An existing spool is
            picked up and drained (a restarted serving process re-sends what was left).
        spool_max_bytes: the spool's byte bound; beyond it incidents are dropped (spool_full).
        deadline_s: deadline of one upload attempt (the drain's; without a spool, every one);
            None: ``exporter.deadline_s`` of ``config`` (30 s).
        inline_deadline_s: with a spool, the deadline of the export worker's one attempt, plus
            1 s per 32 MiB of incident (at most ``deadline_s``); on a timeout the incident is
            spooled and the drain sends it with ``deadline_s``. None:
            ``exporter.inline_deadline_s`` of ``config`` (1 s).
        max_retries: retries of one incident for retryable codes (see the module docstring).
        backoff_initial_s / backoff_max_s: exponential backoff with full jitter:
            ``sleep = uniform(0, min(backoff_max_s, backoff_initial_s * 2**attempt))``.
        metrics: the recorder's metrics (``dropped(...)``, ``spool_bytes``); see
            :meth:`bind_metrics`.
        config: the middleware's configuration (a ``ForensicsConfig`` or a YAML path, as for
            ``Recorder``; None: ``$FORENSICS_CONFIG``, the environment, the defaults) for the
            timing options left None.
    """

    def __init__(self, target: str = "127.0.0.1:7431", *, token: str | None = None,
                 tls: TLSConfig | Mapping[str, Any] | grpc.ChannelCredentials | bool | None = None,
                 spool_dir: str | os.PathLike[str] | None = None,
                 spool_max_bytes: int = 1 << 30, deadline_s: float | None = None,
                 inline_deadline_s: float | None = None, max_retries: int = 5,
                 backoff_initial_s: float = 0.2, backoff_max_s: float = 10.0,
                 metrics: RecorderMetrics | None = None,
                 config: ForensicsConfig | str | os.PathLike[str] | None = None) -> None:
        deadline_s, inline_deadline_s = _timing(config, deadline_s, inline_deadline_s)
        if (max_retries < 0 or deadline_s <= 0 or inline_deadline_s <= 0
                or backoff_initial_s < 0 or backoff_max_s < 0):
            from ..errors import ConfigError

            raise ConfigError("SidecarExporter: deadline_s and inline_deadline_s must be > 0 "
                              "and max_retries, backoff_initial_s, backoff_max_s >= 0")
        self.target = target
        self.deadline_s = float(deadline_s)
        self.inline_deadline_s = float(inline_deadline_s)
        self.max_retries = int(max_retries)
        self._token = token
        self._tls: TLS = TLSConfig(**tls) if isinstance(tls, Mapping) else tls
        self._spool = (DiskSpool(spool_dir, max_bytes=spool_max_bytes)
                       if spool_dir is not None else None)
        self._tally = ExportTally(spool=self._spool, metrics=metrics)
        self._backoff = Backoff(initial_s=float(backoff_initial_s), max_s=float(backoff_max_s),
                                on_sleep=lambda s: self._tally.count("backoff_s", s))
        self._stale_clients: list[UploadClient] = []
        self._closed = False
        self._start_process()
        _LIVE.add(self)
        self._tally.update_spool_gauge()
        if self._drainer is not None and not self._spool_empty():
            self._drainer.start()  # pick up what a previous process left behind

    # ------------------------------------------------------------ per process
    def _start_process(self) -> None:
        """The channel, the stop event and the drainer: one set per process."""
        self._pid = os.getpid()
        self._stop = threading.Event()
        self._client = UploadClient(
            self.target, token=self._token, tls=self._tls, deadline_s=self.deadline_s,
            reconnect_backoff_s=(self._backoff.initial_s, self._backoff.max_s))
        self._drainer = None if self._spool is None else SpoolDrainer(
            self._spool, upload=self._client.attempt, backoff=self._backoff,
            tally=self._tally, max_retries=self.max_retries,
            responsive=lambda: self._client.responsive(min(self.deadline_s, _PROBE_S)))

    def _reset_after_fork(self) -> None:
        # The parent's channel and threads do not exist here; its locks may be held forever.
        # Keep the old client (closing its channel in the child could touch the parent's
        # sockets) and start over.
        self._stale_clients.append(self._client)
        self._tally.after_fork()
        if self._spool is not None:
            self._spool.forget_drain_lock_after_fork()
        self._start_process()

    def _check_fork(self) -> None:
        if os.getpid() != self._pid:  # forked without the at-fork hook (defensive)
            self._reset_after_fork()

    def _spool_empty(self) -> bool:
        return self._spool is None or self._spool.is_empty()

    # ------------------------------------------------------------------ wiring
    def bind_metrics(self, metrics: RecorderMetrics) -> None:
        """Report drops and the spool size to ``metrics`` (the recorder calls this)."""
        self._tally.bind(metrics)

    @property
    def counts_own_drops(self) -> bool:
        """True when a FAILURE from :meth:`export` was already counted (with its reason) in the
        bound metrics, so the caller must not count it again."""
        return self._tally.counts_own_drops

    @property
    def spool(self) -> DiskSpool | None:
        return self._spool

    def stats(self) -> dict[str, Any]:
        """Tallies: acked (direct), spooled, drained (acked from the spool), retries,
        backoff_s (total slept), dropped by reason, spool bytes and entries."""
        return self._tally.stats()

    # ------------------------------------------------------------------ export
    def export(self, incident: Incident) -> ExportResult:
        """Upload one incident (or spool it); SUCCESS = durable at the sidecar or in the spool."""
        incident_id = str(getattr(incident, "id", "") or "")
        if self._closed:
            self._tally.drop("shutdown", incident_id, "export() after shutdown()")
            return ExportResult.FAILURE
        try:
            data = _incident_bytes(incident)
        except Exception as e:
            self._tally.drop("export_failed", incident_id, f"cannot serialise: {e}")
            return ExportResult.FAILURE
        manifest = getattr(incident, "manifest", None)
        if not isinstance(manifest, Mapping):
            manifest = manifest_from_arrow(data)
        if not incident_id and manifest is not None:
            incident_id = str(manifest.get("id", ""))
        self._check_fork()
        if self._drainer is not None:
            self._drainer.start()
            if not self._spool_empty():  # keep the order: behind what is already spooled
                return self._to_spool(incident_id, data)
        return self._send(incident_id, data, request_traceparent(manifest))

    def _send(self, incident_id: str, data: bytes, traceparent: str) -> ExportResult:
        """With a spool: one attempt under the inline deadline, the spool for anything
        transient. Without: retries inline (see the module doc)."""
        if self._spool is None:
            return self._send_retrying(incident_id, data, traceparent)
        inline_s = min(self.deadline_s, self.inline_deadline_s + len(data) / _INLINE_BYTES_PER_S)
        res = self._client.attempt(incident_id, data, traceparent, deadline_s=inline_s)
        if res.code == grpc.StatusCode.CANCELLED and self._stop.is_set():
            return self._to_spool(incident_id, data)  # cut short by shutdown: kept for later
        settled = self._settle(incident_id, res)
        if settled is not None:
            return settled
        return self._to_spool(incident_id, data)  # the drain thread re-sends it

    def _send_retrying(self, incident_id: str, data: bytes, traceparent: str) -> ExportResult:
        """No spool: retry retryable codes up to ``max_retries`` times, then drop."""
        attempt = 0
        while True:
            res = self._client.attempt(incident_id, data, traceparent)
            settled = self._settle(incident_id, res)
            if settled is not None:
                return settled
            if attempt >= self.max_retries or self._closed:
                self._tally.drop("export_failed", incident_id,
                                 f"{res} after {attempt + 1} attempts and no spool_dir")
                return ExportResult.FAILURE
            self._tally.count("retries")
            if self._backoff.sleep(attempt, self._stop):
                attempt = self.max_retries  # stopping: one last decision, no more sleeping
            else:
                attempt += 1

    def _settle(self, incident_id: str, res: Attempt) -> ExportResult | None:
        """Count an acked or rejected attempt; None for a retryable one."""
        if res.outcome is Outcome.ACKED:
            self._tally.count("acked")
            return ExportResult.SUCCESS
        if res.outcome is Outcome.REJECTED:
            self._tally.drop("export_failed", incident_id,
                             f"sidecar rejected it: {res} (not retried)")
            return ExportResult.FAILURE
        return None

    def _to_spool(self, incident_id: str, data: bytes) -> ExportResult:
        assert self._spool is not None and self._drainer is not None
        try:
            self._spool.put(incident_id, data)
        except SpoolFullError as e:
            self._tally.drop("spool_full", incident_id, str(e))
            return ExportResult.FAILURE
        except OSError as e:
            self._tally.drop("export_failed", incident_id, f"cannot write the spool: {e}")
            return ExportResult.FAILURE
        self._tally.count("spooled")
        self._tally.update_spool_gauge()
        self._drainer.wake()
        return ExportResult.SUCCESS

    # ------------------------------------------------------------------ lifecycle
    def force_flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until the spool is empty (everything acknowledged or dropped); False on timeout.

        ``export`` itself is synchronous, so nothing else is ever in flight."""
        if self._drainer is None or self._closed:
            return self._spool_empty()
        self._check_fork()
        return self._drainer.wait_empty(timeout_s)

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Flush the spool for up to ``timeout_s``, stop the drain thread, close the channel.

        Bounded: returns within ``timeout_s`` plus at most about a second — an upload still in
        flight (a hung sidecar) is cancelled, never waited for up to ``deadline_s``. Nothing
        acknowledged is lost: what is still spooled, including the cancelled upload's entry,
        stays on disk and is sent by the next exporter that opens the same ``spool_dir``.
        Idempotent; later ``export`` calls return FAILURE."""
        if self._closed:
            return
        flushed = self.force_flush(timeout_s)
        self._closed = True
        self._stop.set()
        if self._drainer is not None:
            self._drainer.stop(join_timeout_s=0.0)   # no new attempt starts
            self._client.close()                     # cancels the one in flight
            self._drainer.stop(join_timeout_s=_CANCEL_GRACE_S)
        if not flushed and self._spool is not None:
            _log.warning("SidecarExporter: %d incident(s) left in the spool %s; they are sent "
                         "when an exporter opens that spool again", len(self._spool),
                         self._spool.directory)
        self._client.close()
