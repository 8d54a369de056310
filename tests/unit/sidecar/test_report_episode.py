"""The report's episode section (``sidecar.report._sections_episode``) on real recorded episodes
(the toy agent of ``_rca_episodes`` on the planted tiny GPT-2): the steps in order from the
manifest alone, and with an investigation (``forensics investigate``) the decoded prompts and
outputs and the model call investigated; tool results are untrusted text — escaped and cut;
an incident that is not an episode has no such section; headless chromium renders it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from integrations.incident import Incident
from sidecar.report import data_from_files, render_report

from ._rca_cases import record_cases
from ._rca_episodes import record_episodes
from .test_investigate import LOADER, _write
from .test_report import _chromium

HOSTILE = "</pre></td><script>alert(1)</script><img src=x onerror=alert(2)>"


@pytest.fixture(scope="module")
def episodes() -> dict[str, list[Incident]]:
    return record_episodes(2)


def _hostile(inc: Incident) -> Incident:
    """The episode with tool results an attacker wrote: markup, and one far too long to show."""
    calls = inc.manifest["external_calls"]
    calls[0]["result"] = HOSTILE + "x" * 5000
    calls[1]["result"] = {"destructive": ["DELETE"], "note": HOSTILE}   # agent-db's form
    return inc.with_manifest(external_calls=calls)


def _investigated(inc: Incident, benign: list[Incident], tmp: Path) -> Path:
    """``forensics investigate --steps spans`` on ``inc``: the report page it wrote."""
    from model_forensics.cli import main

    path = _write([inc], tmp / "inc") / f"{inc.id}.arrow"
    assert main(["investigate", str(path), "--benign", str(_write(benign, tmp / "benign")),
                 "--steps", "spans", "--failure-text", "HACKED", "--model", LOADER,
                 "--out", str(tmp / "out")]) == 0
    return tmp / "out" / "report.html"


def _section(html: str) -> str:
    start = html.index('<section id="episode">')
    return html[start:html.index("</section>", start)]


def test_the_steps_from_the_manifest_alone(episodes: dict[str, list[Incident]],
                                          tmp_path: Path) -> None:
    inc = episodes["failing"][0]
    path = _write([inc], tmp_path) / f"{inc.id}.arrow"
    sec = _section(render_report(data_from_files(path)))
    assert sec.count("<tr>") == 5                              # header + 4 steps
    assert sec.index("model 0") < sec.index("tool 0") < sec.index("model 1") < \
        sec.index("tool 1")
    assert "<code>read_row</code>" in sec and "forward calls 2..3, cache new" in sec
    row = json.dumps(inc.manifest["external_calls"][0]["result"])
    assert row in sec and "marked destructive by the tool" in sec
    assert "no investigation of this episode yet" in sec and "investigated-call" not in sec


def test_untrusted_tool_results_are_escaped_and_cut(episodes: dict[str, list[Incident]],
                                                    tmp_path: Path) -> None:
    inc = _hostile(episodes["failing"][1])
    path = _write([inc], tmp_path / "files") / f"{inc.id}.arrow"
    pages = {"manifest": render_report(data_from_files(path)),
             "investigation": _investigated(inc, episodes["twins"], tmp_path).read_text()}
    for name, html in pages.items():
        sec = _section(html)
        assert "<script>" not in html.replace('<script type="application/json"', ""), name
        assert "onerror=alert" not in sec.replace("&lt;img src=x onerror=alert", ""), name
        assert "&lt;/pre&gt;&lt;/td&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in sec, name
        assert "more chars)" in sec and "x" * 1000 not in sec, name
        assert "marked destructive by the tool" in sec, name
    sec = _section(pages["investigation"])
    assert 'id="investigated-call"' in sec and "HACKED HACKED" in sec


def test_no_episode_section_for_a_single_call_incident(tmp_path: Path) -> None:
    inc = record_cases(1)["failing"][0]
    html = render_report(data_from_files(_write([inc], tmp_path) / f"{inc.id}.arrow"))
    assert 'id="episode"' not in html and 'id="manifest"' in html


@pytest.mark.skipif(shutil.which("chromium") is None and shutil.which("chromium-browser")
                    is None, reason="chromium not installed (Debian: apt-get install chromium)")
def test_headless_chromium_renders_the_episode(episodes: dict[str, list[Incident]],
                                               tmp_path: Path) -> None:
    from PIL import Image

    page = _investigated(episodes["failing"][0], episodes["twins"], tmp_path)
    shot = tmp_path / "shot.png"
    r = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,1600",
                  "--hide-scrollbars", page.as_uri())
    assert shot.is_file(), r.stderr[-2000:]
    colors = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20) or []
    badge = sum(n for n, c in colors if c == (0xfd, 0xe2, 0xe1))   # the destructive badge
    assert badge > 100, badge
    dom = _chromium(tmp_path, "--dump-dom", page.as_uri()).stdout
    for ident in ("episode", "episode-steps", "investigated-call", "investigation-spans"):
        assert f'id="{ident}"' in dom, ident
