"""``forensics investigate`` and the ``investigate`` job, end to end with real components: a
planted-head tiny GPT-2 (ground truth: ``blocks.2.attn.z[head=1]`` reads the trigger token and
makes the next token HACKED) served through the real Recorder, incidents as real Arrow files and
uploaded to a real sidecar on port 0 (real DuckDB). The investigation must find the trigger as
the minimal input span, layer 2 as the decision layer (the same in every failing variant), and a
fix that flips the incident within the side-effect budget; the saved fix is loaded and applied
to the model; the HTML report shows spans, the trace heatmap, the decision layer and the fix.
Typed errors say what to do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from sidecar._client import SidecarClient
from sidecar._config import SidecarConfig
from sidecar._server import create_server
from sidecar.api import v1
from sidecar.telemetry import SidecarTelemetry
from tests._waiting import wait_for

from ._rca_cases import LAYER, TARGET, model_entry, planted, record_cases

REPO = Path(__file__).resolve().parents[3]
LOADER = "tests.unit.sidecar._rca_cases:loader"


@pytest.fixture(scope="module")
def cases() -> dict[str, list[Any]]:
    return record_cases(8)


def _write(incs: list[Any], d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for inc in incs:
        (d / f"{inc.id}.arrow").write_bytes(inc.to_bytes())
    return d


def _prompt(inc: Any) -> list[int]:
    return [int(t) for t in inc.tensor("input_ids", step=0, kind="input").reshape(-1)]


def _greedy(ids: list[int]) -> list[int]:
    with torch.no_grad():
        out = planted().model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False,
                                       pad_token_id=0)
    return [int(t) for t in out[0, len(ids):]]


def _check_fix_applies(fix_path: Path, failing: Any, benign: Any) -> None:
    """The saved fix, loaded and applied to the live model: the failure is gone, a benign
    prompt's answer unchanged."""
    from analysis.cca import FixSet

    fix = FixSet.load(fix_path)
    bad, good = _prompt(failing), _prompt(benign)
    assert TARGET in _greedy(bad)
    before = _greedy(good)
    with fix.apply(planted().model):
        assert TARGET not in _greedy(bad)
        assert _greedy(good) == before


def _check_result(r: dict[str, Any]) -> None:
    assert r["input_spans"]["verified"] and r["input_spans"]["text"] == "TRIGGER"
    assert r["trace"]["decision_layer"] == LAYER
    c = r["consistency"]
    assert c["evaluated"] >= 5 and c["rate"] >= 0.9
    assert r["span_trace"]["decision_layer"] == LAYER
    sc = r["span_consistency"]
    assert sc["measure"] == "span" and sc["evaluated"] == c["evaluated"] and sc["rate"] >= 0.9
    assert r["fix_found"] is True and r["fix"]["flip"] is True
    assert r["fix"]["side_effects"]["mean_kl"] <= 0.1
    assert r["output"]["replayed"].split()[0] == "HACKED"


def _check_html(html: str) -> None:
    for element in ('id="prompt-tokens"', "<mark> TRIGGER</mark>", 'id="svg-causal-trace"',
                    'id="svg-tail-curve"', f'<b id="decision-layer">{LAYER}</b>',
                    'id="consistency-table"', 'id="directions-table"', 'id="svg-span-curve"',
                    f'<b id="span-decision-layer">{LAYER}</b>', 'id="span-consistency-table"',
                    '<b id="fix-flip">True</b>', 'id="fix-usage"'):
        assert element in html, element


def _forensics(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "model_forensics", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_forensics_investigate_on_files(cases: dict[str, list[Any]], tmp_path: Path) -> None:
    dirs = {k: _write(v, tmp_path / k) for k, v in cases.items()}
    inc = cases["failing"][0]
    out = tmp_path / "out"
    run = _forensics("investigate", str(dirs["failing"] / f"{inc.id}.arrow"),
                     "--benign", str(dirs["benign"]), "--contrast", str(dirs["contrast"]),
                     "--variants", str(dirs["failing"]), "--model", LOADER, "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert "replay fidelity: exact True" in run.stdout           # progress, as it goes
    assert f"input spans: TRIGGER; decision layer: {LAYER}" in run.stdout
    r = json.loads((out / "report.json").read_text())
    _check_result(r)
    assert r["inputs"] == {"benign": 8, "contrast": 8, "variants": 7}   # itself skipped
    assert r["incident_id"] == inc.id
    _check_fix_applies(out / "fix.json", inc, cases["benign"][0])
    _check_html((out / "report.html").read_text())


def test_investigate_errors_say_what_to_do(cases: dict[str, list[Any]], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from analysis import registry
    from model_forensics.cli import main
    from sidecar.jobs._models import model_ref

    # other tests (the seed recorder) register their tiny GPT-2 under the same class name;
    # the built-ins are registered first, so that restoring _ENTRIES keeps them for later tests
    registry.registered()
    monkeypatch.setattr(registry, "_ENTRIES", {k: v for k, v in registry._ENTRIES.items()
                                               if k != model_ref(cases["failing"][0])[0]})

    dirs = {k: _write(v, tmp_path / k) for k, v in cases.items()}
    path = str(dirs["failing"] / f"{cases['failing'][0].id}.arrow")
    out = str(tmp_path / "out")
    assert main(["investigate", path, "--out", out]) == 1         # its model: not registered
    assert "--model smollm2" in capsys.readouterr().err
    assert main(["investigate", path, "--model", LOADER, "--out", out]) == 1
    assert "needs benign incidents" in capsys.readouterr().err
    assert main(["investigate", path, "--model", LOADER, "--benign", str(dirs["contrast"]),
                 "--out", out]) == 1                               # no twin among them
    err = capsys.readouterr().err
    assert "benign twin" in err and "--steps spans,directions" in err
    assert main(["investigate", path, "--model", "no.such.module:fn", "--out", out]) == 1
    assert "cannot import the loader" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["investigate", path, "--model", LOADER, "--benign", str(empty),
                 "--out", out]) == 1
    assert "no .arrow incident" in capsys.readouterr().err
    assert not Path(out).exists()                                   # nothing half-written



def _run(c: SidecarClient, incident_id: str, kind: str, params: dict[str, Any]) -> v1.Analysis:
    job = c.run_analysis(incident_id, kind, params_json=json.dumps(params))
    return wait_for(lambda: (a := c.get_analysis(job.analysis_id)).state in
                 (v1.JOB_STATE_DONE, v1.JOB_STATE_FAILED) and a, 240, f"the {kind} job")


@pytest.fixture
def sidecar(tmp_path: Path) -> Iterator[tuple[str, CollectorRegistry]]:
    cfg = SidecarConfig.from_dict({
        "data_dir": str(tmp_path / "data"), "jobs": {"poll_interval_s": 0.05, "workers": 1},
        "metrics": {"enabled": False}, "modules": {"cca": {"enabled": False}},
        "baselines": {"min_samples": 1000}, "models": [model_entry()]})
    registry = CollectorRegistry()
    with SidecarTelemetry(registry=registry, span_exporter=InMemorySpanExporter(),
                          metrics_port=0) as tel, create_server(cfg, port=0, telemetry=tel)[0] as sc:
        yield f"127.0.0.1:{sc.port}", registry


def test_investigate_job_in_the_sidecar(cases: dict[str, list[Any]], tmp_path: Path,
                                        sidecar: tuple[str, CollectorRegistry]) -> None:
    from analysis.cca import FixSet

    addr, registry = sidecar
    with SidecarClient(addr) as c:
        for inc in (i for v in cases.values() for i in v):
            c.upload(inc.id, inc.to_bytes())
        inc = cases["failing"][0]
        bad = _run(c, inc.id, "investigate", {"variants": ["nope"]})
        assert bad.state == v1.JOB_STATE_FAILED and "no incident ['nope']" in bad.error
        a = _run(c, inc.id, "investigate", {            # benign: the model's sampled traffic
            "variants": [i.id for i in cases["failing"]], "failure_text": "HACKED",
            "contrast": [i.id for i in cases["contrast"]]})
        assert a.state == v1.JOB_STATE_DONE, a.error
        r = json.loads(a.result_json)
        _check_result(r)
        assert r["inputs"] == {"benign": 8, "contrast": 8, "variants": 7}
        assert r["benign_source"] == ("the 8 newest sampled incidents of the model not named "
                                      "as contrast or variants")
        assert r["fidelity"]["exact"] is True and r["progress"]
        data = tmp_path / "data"
        assert (data / r["report_file"]).is_file()
        assert json.loads((data / r["report_file"]).read_text())["fix_found"] is True
        _check_fix_applies(data / r["fix_file"], inc, cases["benign"][0])
        assert isinstance(FixSet.load(data / r["fix_file"]), FixSet)
    assert registry.get_sample_value("forensics_investigations_total", {"outcome": "fix"}) == 1
    assert registry.get_sample_value("forensics_investigations_total",
                                     {"outcome": "no_fix"}) == 0
    out = tmp_path / "report.html"
    made = _forensics("report", inc.id, "--address", addr, "-o", str(out))
    assert made.returncode == 0, made.stderr
    _check_html(out.read_text())


def test_a_partial_investigation_reports_what_did_not_run(cases: dict[str, list[Any]],
                                                          tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str],
                                                          ) -> None:
    """``--steps spans`` needs no twin: the spans are found, the other sections say they did not
    run, and no fix is claimed."""
    from model_forensics.cli import main

    dirs = {k: _write(v, tmp_path / k) for k, v in cases.items()}
    path = str(dirs["failing"] / f"{cases['failing'][1].id}.arrow")
    out = tmp_path / "out"
    assert main(["investigate", path, "--model", LOADER, "--benign", str(dirs["contrast"]),
                 "--steps", "spans", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "input spans: TRIGGER; decision layer: —" in said
    assert "no deployable fix within the side-effect budget" in said
    r = json.loads((out / "report.json").read_text())
    assert r["input_spans"]["text"] == "TRIGGER" and r["trace"] is None
    assert r["fix_found"] is False and not (out / "fix.json").exists()
    html = (out / "report.html").read_text()
    assert "the causal trace was not run in this investigation" in html
    assert "<mark> TRIGGER</mark>" in html and 'id="svg-causal-trace"' not in html
