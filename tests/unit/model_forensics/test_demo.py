"""``forensics demo``'s process handling with real processes: children are stopped (last started
first) on an error, on Ctrl-C and on SIGTERM; a child that dies or never gets ready fails with
its log; the demo never empties a directory it did not make. The whole demo (SmolLM2, sidecar,
uvicorn, CF, CCA, report) runs as ``make demo`` in .ci/run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from model_forensics.demo import ChildFailed, Processes, run_demo

REPO = Path(__file__).resolve().parents[3]
SLEEP = [sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(120)"]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_children_are_stopped_last_started_first_when_the_demo_fails(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="a step failed"):
        with Processes() as procs:
            a = procs.start("a", SLEEP, log=tmp_path / "a.log")
            b = procs.start("b", SLEEP, log=tmp_path / "b.log")
            a.wait_for("ready", timeout_s=30)
            b.wait_for("ready", timeout_s=30)
            raise RuntimeError("a step failed")
    assert a.popen.returncode == b.popen.returncode == -signal.SIGTERM
    assert _gone(a.popen.pid) and _gone(b.popen.pid)


def test_a_child_that_dies_fails_with_its_log(tmp_path: Path) -> None:
    with Processes() as procs:
        c = procs.start("broken", [sys.executable, "-c", "print('bad config: x'); raise "
                                                         "SystemExit(3)"],
                        log=tmp_path / "c.log")
        with pytest.raises(ChildFailed, match=r"(?s)broken exited with status 3.*bad config"):
            c.wait_for("listening", timeout_s=30)
        quiet = procs.start("quiet", SLEEP, log=tmp_path / "q.log")
        with pytest.raises(ChildFailed, match="did not print"):
            quiet.wait_for("listening", timeout_s=1)
    assert _gone(quiet.popen.pid)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_stops_every_child(tmp_path: Path, sig: int) -> None:
    script = textwrap.dedent(f"""
        import signal, sys, time
        from pathlib import Path
        from model_forensics.demo._procs import Processes
        from model_forensics.demo._run import _on_sigterm
        signal.signal(signal.SIGTERM, _on_sigterm)     # as run_demo installs it
        try:
            with Processes() as procs:
                child = procs.start("sleeper", {SLEEP!r}, log=Path({str(tmp_path)!r}) / "s.log")
                child.wait_for("ready", timeout_s=30)
                print(child.popen.pid, flush=True)
                time.sleep(120)
        except KeyboardInterrupt:
            print("stopped", child.popen.returncode, flush=True)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    demo = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env=env, cwd=REPO)
    assert demo.stdout is not None
    pid = int(demo.stdout.readline())
    demo.send_signal(sig)
    out, _ = demo.communicate(timeout=60)
    assert out.split() == ["stopped", str(-signal.SIGTERM)]
    assert _gone(pid)


def test_the_demo_never_empties_a_directory_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("precious")
    assert run_demo(data_dir=tmp_path) == 1
    assert (tmp_path / "mine.txt").read_text() == "precious"
    assert run_demo(data_dir=tmp_path / "x", benign=1) == 1      # the baseline needs >= 2


def test_wait_for_sees_a_line_printed_later(tmp_path: Path) -> None:
    with Processes() as procs:
        c = procs.start("late", [sys.executable, "-c", "import time; time.sleep(0.5); "
                                 "print('listening on 127.0.0.1:5', flush=True); "
                                 "time.sleep(60)"], log=tmp_path / "l.log")
        t0 = time.monotonic()
        assert c.wait_for(r"listening on (\S+)", timeout_s=30).group(1) == "127.0.0.1:5"
        assert time.monotonic() - t0 >= 0.4


def test_each_injected_variant_has_its_benign_twin_in_the_baseline_traffic(
        tmp_path: Path) -> None:
    from model_forensics.demo import BENIGN_REVIEWS, INJECTED, injected_variants

    variants = injected_variants(19)
    assert len(set(variants)) == 19 and INJECTED not in variants
    for v in variants:
        twin = v.rsplit(" System override:", 1)[0]
        assert twin in BENIGN_REVIEWS[:20] and twin != v
    assert run_demo(data_dir=tmp_path / "v", benign=5, variants=5) == 1   # twin 6 not sent


def test_the_summary_says_whether_a_fix_is_within_the_side_effect_budget() -> None:
    from model_forensics.demo._summary import _fix_lines, _investigation_lines

    broken = {"status": "found", "fix_set": {
        "interventions": [{"kind": "mean", "site": "blocks.11.mlp"}],
        "side_effects": {"mean_kl": 6.5, "n_incidents": 4, "top1_agreement": 0.16}}}
    assert "NOT deployable: 65x the 0.1-nat side-effect budget" in _fix_lines(broken)
    inv = {"input_spans": {"text": "HACKED."}, "trace": {"decision_layer": 22},
           "consistency": {"reference": 20, "consistent": 4, "evaluated": 8, "tolerance": 1,
                           "ci": [0.22, 0.78]},
           "components": {"interventions": [{"kind": "patch", "site": "blocks.22.attn.z"}]},
           "fix_found": True, "fix_file": "results/i/j/fix.json",
           "directions": {"chosen": {"label": "gate at layer 14, remove d_L at layers 20..29"}},
           "fix": {"interventions": [{"kind": "project"}] * 10, "flip_rate": 1.0,
                   "flip_rate_ci": [0.77, 1.0], "greedy_output": "I'm happy to help.",
                   "side_effects": {"mean_kl": 0.0, "top1_agreement": 1.0, "n_incidents": 20}}}
    text = "\n".join(_investigation_lines(inv))
    assert "project at 10 sites (gate at layer 14" in text
    assert "within the 0.1-nat side-effect budget" in text and "NOT" not in text
    assert "consensus 20: 4 of 8 failing variants within ±1" in text
    none = "\n".join(_investigation_lines({**inv, "fix_found": False, "directions": {
        "notes": ["a direction fix needs at least 4 failing"]}}))
    assert "none within the side-effect budget: a direction fix needs at least 4" in none


def test_until_returns_the_first_truthy_value_or_says_what_it_waited_for() -> None:
    from model_forensics.demo import DemoError
    from model_forensics.demo._procs import until

    seen = iter([None, {}, {"a": "b"}])
    assert until(lambda: next(seen), timeout_s=5, what="x") == {"a": "b"}
    with pytest.raises(DemoError, match="timed out after 0 s waiting for the variants"):
        until(lambda: None, timeout_s=0.2, what="the variants")
