"""Prometheus metrics of the sidecar, and the HTTP ``/metrics`` endpoint that serves them.

All names start with ``forensics_``. Labels are bounded sets (rejection reasons, job states,
job kinds); incident ids, tenants and sites are never labels (they live in span attributes,
Arrow and DuckDB). The anomaly-score histogram carries the trace id as an exemplar, which only
the OpenMetrics exposition shows: the endpoint negotiates on ``Accept`` (a scraper sending
``application/openmetrics-text`` gets OpenMetrics, anyone else the classic text format).

Example::

    from prometheus_client import CollectorRegistry
    m = SidecarMetrics(registry=CollectorRegistry())
    m.received_total.inc()
    server = MetricsHTTPServer(m.registry, port=0)       # 127.0.0.1, a free port
    urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics").read()
    server.close()
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = [
    "ANOMALY_SCORE_BUCKETS",
    "FIX_SET_SIZE_BUCKETS",
    "JOB_DURATION_BUCKETS",
    "MetricsHTTPServer",
    "SidecarMetrics",
]

_log = logging.getLogger(__name__)

#: Incident-level anomaly scores are robust z-scores (unbounded; ~0 for benign traffic).
ANOMALY_SCORE_BUCKETS = (-2.0, -1.0, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0,
                         15.0, 20.0, 50.0, float("inf"))
#: Incident p-values against the benign baseline: the smallest is 1/(n+1) (n baseline
#: incidents, default up to 1000); 0.05 is the suggested alerting level.
ANOMALY_P_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, float("inf"))
#: Fix sets are small by construction (``max_fix_set_size`` defaults to 8).
FIX_SET_SIZE_BUCKETS = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 12.0, 16.0, 32.0, float("inf"))
#: From a stats job (ms) to a CCA search (the proposal's budget is 2 h).
JOB_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                        300.0, 600.0, 1800.0, 3600.0, 7200.0, float("inf"))


class SidecarMetrics:
    """The sidecar's Prometheus instruments, registered in ``registry`` (default: a new one).

    Instruments: ``incidents_received_total``, ``ingest_rejected_total{reason}``,
    ``ingest_bytes_total``, ``jobs{state}`` (gauge), ``jobs_finished_total{kind,state}``,
    ``job_duration_seconds{kind}``, ``anomaly_score`` and ``anomaly_p`` (exemplars),
    ``fix_set_size``.
    """

    def __init__(self, *, registry: CollectorRegistry | None = None,
                 namespace: str = "forensics", reject_reasons: tuple[str, ...] = (),
                 job_states: tuple[str, ...] = ()) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        ns = namespace
        self.received_total = Counter(
            "incidents_received", "Incidents made durable and indexed (idempotent retries "
            "not counted).", namespace=ns, registry=reg)
        self.rejected_total = Counter(
            "ingest_rejected", "Uploads and queries rejected, by reason.", ["reason"],
            namespace=ns, registry=reg)
        self.ingest_bytes_total = Counter(
            "ingest_bytes", "Bytes of incidents made durable.", namespace=ns, registry=reg)
        self.jobs = Gauge(
            "jobs", "Analysis jobs by state (pending = the analysis queue depth).", ["state"],
            namespace=ns, registry=reg)
        self.jobs_finished_total = Counter(
            "jobs_finished", "Job attempts that ended, by kind and state.", ["kind", "state"],
            namespace=ns, registry=reg)
        self.job_duration = Histogram(
            "job_duration_seconds", "Wall time of one analysis job attempt, by kind.", ["kind"],
            buckets=JOB_DURATION_BUCKETS, namespace=ns, registry=reg)
        self.anomaly_score = Histogram(
            "anomaly_score", "Incident-level anomaly scores (CF robust z); exemplar = trace id.",
            buckets=ANOMALY_SCORE_BUCKETS, namespace=ns, registry=reg)
        self.anomaly_p = Histogram(
            "anomaly_p", "Incident p-values against the model's benign baseline (CF); "
            "exemplar = trace id.", buckets=ANOMALY_P_BUCKETS, namespace=ns, registry=reg)
        self.fix_set_size = Histogram(
            "fix_set_size", "Size of minimal fix sets found by CCA.",
            buckets=FIX_SET_SIZE_BUCKETS, namespace=ns, registry=reg)
        self.reject_reasons = frozenset(reject_reasons)
        for reason in reject_reasons:  # export zeros, so rate() and alerts work from the start
            self.rejected_total.labels(reason=reason)
        for state in job_states:
            self.jobs.labels(state=state).set(0)

    def reason_label(self, reason: str) -> str:
        """``reason`` if it is a known rejection reason, else ``"other"`` (bounded labels)."""
        if not self.reject_reasons or reason in self.reject_reasons:
            return reason
        return "other"


class MetricsHTTPServer:
    """``/metrics`` over HTTP for ``registry`` (prometheus_client's server, on its own thread).

    ``port=0`` binds a free port (read it back from :attr:`port`). Content negotiation between
    the classic text format and OpenMetrics (needed for exemplars) is prometheus_client's.
    """

    def __init__(self, registry: CollectorRegistry, *, port: int = 9464,
                 addr: str = "127.0.0.1") -> None:
        self._httpd, self._thread = start_http_server(port, addr=addr, registry=registry)
        self.addr = addr
        self.port: int = int(self._httpd.server_port)

    @property
    def url(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port. Idempotent."""
        httpd: Any = self._httpd
        if httpd is None:
            return
        self._httpd = None  # type: ignore[assignment]
        try:
            httpd.shutdown()
            httpd.server_close()
        except Exception as e:  # never raise from telemetry
            _log.warning("telemetry: stopping the metrics server failed: %s", e)
        self._thread.join(timeout=5)
