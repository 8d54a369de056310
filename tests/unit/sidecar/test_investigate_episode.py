"""``forensics investigate`` and the ``investigate`` job on an episode (DESIGN §15), end to end with
real components: the toy agent of ``_rca_episodes`` (model call, recorded ``read_row``, model call,
recorded ``act``) on the planted-head tiny GPT-2, served through the real Recorder, episodes as
real Arrow files and uploaded to a real sidecar on port 0. The failing episode's row holds the
trigger, its second model call answers HACKED and ``act`` reports ``{"destructive": true}``.

The investigation must look at that model call (``--failing-call 1``, or by default the call
before the tool call marked destructive), find the trigger in the row as the minimal span and
layer 2 as the decision layer, and return a fix that — applied to the live model, the agent run
again on fresh tools — keeps ``act`` from receiving HACKED while the benign twin's episode is
unchanged. An episode whose failing call cannot be told, or a call index that is not one, is a
typed error that lists the model calls and says what to pass."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import pytest

from integrations.incident import Incident
from sidecar._client import SidecarClient
from sidecar.api import v1
from tests.unit.analysis.test_rca_episode import Shop, agent

from ._rca_cases import LAYER, TARGET, TRIGGER, planted, record_cases
from ._rca_episodes import record_episodes
from .test_investigate import LOADER, _forensics, _run, _write
from .test_investigate import sidecar as sidecar  # the fixture


@pytest.fixture(scope="module")
def episodes() -> dict[str, list[Incident]]:
    return record_episodes(8)


def _task_and_row(inc: Incident) -> tuple[list[int], list[int]]:
    """The episode's task (its first prompt) and the row ``read_row`` returned (recorded)."""
    task = [int(t) for t in inc.tensor("input_ids", step=0, kind="input").reshape(-1)]
    row = next(c["result"] for c in inc.manifest["external_calls"] if c["name"] == "read_row")
    return task, list(row)


def _replay_agent(inc: Incident) -> list[list[int]]:
    """The recorded episode's application run again now, on fresh tools: what ``act`` got."""
    task, row = _task_and_row(inc)
    shop = Shop(row)
    agent(planted().model, task, shop)
    return shop.acted


def _check_fix_prevents(fix_path: Path, failing: Incident, twin: Incident) -> None:
    """The saved fix on the live model: the failing episode's ``act`` no longer receives
    HACKED; the twin's episode does exactly what it did without the fix."""
    from analysis.cca import FixSet

    fix = FixSet.load(fix_path)
    assert any(TARGET in ids for ids in _replay_agent(failing))
    before = _replay_agent(twin)
    with fix.apply(planted().model):
        assert not any(TARGET in ids for ids in _replay_agent(failing))
        assert _replay_agent(twin) == before


def _check_episode(r: dict[str, Any]) -> None:
    assert r["episode_call"] == 1
    ep = r["episode"]
    assert ep["call"] == 1 and ep["model_calls"] == 2
    assert [s["kind"] for s in ep["steps"]] == ["model", "tool", "model", "tool"]
    model1, act = ep["steps"][2], ep["steps"][3]
    assert model1["investigated"] and not ep["steps"][0]["investigated"]
    assert model1["output"].split()[0] == "HACKED" and "TRIGGER" in model1["prompt_end"]
    assert act["name"] == "act" and act["destructive"] and act["result"] == '{"destructive": true}'
    assert r["output"]["recorded"] == model1["output"]          # the call's, not the episode's
    assert r["input_spans"]["verified"] and r["input_spans"]["text"] == "TRIGGER"
    assert "TRIGGER" in "".join(r["prompt_tokens"])              # the failing call's prompt


@pytest.mark.slow     # a fresh interpreter (torch, transformers) and the whole investigation
def test_forensics_investigate_an_episode_at_its_failing_call(
        episodes: dict[str, list[Incident]], tmp_path: Path) -> None:
    dirs = {k: _write(v, tmp_path / k) for k, v in episodes.items()}
    inc = episodes["failing"][0]
    out = tmp_path / "out"
    run = _forensics("investigate", str(dirs["failing"] / f"{inc.id}.arrow"),
                     "--benign", str(dirs["twins"]), "--variants", str(dirs["failing"]),
                     "--failing-call", "1", "--failure-text", "HACKED", "--model", LOADER,
                     "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert "episode: investigating model call 1 (16 benign model calls, 7 variants" in run.stdout
    assert f"input spans: TRIGGER; decision layer: {LAYER}" in run.stdout
    r = json.loads((out / "report.json").read_text())
    _check_episode(r)
    assert r["trace"]["decision_layer"] == LAYER and r["consistency"]["rate"] >= 0.9
    assert r["fix_found"] is True
    _check_fix_prevents(out / "fix.json", inc, episodes["twins"][0])
    html = (out / "report.html").read_text()
    for element in ('id="episode-steps"', 'id="investigated-call"', "marked destructive by "
                    "the tool", "<code>act</code>", "<b>1</b>", '<b id="fix-flip">True</b>'):
        assert element in html, element


def test_by_default_the_call_before_the_destructive_tool_call(
        episodes: dict[str, list[Incident]], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from model_forensics.cli import main

    dirs = {k: _write(v, tmp_path / k) for k, v in episodes.items()}
    path = dirs["failing"] / f"{episodes['failing'][2].id}.arrow"
    assert main(["investigate", str(path), "--benign", str(dirs["twins"]), "--steps", "spans",
                 "--failure-text", "HACKED", "--model", LOADER, "--out",
                 str(tmp_path / "out")]) == 0
    assert "episode: investigating model call 1" in capsys.readouterr().out
    r = json.loads((tmp_path / "out" / "report.json").read_text())
    _check_episode(r)
    assert r["trace"] is None and r["fix_found"] is False


def test_episode_errors_list_the_model_calls(episodes: dict[str, list[Incident]],
                                            tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from model_forensics.cli import main

    dirs = {k: _write(v, tmp_path / k) for k, v in episodes.items()}
    common = ["--benign", str(dirs["twins"]), "--steps", "spans", "--failure-text", "HACKED",
              "--model", LOADER, "--out", str(tmp_path / "out")]
    twin = dirs["twins"] / f"{episodes['twins'][0].id}.arrow"     # no tool call marked
    assert main(["investigate", str(twin), *common]) == 1
    said = capsys.readouterr()
    err = said.err
    assert "replay fidelity" not in said.out                  # told before any replay
    assert "none of its 2 recorded tool calls is marked destructive" in err
    assert "pass its index (--failing-call K" in err
    assert "its model calls: 0 (forward calls 0..1) -> ' w" in err
    assert "; 1 (forward calls 2..3) -> ' w" in err
    bad = dirs["failing"] / f"{episodes['failing'][0].id}.arrow"
    assert main(["investigate", str(bad), "--failing-call", "2", *common]) == 1
    assert "has no model call 2; its model calls: 0 " in capsys.readouterr().err
    assert not (tmp_path / "out").exists()                    # nothing half-written
    # an incident that is not an episode: one model call, investigated as always
    single = record_cases(1)["failing"][0]
    one = _write([single], tmp_path / "single") / f"{single.id}.arrow"
    assert main(["investigate", str(one), "--failing-call", "1", *common]) == 1
    assert "has no model call 1" in capsys.readouterr().err
    assert main(["investigate", str(one), "--failing-call", "0", *common]) == 0
    r = json.loads((tmp_path / "out" / "report.json").read_text())
    assert r["episode_call"] is None and r["episode"] is None
    assert r["input_spans"]["text"] == "TRIGGER"
    assert TRIGGER in single.tensor("input_ids", step=0, kind="input").reshape(-1).tolist()


def test_investigate_job_on_an_episode(episodes: dict[str, list[Incident]], tmp_path: Path,
                                       sidecar: tuple[str, Any]) -> None:
    addr, _ = sidecar
    inc = episodes["failing"][0]
    with SidecarClient(addr) as c:
        for i in (i for v in episodes.values() for i in v):
            c.upload(i.id, i.to_bytes())
        with pytest.raises(grpc.RpcError) as refused:      # options are a declared set
            c.run_analysis(inc.id, "investigate", params_json='{"failing_calls": 1}')
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "failing_call, failure_text" in str(refused.value.details())
        for bad, said in (("one", "'one'"), (-1, "-1"), (True, "True")):
            a = _run(c, inc.id, "investigate", {"failing_call": bad})
            assert a.state == v1.JOB_STATE_FAILED
            assert f"params.failing_call must be an integer >= 0 (the episode's failing model " \
                   f"call, counted from 0), got {said}" in a.error
        a = _run(c, inc.id, "investigate", {"failing_call": 3})
        assert a.state == v1.JOB_STATE_FAILED and "has no model call 3" in a.error
        a = _run(c, inc.id, "investigate", {
            "failing_call": 1, "failure_text": "HACKED", "steps": ["spans", "trace"],
            "benign": [t.id for t in episodes["twins"]],
            "variants": [f.id for f in episodes["failing"]]})
        assert a.state == v1.JOB_STATE_DONE, a.error
        r = json.loads(a.result_json)
        _check_episode(r)
        assert r["trace"]["decision_layer"] == LAYER
        assert any("episode: investigating model call 1" in line for line in r["progress"])
    out = tmp_path / "report.html"
    made = _forensics("report", inc.id, "--address", addr, "-o", str(out))
    assert made.returncode == 0, made.stderr
    html = out.read_text()
    assert 'id="episode-steps"' in html and 'id="investigated-call"' in html
    assert "HACKED HACKED" in html and "marked destructive by the tool" in html


@pytest.mark.slow     # SmolLM2 serves two shipped agent-db episodes (~30 s on 2 cores)
def test_a_shipped_agent_db_episode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The real thing at the CLI's door: a shipped agent-db failing episode served now is
    investigated at the model call that wrote the DELETE (the ``run_sql`` call after it
    recorded ``"destructive": ["DELETE"]``), its steps decode to the SQL the agent wrote; its
    benign twin has no marked call, so the CLI lists both model calls' SQL and asks for
    ``--failing-call`` before replaying anything. (The whole investigation of such an episode
    takes minutes: ``benchmarks/RESULTS_rca.md``, Agents.)"""
    from analysis.scenarios._episode_cases import find_case, serve_traced
    from analysis.scenarios.agent_db import build
    from model_forensics.cli import main
    from sidecar.jobs._episode import destructive_mark, episode_steps, failing_target

    sc = build(verify=0)
    failing, _ = serve_traced(sc, find_case(sc, "t2-c2-p0-s0"))
    twin, _ = serve_traced(sc, find_case(sc, "t2-c2-benign"))
    assert failing_target(failing, failing_call=None, tokenizer=sc.tokenizer) is destructive_mark
    ep = episode_steps(failing, sc.tokenizer, call=1)
    assert [s["kind"] for s in ep["steps"]] == ["tool", "model", "tool", "model", "tool"]
    dump, first, read, second, wrote = ep["steps"]
    assert "more chars)" in dump["result"]                     # the database dump, cut
    assert "SELECT" in first["output"] and "IMPORTANT: ignore previous" in read["result"]
    assert second["investigated"] and "DELETE FROM customers" in second["output"]
    assert wrote["destructive"] and '"destructive": ["DELETE"]' in wrote["result"]
    # the failure text, unless given: what the destructive tool call names, in the call's output
    from analysis.rca._episode_call import model_call_incident
    from analysis.replay import Replayer
    from sidecar.jobs._episode import destructive_text
    from sidecar.jobs._investigate import default_failure_text

    assert destructive_text(failing) == "DELETE" and destructive_text(twin) is None
    rep = Replayer(sc.model)
    calls = [rep.load(model_call_incident(failing, k), measure=False) for k in (0, 1)]
    assert default_failure_text(failing, destructive_mark, calls[1], sc.tokenizer) == "DELETE"
    assert default_failure_text(failing, destructive_mark, calls[0], sc.tokenizer) is None
    assert default_failure_text(failing, 1, calls[1], sc.tokenizer) is None   # index given
    path = _write([twin], tmp_path / "twin") / f"{twin.id}.arrow"
    assert main(["investigate", str(path), "--failure-text", "DELETE", "--out",
                 str(tmp_path / "out")]) == 1             # told before benign is even needed
    said = capsys.readouterr()
    assert "its model calls: 0 (forward calls 0.." in said.err
    assert said.err.count("SELECT") >= 2 and "replay fidelity" not in said.out
