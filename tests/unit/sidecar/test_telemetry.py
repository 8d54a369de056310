"""sidecar.telemetry: linked-trace spans (OTel in-memory exporter) and a real /metrics scrape."""

from __future__ import annotations

import urllib.request

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client import CollectorRegistry

from sidecar._ingest import INCIDENTS_RECEIVED, INGEST_BYTES
from sidecar._observer import Telemetry, as_telemetry, counter
from sidecar._reject import INGEST_REJECTED, REJECT_REASONS
from sidecar.jobs import JOB_STATES
from sidecar.jobs._cca import FIX_SET_SIZE
from sidecar.jobs._cf import ANOMALY_P, ANOMALY_SCORE
from sidecar.jobs._runner import JOB_DURATION, JOBS, JOBS_FINISHED
from sidecar.telemetry import (
    MetricsHTTPServer,
    SidecarMetrics,
    SidecarTelemetry,
    Tracing,
    make_otlp_exporter,
    parse_traceparent,
    sidecar_metrics,
)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{SPAN_ID}-01"


@pytest.fixture
def tel():
    mem = InMemorySpanExporter()
    with SidecarTelemetry(registry=CollectorRegistry(), span_exporter=mem) as t:
        t.mem = mem  # type: ignore[attr-defined]
        yield t


def _value(reg: CollectorRegistry, name: str, labels: dict[str, str] | None = None) -> float:
    v = reg.get_sample_value(name, labels or {})
    assert v is not None, f"{name}{labels} not exported"
    return v


def test_implements_the_core_hook_protocol(tel):
    assert isinstance(tel, Telemetry)
    assert as_telemetry(tel) is tel


def test_parse_traceparent_uses_w3c_rules():
    sc = parse_traceparent(TRACEPARENT)
    assert sc is not None and sc.is_remote
    assert format(sc.trace_id, "032x") == TRACE_ID and format(sc.span_id, "016x") == SPAN_ID
    assert parse_traceparent(None) is None
    assert parse_traceparent("garbage") is None
    assert parse_traceparent(f"00-{'0' * 32}-{SPAN_ID}-01") is None  # all-zero trace id


def test_ingest_and_index_are_a_new_trace_linked_to_the_request(tel):
    with tel.span("ingest", traceparent=TRACEPARENT,
                  attributes={"forensics.incident.id": "inc-1", "forensics.tenant": "acme",
                              "forensics.incident.bytes": 1234,
                              "forensics.sites": ["blocks.0.mlp", "blocks.1.mlp"],
                              "forensics.none": None}) as sp:
        sp.set_attribute("forensics.n_sites", 2)
        with tel.span("index", attributes={"forensics.incident.id": "inc-1"}):
            pass
    spans = {s.name: s for s in tel.mem.get_finished_spans()}
    ingest, index = spans["ingest"], spans["index"]
    # A NEW trace (not the request's), rooted at ingest; index is its child.
    assert ingest.parent is None
    assert format(ingest.context.trace_id, "032x") != TRACE_ID
    assert index.parent is not None and index.parent.span_id == ingest.context.span_id
    assert index.context.trace_id == ingest.context.trace_id
    # ... linked to the request's span.
    (link,) = ingest.links
    assert format(link.context.trace_id, "032x") == TRACE_ID
    assert format(link.context.span_id, "016x") == SPAN_ID
    assert ingest.attributes["forensics.incident.id"] == "inc-1"
    assert ingest.attributes["forensics.tenant"] == "acme"
    assert ingest.attributes["forensics.incident.bytes"] == 1234
    assert tuple(ingest.attributes["forensics.sites"]) == ("blocks.0.mlp", "blocks.1.mlp")
    assert ingest.attributes["forensics.n_sites"] == 2
    assert "forensics.none" not in ingest.attributes


def test_each_job_is_its_own_trace_linked_to_the_request(tel):
    for kind in ("cf", "cca"):
        with tel.span(f"job.{kind}", traceparent=TRACEPARENT, attributes={"forensics.job": kind}):
            pass
    cf, cca = tel.mem.get_finished_spans()
    assert (cf.name, cca.name) == ("job.cf", "job.cca")
    assert cf.parent is None and cca.parent is None
    assert cf.context.trace_id != cca.context.trace_id
    for s in (cf, cca):
        assert format(s.links[0].context.trace_id, "032x") == TRACE_ID


def test_bad_or_missing_traceparent_gives_an_unlinked_span_not_an_error(tel):
    with tel.span("ingest", traceparent="00-nothex-nothex-01"):
        pass
    with tel.span("ingest"):
        pass
    bad, none = tel.mem.get_finished_spans()
    assert not bad.links and bad.attributes["forensics.traceparent_invalid"] == "00-nothex-nothex-01"
    assert not none.links


def test_exception_in_span_propagates_and_marks_the_span(tel):
    with pytest.raises(RuntimeError, match="disk full"), tel.span("index"):
        raise RuntimeError("disk full")
    (s,) = tel.mem.get_finished_spans()
    assert s.status.status_code is StatusCode.ERROR
    assert any(e.name == "exception" for e in s.events)


def _received(tel, nbytes: int) -> None:
    tel.observe(INCIDENTS_RECEIVED)
    tel.observe(INGEST_BYTES, nbytes)


def _finished(tel, kind: str, state: str, seconds: float) -> None:
    tel.observe(JOB_DURATION, seconds, labels={"kind": kind})
    tel.observe(JOBS_FINISHED, labels={"kind": kind, "state": state})


def test_counters_gauges_histograms(tel):
    reg = tel.registry
    _received(tel, 1000)
    _received(tel, 24)
    tel.observe(INGEST_REJECTED, labels={"reason": "sha256_mismatch"})
    tel.observe(INGEST_REJECTED, labels={"reason": "sha256_mismatch"})
    # unknown reasons collapse to "other" (bounded labels)
    tel.observe(INGEST_REJECTED, labels={"reason": "something-new"})
    tel.observe(JOBS, 3, labels={"state": "pending"})
    tel.observe(JOBS, 1, labels={"state": "running"})
    _finished(tel, "cf", "done", 0.25)
    _finished(tel, "cf", "failed", 3.0)
    tel.observe(FIX_SET_SIZE, 2)
    assert _value(reg, "forensics_incidents_received_total") == 2
    assert _value(reg, "forensics_ingest_bytes_total") == 1024
    assert _value(reg, "forensics_ingest_rejected_total", {"reason": "sha256_mismatch"}) == 2
    assert _value(reg, "forensics_ingest_rejected_total", {"reason": "other"}) == 1
    for reason in REJECT_REASONS:  # pre-created at zero so rate() works from the start
        assert reg.get_sample_value("forensics_ingest_rejected_total", {"reason": reason}) is not None
    assert _value(reg, "forensics_jobs", {"state": "pending"}) == 3
    assert _value(reg, "forensics_jobs", {"state": "running"}) == 1
    for state in set(JOB_STATES) - {"pending", "running"}:
        assert _value(reg, "forensics_jobs", {"state": state}) == 0
    assert _value(reg, "forensics_job_duration_seconds_count", {"kind": "cf"}) == 2
    assert _value(reg, "forensics_job_duration_seconds_sum", {"kind": "cf"}) == 3.25
    assert _value(reg, "forensics_jobs_finished_total", {"kind": "cf", "state": "failed"}) == 1
    assert _value(reg, "forensics_fix_set_size_bucket", {"le": "2.0"}) == 1
    assert _value(reg, "forensics_fix_set_size_bucket", {"le": "1.0"}) == 0


def _scrape(url: str, accept: str | None) -> tuple[str, str]:
    req = urllib.request.Request(url)
    if accept:
        req.add_header("Accept", accept)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.headers["Content-Type"], resp.read().decode()


def test_metrics_endpoint_negotiates_openmetrics_with_trace_exemplars(tel):
    tel.http = MetricsHTTPServer(tel.registry, port=0)
    with tel.span("job.cf", traceparent=TRACEPARENT):
        tel.observe(ANOMALY_SCORE, 4.2, traceparent=TRACEPARENT)  # exemplar: the request's trace
        tel.observe(ANOMALY_P, 0.004, traceparent=TRACEPARENT)
    with tel.span("job.cf"):
        job_trace = Tracing.current_trace_id()
        tel.observe(ANOMALY_SCORE, 0.3)  # no request trace: the sidecar's own trace
    tel.observe(ANOMALY_SCORE, 1.2)      # no trace at all: no exemplar
    _received(tel, 10)
    assert tel.metrics_url is not None and tel.metrics_url.endswith("/metrics")

    ctype, om = _scrape(tel.metrics_url, "application/openmetrics-text; version=1.0.0")
    assert ctype.startswith("application/openmetrics-text")
    assert om.rstrip().endswith("# EOF")
    for name in ("forensics_incidents_received_total", "forensics_ingest_rejected_total",
                 "forensics_ingest_bytes_total", "forensics_jobs", "forensics_job_duration_seconds",
                 "forensics_anomaly_score", "forensics_anomaly_p", "forensics_fix_set_size"):
        assert f"# TYPE {name.removesuffix('_total')} " in om, name
    # cumulative buckets: 0.3 -> le=0.5 (1), 1.2 -> le=1.5 (2), 4.2 -> le=5.0 (3)
    assert f'forensics_anomaly_score_bucket{{le="5.0"}} 3.0 # {{trace_id="{TRACE_ID}"}} 4.2 ' in om
    assert f'forensics_anomaly_score_bucket{{le="0.5"}} 1.0 # {{trace_id="{job_trace}"}} 0.3 ' in om
    assert 'forensics_anomaly_score_bucket{le="1.5"} 2.0\n' in om
    assert f'forensics_anomaly_p_bucket{{le="0.005"}} 1.0 # {{trace_id="{TRACE_ID}"}} 0.004 ' in om
    assert job_trace != TRACE_ID

    ctype, text = _scrape(tel.metrics_url, None)  # classic Prometheus text: no exemplars
    assert ctype.startswith("text/plain")
    assert "forensics_incidents_received_total 1.0" in text
    assert "trace_id" not in text


def test_a_metric_declared_elsewhere_is_created_on_first_use(tel):
    """A kind's own metric (not in the sidecar's catalogue) needs no registration anywhere."""
    mine = counter("custom_things", "Things a custom job kind counted.", labels=("kind",))
    assert mine.name not in {m.name for m in sidecar_metrics()}
    tel.observe(mine, 2, labels={"kind": "x"})
    tel.observe(mine, -5, labels={"kind": "x"})   # counters never go down
    assert _value(tel.registry, "forensics_custom_things_total", {"kind": "x"}) == 2


def test_every_declared_metric_is_exported_from_the_start():
    reg = CollectorRegistry()
    metrics = SidecarMetrics(registry=reg)
    assert set(metrics.instruments) == {m.name for m in sidecar_metrics()}
    families = {fam.name for fam in reg.collect()}
    assert families == {f"forensics_{m.name}" for m in sidecar_metrics()}


def test_a_sidecar_exports_every_job_outcome_at_zero_before_any_job(tmp_path):
    """Alerts take increase() of forensics_jobs_finished_total{kind,state}: a series born at 1
    by the first failure reads as no increase, so every series must exist from the start."""
    from sidecar._config import SidecarConfig
    from sidecar._server import create_server
    from sidecar.jobs import builtin_kinds
    from sidecar.jobs._runner import ATTEMPT_END_STATES

    cfg = SidecarConfig.defaults(data_dir=str(tmp_path / "data"))
    with SidecarTelemetry(registry=CollectorRegistry(), metrics_port=0) as t:
        sc, _ = create_server(cfg, port=0, telemetry=t)
        with sc:
            assert t.metrics_url is not None
            _, body = _scrape(t.metrics_url, None)
    for kind in builtin_kinds():
        for state in ATTEMPT_END_STATES:
            line = f'forensics_jobs_finished_total{{kind="{kind.name}",state="{state}"}} 0.0'
            assert line in body, line


def _spans_ended(mem: InMemorySpanExporter, name: str, n: int, timeout_s: float = 60) -> None:
    """Wait until ``n`` spans ``name`` ended (a job span ends after its follow-ups)."""
    import time

    deadline = time.monotonic() + timeout_s
    while sum(s.name == name for s in mem.get_finished_spans()) < n:
        assert time.monotonic() < deadline, [s.name for s in mem.get_finished_spans()]
        time.sleep(0.05)


def test_a_scored_incident_without_a_request_trace_gets_the_job_trace_as_exemplar(tmp_path):
    """The score is observed after the CF job: its exemplar is the request's trace when the
    incident has one, else the trace of the sidecar's own job span (still open then)."""
    import json
    import re

    from sidecar._client import SidecarClient
    from sidecar._config import SidecarConfig
    from sidecar._server import create_server

    from .conftest import build_incident

    cfg = SidecarConfig.from_dict({"data_dir": str(tmp_path / "data"),
                                   "jobs": {"poll_interval_s": 0.05},
                                   "baselines": {"detector": "norm"}})
    mem = InMemorySpanExporter()
    with SidecarTelemetry(registry=CollectorRegistry(), metrics_port=0, span_exporter=mem) as t:
        sc, port = create_server(cfg, port=0, telemetry=t)
        with sc, SidecarClient(f"127.0.0.1:{port}") as c:
            ids = [f"b-{i}" for i in range(8)]
            for i, iid in enumerate(ids):
                c.upload(iid, build_incident(iid, rule="ratio", seed=i, traceparent=None))
            c.run_analysis(ids[0], "baseline", params_json=json.dumps({"incident_ids": ids}))
            _spans_ended(mem, "job.cf", 16)   # 8 without a baseline, 8 scored again after it
            c.upload("flagged", build_incident("flagged", seed=99, traceparent=None))
            _spans_ended(mem, "job.cf", 17)
            cf = next(a for a in c.list_analyses("flagged") if a.kind == "cf")
            score = json.loads(cf.result_json)["anomaly_score"]
            assert t.metrics_url is not None
            _, body = _scrape(t.metrics_url, "application/openmetrics-text")
    cf_span = next(s for s in mem.get_finished_spans() if s.name == "job.cf"
                   and s.attributes["forensics.incident.id"] == "flagged")
    assert not cf_span.links                         # no request trace to link to
    exemplars = {float(v): tid for tid, v in re.findall(
        r'forensics_anomaly_score_bucket\{[^}]*\} \S+ # \{trace_id="([0-9a-f]{32})"\} (\S+)',
        body)}
    assert exemplars.get(score) == format(cf_span.context.trace_id, "032x"), body


def test_shutdown_stops_the_metrics_server():
    with SidecarTelemetry(registry=CollectorRegistry(), metrics_port=0) as tel:
        url = tel.metrics_url
        assert url is not None
        tel.shutdown()
    tel.shutdown()  # idempotent (the context exit shut it down once more)
    assert tel.metrics_url is None
    with pytest.raises(OSError):
        _scrape(url, None)


def test_no_metrics_server_unless_asked():
    with SidecarTelemetry(registry=CollectorRegistry()) as t:
        assert t.metrics_url is None
        with t.span("ingest", traceparent=TRACEPARENT):  # spans still work (no exporter)
            assert Tracing.current_trace_id() is not None


def test_console_span_exporter_prints_spans_when_configured(capfd):
    import json

    from sidecar._config import load_config

    cfg = load_config(None, env={"FORENSICS_SIDECAR__TELEMETRY__CONSOLE_SPANS": "true"})
    assert cfg.telemetry.console_spans
    with SidecarTelemetry.from_config(cfg, registry=CollectorRegistry(), metrics_port=0) as t:
        with t.span("ingest", traceparent=TRACEPARENT,
                    attributes={"forensics.incident.id": "inc-1"}):
            pass
    printed = json.loads(capfd.readouterr().out)   # one span, as OpenTelemetry prints it
    assert printed["name"] == "ingest"
    assert printed["attributes"]["forensics.incident.id"] == "inc-1"
    assert printed["links"][0]["context"]["trace_id"] == f"0x{TRACE_ID}"
    quiet = load_config(None, env={})
    with SidecarTelemetry.from_config(quiet, registry=CollectorRegistry()) as t:
        with t.span("ingest"):
            pass
    assert capfd.readouterr().out == ""             # off by default


def test_otlp_exporters_are_configurable_and_off_by_default():
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as G
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as H

    from integrations.errors import ConfigError

    assert isinstance(make_otlp_exporter("localhost:4317"), G)
    h = make_otlp_exporter("localhost:4318", protocol="http")
    assert isinstance(h, H) and h._endpoint == "http://localhost:4318/v1/traces"
    with pytest.raises(ConfigError, match="grpc' or 'http"):
        make_otlp_exporter("x", protocol="thrift")  # type: ignore[arg-type]
    tr = Tracing()
    try:
        assert not tr.provider._active_span_processor._span_processors  # nothing exported
    finally:
        tr.shutdown()


def test_prometheus_rules_and_scrape_config_use_only_real_series():
    import re
    from pathlib import Path

    import yaml

    from integrations._metrics import RecorderMetrics
    from sidecar.telemetry import SidecarMetrics

    rec_reg = CollectorRegistry()
    RecorderMetrics(registry=rec_reg)
    names: set[str] = set()
    for reg in (SidecarMetrics(registry=CollectorRegistry()).registry, rec_reg):
        for fam in reg.collect():
            names |= {fam.name + suffix for suffix in ("", "_total", "_bucket", "_count", "_sum")}

    deploy = Path(__file__).resolve().parents[3] / "deploy" / "prometheus"
    config = yaml.safe_load((deploy / "prometheus.yaml").read_text())
    assert "scrape_protocols" not in config["global"]   # a 2.49+ key: loads on 2.42
    for rule_file in config["rule_files"]:
        rules = yaml.safe_load((deploy / rule_file).read_text())
        exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
        assert len(exprs) >= 8
        used = {m for e in exprs for m in re.findall(r"\b(forensics_[a-z_]+)", e)}
        assert used and used <= names, used - names
