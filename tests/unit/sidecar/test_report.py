"""The HTML incident report: built from a real sidecar's real CF results (norm detector on real
incidents, every unit scored), self-contained, sections pluggable, the index page, the
``forensics report`` CLI, and rendered by real headless Chromium (screenshot not blank, key
elements present). The fix-set sections are checked on a real CCA result in
tests/integration/test_sidecar_analysis.py and by ``make demo`` on SmolLM2."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar._client import SidecarClient
from sidecar._config import SidecarConfig
from sidecar._server import create_server
from sidecar.report import (
    ReportData,
    Section,
    data_from_files,
    data_from_sidecar,
    default_sections,
    read_report_meta,
    render_report,
    table,
    write_index,
)

from .conftest import build_incident

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (Debian: apt-get install chromium; "
                             ".ci/run installs it)")


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ReportData, Path]]:
    """A flagged incident scored by a real sidecar against a baseline of 8 benign ones."""
    tmp = tmp_path_factory.mktemp("report")
    cfg = SidecarConfig.from_dict({"data_dir": str(tmp / "data"),
                                   "jobs": {"poll_interval_s": 0.05},
                                   "baselines": {"detector": "norm"}})
    sc, port = create_server(cfg, port=0)
    with sc, SidecarClient(f"127.0.0.1:{port}") as c:
        ids = [f"b-{i}" for i in range(8)]
        for i, iid in enumerate(ids):
            c.upload(iid, build_incident(iid, rule="ratio", seed=i, n_sites=4, steps=3))
        job = c.run_analysis(ids[0], "baseline", params_json=json.dumps({"incident_ids": ids}))
        assert sc.jobs.wait(job.analysis_id, timeout_s=60).state == "done"
        data = build_incident("flagged", seed=99, n_sites=4, steps=3)
        (tmp / "flagged.arrow").write_bytes(data)
        c.upload("flagged", data)
        cf = next(a for a in c.list_analyses("flagged") if a.kind == "cf")
        assert sc.jobs.wait(cf.analysis_id, timeout_s=60).state == "done"
        yield data_from_sidecar(c, "flagged"), tmp


def test_the_report_shows_the_incident_and_its_analysis(scored) -> None:  # type: ignore[no-untyped-def]
    data, _ = scored
    cf = data.result("cf")
    assert cf is not None and cf["status"] == "scored"
    html = render_report(data)
    for ident in ("incident-id", "summary", "manifest-table", "svg-site-step",
                  "svg-layer-position", "root-causes", "links-table", "trace-id", "jobs-table"):
        assert f'id="{ident}"' in html, ident
    assert f"{cf['anomaly_score']:.2f}" in html and TRACE_ID in html
    assert "fix-set" not in html                       # no CCA ran: no empty fix section
    assert "content was not captured" in html
    # the site × step map has every site (rows) and step (columns): 4 sites × 3 steps
    svg = re.search(r'<svg id="svg-site-step".*?</svg>', html, re.S)
    assert svg and svg.group(0).count("<rect ") == 4 * 3 + 1      # + the legend bar
    meta = read_report_meta_from(html)
    assert meta["incident_id"] == "flagged" and meta["anomaly_score"] == cf["anomaly_score"]


def read_report_meta_from(html: str) -> dict:  # type: ignore[type-arg]
    found = re.search(r'id="forensics-report-meta">(.*?)</script>', html, re.S)
    assert found
    return dict(json.loads(found.group(1)))


def test_the_report_is_self_contained(scored) -> None:  # type: ignore[no-untyped-def]
    html = render_report(scored[0], trace_url="http://localhost:16686/trace/{trace_id}")
    assert f'href="http://localhost:16686/trace/{TRACE_ID}"' in html   # the one link asked for
    without = html.replace(f'href="http://localhost:16686/trace/{TRACE_ID}"', "")
    assert not re.search(r"(src=|href=|url\((?!#)|@import)", without), "an external resource"
    scripts = re.findall(r"<script[^>]*>", html)
    assert scripts == ['<script type="application/json" id="forensics-report-meta">']  # data


def test_sections_are_pluggable(scored) -> None:  # type: ignore[no-untyped-def]
    data, _ = scored

    def spans(d: ReportData) -> str | None:
        r = d.result("cf")
        return None if r is None else table(["first flagged"], [[str(r["first_flagged"])]])

    def broken(d: ReportData) -> str | None:
        raise RuntimeError("bad result shape")

    html = render_report(data, sections=[
        *default_sections()[:2], Section("input-spans", "Input spans", spans),
        Section("nothing", "Nothing", lambda d: None), Section("broken", "Broken", broken),
        *default_sections()[2:]])
    assert html.index('id="manifest"') < html.index('id="input-spans"') < html.index(
        'id="root-causes"')
    assert 'id="nothing"' not in html                                   # None: left out
    assert "could not be rendered: RuntimeError: bad result shape" in html   # shown, not fatal
    assert 'id="links"' in html


def test_report_from_files_and_the_cli(scored, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from model_forensics.cli import main

    data, tmp = scored
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"cf": data.result("cf")}))
    local = data_from_files(tmp / "flagged.arrow", results)
    assert local.incident_id == "flagged" and local.result("cf") == data.result("cf")
    out = tmp_path / "reports" / "flagged.html"
    assert main(["report", "--incident", str(tmp / "flagged.arrow"), "--results", str(results),
                 "-o", str(out), "--index"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    html = out.read_text()
    assert 'id="svg-site-step"' in html and "files " in html
    index = (tmp_path / "reports" / "index.html").read_text()
    assert 'href="flagged.html"' in index and 'id="index-table"' in index
    assert main(["report"]) == 2                        # neither an id nor a file


def test_index_lists_reports_newest_first(scored, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    data, _ = scored
    for iid, created in (("old", "2025-01-01T00:00:00+00:00"),
                         ("new", "2026-01-01T00:00:00+00:00")):
        d = dataclasses.replace(data, incident_id=iid,
                                manifest={**data.manifest, "created_at": created})
        (tmp_path / f"{iid}.html").write_text(render_report(d))
    (tmp_path / "notes.html").write_text("<html>not a report</html>")
    index = write_index(tmp_path).read_text()
    assert index.index('href="new.html"') < index.index('href="old.html"')
    assert "notes.html" not in index and read_report_meta(tmp_path / "notes.html") is None


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp / 'chromium-profile'}", *args],
        capture_output=True, text=True, timeout=180)


@needs_chromium
def test_headless_chromium_renders_the_report(scored, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image, ImageStat

    page = tmp_path / "report.html"
    page.write_text(render_report(scored[0]))
    shot = tmp_path / "shot.png"
    r = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2000",
                  "--hide-scrollbars", page.as_uri())
    assert shot.is_file(), r.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == (1280, 2000)
    stat = ImageStat.Stat(img.convert("L"))
    assert stat.stddev[0] > 20, f"blank screenshot (stddev {stat.stddev[0]:.1f})"
    colors = img.getcolors(maxcolors=1 << 20) or []
    assert len(colors) > 50                               # text, cards, heatmap cells
    reds = sum(n for n, (cr, cg, cb) in colors if cr > 200 and cg < 150 and cb < 150)
    assert reds > 0                                      # the heatmap's anomalous cells
    dom = _chromium(tmp_path, "--dump-dom", page.as_uri()).stdout
    for ident in ("incident-id", "card-score", "card-trace", "svg-site-step", "root-causes",
                  "trace-id"):
        assert f'id="{ident}"' in dom, ident


def test_a_fix_over_the_side_effect_budget_is_labelled_not_deployable(  # type: ignore[no-untyped-def]
        scored, tmp_path: Path) -> None:
    """The verdict follows the measured mean benign KL against the 0.1-nat budget (the
    numbers are those ``make demo`` measured for SmolLM2's whole-MLP ablation)."""
    from sidecar.report import SIDE_EFFECT_BUDGET_KL, over_budget

    data, tmp = scored
    fix = {"interventions": [{"site": "blocks.11.mlp", "kind": "mean"}], "flip_rate": 1.0,
           "one_minimal": True, "side_effects": {"mean_kl": 6.495, "top1_agreement": 0.161,
                                                  "n_incidents": 4}}
    html = {}
    for kl in (6.495, 0.004):
        results = tmp_path / f"r{kl}.json"
        costly = {**fix, "side_effects": {**fix["side_effects"], "mean_kl": kl}}
        results.write_text(json.dumps({"cf": data.result("cf"),
                                       "cca": {"status": "found", "fix_set": costly}}))
        html[kl] = render_report(data_from_files(tmp / "flagged.arrow", results))
    assert SIDE_EFFECT_BUDGET_KL == 0.1 and over_budget(fix) == pytest.approx(64.95)
    assert "65× the side-effect budget: not deployable" in html[6.495]
    assert "fix set verified, over the side-effect budget" in html[6.495]
    assert "is not a mitigation to deploy" in html[6.495]
    assert "not deployable" not in html[0.004] and "fix set verified</span>" in html[0.004]
