"""CF and CCA inside the sidecar, end to end with real components: a planted-fault tiny GPT-2
recorded by the real Recorder, uploaded by the real SidecarExporter to a real sidecar on port 0
(real DuckDB): "no baseline" states, the baseline built automatically from sampled benign
traffic, a flagged incident scored (per-site scores in DuckDB and over gRPC, the anomaly score
histogram with the request's trace id as exemplar), CCA run after CF with the registered model,
the fix set in DuckDB / gRPC / ``forensics incidents show``, and ``forensics baseline build``."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from integrations import Recorder, exporters, triggers
from integrations.incident import model_fingerprint
from sidecar._client import SidecarClient
from sidecar._config import SidecarConfig
from sidecar._server import Sidecar, create_server
from sidecar.jobs._cca import FIX_SET_SIZE
from sidecar.jobs._cf import ANOMALY_P, ANOMALY_SCORE
from sidecar.telemetry import SidecarTelemetry
from tests._waiting import jobs_idle, wait_for

pytestmark = pytest.mark.slow

PLANTED = {"arch": "gpt2", "seed": 0, "layer": 2, "neuron": 17, "trigger_token": 5,
           "target_token": 7}
SITES = ["blocks.*.mlp.post", "blocks.*.resid_post"]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def planted_model() -> Any:
    """The sidecar's model loader for the planted scenario (``module:function``)."""
    from analysis.scenarios.planted import build_planted

    return build_planted(PLANTED).model




def _serve(rec: Recorder, model: Any, ids: list[int], request_id: str, *,
           flag: str | None = None) -> None:
    with rec.request(request_id=request_id, tenant="acme", traceparent=TRACEPARENT) as req, \
            torch.no_grad():
        model(input_ids=torch.tensor([ids]))   # [batch, pos]
        if flag:
            req.flag(flag)


def _config(tmp_path: Path, fp: str) -> SidecarConfig:
    return SidecarConfig.from_dict({
        "data_dir": str(tmp_path / "data"),
        "jobs": {"poll_interval_s": 0.05, "workers": 2,
                 "params": {"cca": {"permutations": 19}}},   # a default for every cca job
        "metrics": {"enabled": False},
        "baselines": {"min_samples": 10, "refresh_every": 0, "cca_benign": 4},
        "modules": {"cca": {"max_fix_set_size": 4}},
        "models": [{"name": "planted", "fingerprint": fp,
                    "loader": "tests.integration.test_sidecar_analysis:planted_model"}]})


def test_cf_and_cca_in_the_sidecar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from analysis.scenarios.planted import build_planted

    pm = build_planted(PLANTED)
    fp = model_fingerprint(pm.model)
    cfg = _config(tmp_path, fp)
    with SidecarTelemetry(registry=CollectorRegistry(), span_exporter=InMemorySpanExporter(),
                          metrics_port=0) as tel, \
            create_server(cfg, port=0, telemetry=tel)[0] as sc, \
            Recorder(pm.model, sites=SITES,
                     trigger=triggers.AnyOf(triggers.OnFlag(), triggers.Ratio(1.0)),
                     exporter=exporters.SidecarExporter(f"127.0.0.1:{sc.port}"),
                     metrics_registry=CollectorRegistry(), max_queue=64) as rec:
        addr = f"127.0.0.1:{sc.port}"
        # 1. sampled benign traffic: scored "no_baseline" until min_samples exist, then built
        for i, ids in enumerate(pm.benign_prompts(12, seed=3)):
            _serve(rec, pm.model, ids, f"benign-{i}")
        assert rec.force_flush(timeout_s=60)
        _check_automatic_baseline(sc, fp, tmp_path)
        # 2. a flagged failure: CF scores it, then CCA runs with the registered model
        _serve(rec, pm.model, pm.failing_prompts(1, seed=21)[0], "attack",
               flag="prompt_injection")
        assert rec.force_flush(timeout_s=60)
        inc_id, cf, ranks = _check_cf_scored(sc, cfg)
        cf_json = _check_cf_report(addr, inc_id, cf, ranks)
        fixed_sites = _check_cca_fix_set(sc, addr, inc_id)
        # 3. telemetry: the score (exemplar = the request's trace) and the fix-set size
        _check_telemetry(sc, tel, cf, fixed_sites)
        # 4. the CLI prints the CF top sites and the fix set with its statistics
        _check_cli_show(addr, inc_id, cf_json, ranks[0][0], capsys)
        _check_report(addr, inc_id, fixed_sites, tmp_path, capsys)
        # 5. forensics baseline build: by fingerprint, and from a directory of incidents
        _check_cli_baseline_build(sc, addr, fp, tmp_path, capsys)


def _check_automatic_baseline(sc: Sidecar, fp: str, tmp_path: Path) -> None:
    idx = sc.store.index
    wait_for(lambda: idx.read("SELECT count(*) FROM incidents")[0][0] == 12, 60, "uploads")
    wait_for(lambda: jobs_idle(sc) and idx.read(
        "SELECT count(*) FROM jobs WHERE kind = 'baseline' AND state = 'done'")[0][0], 240,
        "the automatic baseline")
    (version, samples, path), = idx.read(
        "SELECT version, sample_count, path FROM baselines WHERE fingerprint = ?", [fp])
    assert version == 1 and samples >= 10 and (tmp_path / "data" / path).is_file()
    early = idx.read("SELECT status, score, flagged FROM cf_results ORDER BY created_at")
    assert early[0] == ("no_baseline", None, None)      # never a made-up score
    assert {s for s, _, _ in early} <= {"no_baseline", "scored"}


def _check_cf_scored(sc: Sidecar, cfg: SidecarConfig) -> tuple[str, dict[str, Any], list[Any]]:
    """The flagged incident's CF row and per-site ranks in DuckDB (after CCA finished)."""
    idx = sc.store.index
    inc_id = wait_for(lambda: idx.read(
        "SELECT id FROM incidents WHERE trigger_rule = 'flag'"), 60, "the flagged upload")[0][0]
    wait_for(lambda: idx.read("SELECT count(*) FROM jobs WHERE incident_id = ? AND kind = 'cca'"
                           " AND state IN ('done', 'failed')", [inc_id])[0][0], 600, "CCA")
    cf = idx.read_dicts("SELECT * FROM cf_results WHERE incident_id = ?", [inc_id])[0]
    assert cf["status"] == "scored" and cf["flagged"] is True
    assert cf["score"] >= cfg.modules.cf.anomaly_threshold
    ranks = idx.read("SELECT site, rank, score, q FROM cf_site_scores WHERE job_id = ? "
                     "ORDER BY rank", [cf["job_id"]])
    assert len(ranks) == 8 and ranks[0][0] == cf["top_site"]
    assert [r[1] for r in ranks] == list(range(1, 9))
    assert any(r[0].startswith("blocks.2.") for r in ranks[:3]), ranks   # planted layer
    return inc_id, cf, ranks


def _analyses(addr: str, inc_id: str) -> dict[str, Any]:
    with SidecarClient(addr) as c:
        by_kind = {a.kind: a for a in c.list_analyses(inc_id)}
        assert {"cf", "cca"} <= set(by_kind)
        return {k: c.get_analysis(a.analysis_id) for k, a in by_kind.items()}


def _check_cf_report(addr: str, inc_id: str, cf: dict[str, Any],
                     ranks: list[Any]) -> dict[str, Any]:
    """The CF result over gRPC: per-site p/q, the incident's p, root-cause candidates."""
    cf_json = json.loads(_analyses(addr, inc_id)["cf"].result_json)
    sites = cf_json["report"]["sites"]
    assert set(sites) == {r[0] for r in ranks}
    assert all(0 < s["p"] <= 1 and 0 < s["q"] <= 1 for s in sites.values())
    # the incident's empirical p against the baseline: far beyond every benign incident
    assert cf_json["anomaly_p"] == cf_json["report"]["p"] == cf["p"]
    assert cf_json["anomaly_p"] == 1 / (cf_json["baseline"]["sample_count"] + 1)
    with SidecarClient(addr) as c:  # filterable over gRPC: the smallest p, i.e. beyond
        cut = f"anomaly_p <= {cf['p'] * 1.000001!r}"  # every baseline incident
        listed = [i.id for i in c.list_all(filter=cut, order_by="anomaly_p")]
    assert inc_id in listed and len(listed) < 11
    first = cf_json["first_flagged"]  # earliest flagged site in the forward pass's order
    assert first == cf_json["report"]["first_flagged"] and sites[first]["flagged"]
    cands = cf_json["root_cause_candidates"]  # every flagged site, in forward order
    assert cands[0] == first and cands == cf_json["report"]["root_cause_candidates"][:10]
    assert sorted(cands) == sorted(s for s, v in sites.items() if v["flagged"])
    order = cf_json["report"]["execution_order"]
    assert sorted(order) == sorted(sites) and order.index(first) <= order.index(ranks[0][0])
    units = cf_json["units"]["sites"]       # every scored unit, for the report's heatmaps
    assert set(units) == set(sites)
    for site, s in sites.items():           # the same z the detector ranked the site by
        w = s["worst"]
        at = {(step, pos): z for step, pos, z in units[site]}
        assert at[(w["step"], w["position"])] == pytest.approx(w["z"], abs=1e-3), site
        assert max(abs(z) for z in at.values()) == pytest.approx(abs(w["z"]), abs=1e-3)
    return dict(cf_json)


def _check_cca_fix_set(sc: Sidecar, addr: str, inc_id: str) -> list[str]:
    """The CCA result over gRPC and in DuckDB: a verified 1-minimal fix at the planted site."""
    idx = sc.store.index
    cca_job = _analyses(addr, inc_id)["cca"]
    assert cca_job.error == "", cca_job.error
    cca = json.loads(cca_job.result_json)
    assert cca["fidelity"]["exact"] is True and cca["cf_guided"] is True
    assert cca["status"] == "found", cca["fix_set"]["reason"]
    fix = cca["fix_set"]
    fixed_sites = [iv["site"] for iv in fix["interventions"]]
    assert "blocks.2.mlp" in fixed_sites and fix["one_minimal"] is True
    assert fix["permutation"]["n_permutations"] == 19         # jobs.params.cca
    assert cca["outputs"] == {"recorded": None, "with_fix": fix["greedy_output"]}  # no text
    row = idx.read_dicts("SELECT * FROM cca_results WHERE incident_id = ?", [inc_id])[0]
    assert row["flip"] is True and row["size"] == len(fixed_sites) == cca["fix_set_size"]
    assert row["forward_passes"] == fix["forward_passes"] > 0
    assert [r[0] for r in idx.read("SELECT site FROM cca_interventions WHERE job_id = ? "
                                   "ORDER BY idx", [row["job_id"]])] == fixed_sites
    return fixed_sites


def _check_telemetry(sc: Sidecar, tel: SidecarTelemetry, cf: dict[str, Any],
                     fixed_sites: list[str]) -> None:
    assert sc.counters.values(FIX_SET_SIZE) == [len(fixed_sites)]
    assert cf["score"] in sc.counters.values(ANOMALY_SCORE)
    assert cf["p"] in sc.counters.values(ANOMALY_P)
    req = urllib.request.Request(str(tel.metrics_url),
                                 headers={"Accept": "application/openmetrics-text"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        om = resp.read().decode()
    assert f'# {{trace_id="{TRACE_ID}"}} {cf["score"]}' in om
    assert f'# {{trace_id="{TRACE_ID}"}} {cf["p"]}' in om   # forensics_anomaly_p's exemplar
    assert "forensics_fix_set_size_count 1.0" in om


def _check_cli_show(addr: str, inc_id: str, cf_json: dict[str, Any], top_site: str,
                    capsys: pytest.CaptureFixture[str]) -> None:
    from model_forensics.cli import main as cli

    capsys.readouterr()
    assert cli(["incidents", "show", inc_id, "--address", addr]) == 0
    out = capsys.readouterr().out
    assert "Compression Forensics" in out and "FLAGGED" in out and top_site in out
    assert f"(p {cf_json['anomaly_p']:.3g} vs the baseline)" in " ".join(out.split())
    cands = cf_json["root_cause_candidates"]
    assert f"first): {', '.join(cands[:3])}" in " ".join(out.split())
    assert "Causal fix set" in out and "flip rate" in out and "replays vs" in out


def _check_report(addr: str, inc_id: str, fixed_sites: list[str], tmp_path: Path,
                  capsys: pytest.CaptureFixture[str]) -> None:
    """``forensics report``: the fix set, its statistics and the trace, from the sidecar."""
    from model_forensics.cli import main as cli

    out = tmp_path / "reports" / f"{inc_id}.html"
    assert cli(["report", inc_id, "--address", addr, "-o", str(out), "--index"]) == 0
    html = out.read_text()
    for ident in ("fix-table", "fix-stats", "before-after", "output-after", "svg-site-step",
                  "root-cause-table"):
        assert f'id="{ident}"' in html, ident
    assert all(site in html for site in fixed_sites) and TRACE_ID in html
    assert "flip rate" in html and "19 random sets" in html      # jobs.params.cca
    # a planted neuron's fix leaves benign traffic alone: no over-budget verdict
    assert "fix set verified</span>" in html and "not deployable" not in html
    assert f'href="{inc_id}.html"' in (tmp_path / "reports" / "index.html").read_text()
    capsys.readouterr()


def _check_cli_baseline_build(sc: Sidecar, addr: str, fp: str, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    from model_forensics.cli import main as cli

    idx = sc.store.index
    assert cli(["baseline", "build", "--fingerprint", fp, "--address", addr]) == 0
    assert "baseline v2" in capsys.readouterr().out
    bdir = tmp_path / "benign"
    bdir.mkdir()
    benign_ids = [r[0] for r in idx.read("SELECT id FROM incidents WHERE trigger_rule = "
                                          "'ratio' ORDER BY id LIMIT 5")]
    with SidecarClient(addr) as c:
        for i in benign_ids:
            c.download(i, to=bdir / f"{i}.arrow")
    assert cli(["baseline", "build", "--from-dir", str(bdir), "--address", addr]) == 0
    assert "from 5 benign incidents" in capsys.readouterr().out
    got = idx.read("SELECT version, sample_count FROM baselines ORDER BY version")
    assert got[1:] == [(2, got[1][1]), (3, 5)]


def test_alert_rule_matches_the_flag_threshold() -> None:
    """The example alert counts incidents above the default CF flag threshold, and that
    threshold is a bucket boundary of forensics_anomaly_score."""
    import yaml

    from integrations.config import load_config

    threshold = load_config(env={}).modules.cf.anomaly_threshold
    assert SidecarConfig().modules.cf.anomaly_threshold == threshold
    assert ANOMALY_SCORE.buckets is not None and threshold in ANOMALY_SCORE.buckets
    rules = yaml.safe_load((Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
                            / "alerts.yaml").read_text())
    (rule,) = [r for g in rules["groups"] for r in g["rules"]
               if r["alert"] == "ForensicsAnomalousIncidents"]
    assert f'forensics_anomaly_score_bucket{{le="{threshold}"}}' in rule["expr"]
    assert 'forensics_anomaly_score_bucket{le="+Inf"}' in rule["expr"]
