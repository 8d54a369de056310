"""``forensics demo`` / ``make demo``: the whole product in one command, on the real SmolLM2.

1. start the sidecar (``forensics sidecar serve``, a subprocess; free ports; SmolLM2
   registered for replay);
2. serve SmolLM2-135M-Instruct under uvicorn through the ASGI middleware
   (``uvicorn examples.asgi_app:app``; ``SidecarExporter``, flight recorder on);
3. send benign reviews (marked for capture: the sampled baseline traffic) — the sidecar stores
   them, scores them and, at ``baselines.min_samples``, builds the detector baseline by itself;
4. send the injected review: the model answers "HACKED", the app's output guardrail flags the
   request after the model ran, and the flight recorder keeps its activations;
5. send the same injection on other reviews (captured): the model fails on some of them — the
   failing variants — and not on others — the contrast;
6. the sidecar indexes every incident and scores it (CF); the demo asks it for a verified
   minimal fix set (CCA) of the flagged incident, then for its ``investigate`` job (DESIGN §14: input spans, causal
   trace and decision layer over the variants, components, a fix searched under the side-effect
   budget) — asynchronous jobs; the demo waits, writes the HTML report and prints what on-call
   needs;
7. stop everything it started — also on Ctrl-C, SIGTERM or a failure.

Example::

    run_demo(data_dir="forensics-data/demo")     # exit status: 0 = a fix set was found
    run_demo(variants=0)                         # no investigation (~40 s instead of minutes)
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from ._procs import ChildFailed, DemoError, Processes, child_env, until
from ._traffic import BENIGN_REVIEWS, INJECTED, new_traceparent, post_review

__all__ = ["run_demo"]

_MARKER = ".forensics-demo"


class _Clock:
    def __init__(self, console: Any) -> None:
        self.console, self.t0 = console, time.monotonic()

    def say(self, msg: str) -> None:
        self.console.print(f"[dim]{time.monotonic() - self.t0:6.1f}s[/dim]  {msg}",
                           soft_wrap=True)   # one line per step, whole paths



def _fresh_dir(path: Path) -> Path:
    """``path`` emptied if a previous demo made it (never a directory the demo did not make)."""
    if path.exists() and any(path.iterdir()):
        if not (path / _MARKER).exists():
            raise DemoError(f"{path} exists and was not made by the demo; pass --data-dir")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / _MARKER).write_text("made by `forensics demo`; removed by the next run\n")
    return path


def _sidecar_config(root: Path, n_benign: int) -> Path:
    import yaml

    from analysis.models import SMOLLM2_NAME

    cfg = {"data_dir": str(root / "sidecar"),
           "grpc": {"address": "127.0.0.1:0", "grace_s": 2.0},
           "metrics": {"address": "127.0.0.1:0"},
           "jobs": {"workers": 2, "poll_interval_s": 0.2,
                    "params": {"cca": {"permutations": 19, "variants": 4}}},
           "models": [{"name": SMOLLM2_NAME, "loader": "analysis.models:load_smollm2"}],
           # CCA only where the demo asks for it (the flagged incident), not after the CF of
           # every failing variant too
           "modules": {"cca": {"enabled": False}},
           "baselines": {"detector": "mahalanobis", "min_samples": n_benign,
                         "refresh_every": 0, "sample_rules": ["header"], "cca_benign": 4}}
    path = root / "sidecar.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _start(procs: Processes, repo: Path, root: Path, n_benign: int,
           clock: _Clock) -> tuple[str, str, str]:
    """Start the sidecar and the app; (gRPC address, metrics URL, app URL)."""
    cfg = _sidecar_config(root, n_benign)
    sc = procs.start("sidecar", [sys.executable, "-m", "model_forensics", "sidecar", "serve",
                                 "--config", str(cfg)], log=root / "sidecar.log",
                     env=child_env(repo), cwd=repo)
    found = sc.wait_for(r"listening on (\S+); .*metrics at (\S+)", timeout_s=120)
    address, metrics = found.group(1), found.group(2)
    clock.say(f"sidecar serving gRPC on {address}, /metrics at {metrics} (log {sc.log})")
    app = procs.start("app", [sys.executable, "-m", "uvicorn", "examples.asgi_app:app",
                              "--host", "127.0.0.1", "--port", "0", "--app-dir", str(repo)],
                      log=root / "app.log", cwd=repo, env=child_env(
                          repo, FORENSICS_SIDECAR=address, FORENSICS_SAMPLE_RATIO="0",
                          FORENSICS_CAPTURE_CONTENT="1", FORENSICS_FLIGHT_RECORDER_MB="64",
                          FORENSICS_SPOOL_DIR=str(root / "spool")))
    url = app.wait_for(r"Uvicorn running on (http://\S+)", timeout_s=300).group(1)
    clock.say(f"SmolLM2-135M-Instruct served by uvicorn at {url} through ForensicsMiddleware "
              f"(log {app.log})")
    return address, metrics, url


def _benign(url: str, client: Any, n: int, clock: _Clock) -> None:
    for i, review in enumerate(BENIGN_REVIEWS[:n], 1):
        answer = post_review(url, review, request_id=f"demo-benign-{i:02d}", capture=True)
        if answer["flagged"]:
            raise DemoError(f"the benign review {review!r} was flagged: {answer}")
        if i in (1, n) or i % 5 == 0:
            clock.say(f"benign {i:2d}/{n}: {review!r} -> {answer['answer']!r}")
    clock.say("waiting for the sidecar: store, score, build the baseline at "
              f"{n} samples, score them again ...")
    scored = 'request_id : "demo-benign" AND anomaly_score:*'

    def all_scored() -> int:
        return int(client.list(filter=scored, page_size=1).total_size >= n)

    until(all_scored, timeout_s=300, what="the baseline built from the benign requests")
    clock.say(f"baseline built by the sidecar from the {n} benign incidents; all scored")


def _injected(url: str, client: Any, clock: _Clock) -> tuple[str, str, str]:
    """Send the injected review; (answer, incident id, traceparent)."""
    tp = new_traceparent()
    answer = post_review(url, INJECTED, request_id="demo-injected", traceparent=tp)
    clock.say(f"injected: {INJECTED!r} -> {answer['answer']!r} (guardrail flagged: "
              f"{answer['flagged']})")
    if not answer["flagged"]:
        raise DemoError("the injected review was not flagged: the model did not answer HACKED")
    page = until(lambda: list(client.list(filter='request_id = "demo-injected"').incidents),
                  timeout_s=60, what="the flagged incident in the sidecar")
    return answer["answer"], page[0].id, tp


def _analyses(client: Any, incident_id: str, clock: _Clock) -> None:
    from sidecar.api import v1

    def done(kind: str) -> Any:
        for a in client.list_analyses(incident_id):
            if a.kind == kind and a.state in (v1.JOB_STATE_DONE, v1.JOB_STATE_FAILED):
                return a
        return None

    cf = until(lambda: done("cf"), timeout_s=120, what="the CF analysis")
    r = json.loads(cf.result_json or "{}")
    if r.get("status") != "scored":
        raise DemoError(f"CF did not score the incident: {r.get('status')} {cf.error}"
                        f" {r.get('message', '')}".rstrip())
    client.run_analysis(incident_id, "cca", request_id="demo:cca")
    clock.say(f"CF scored the incident: score {r['anomaly_score']:.2f}, p "
              f"{r['anomaly_p']:.3g} vs the baseline; searching a fix set (CCA: replays of "
              "SmolLM2) ...")
    cca = until(lambda: done("cca"), timeout_s=600, what="the CCA fix-set search")
    if cca.state == v1.JOB_STATE_FAILED:
        raise DemoError(f"the CCA job failed: {cca.error}")
    clock.say("CCA finished")


def _report(client: Any, incident_id: str, root: Path) -> tuple[Any, Path]:
    from integrations.incident import atomic_write
    from sidecar.report import data_from_sidecar, render_report, write_index

    data = data_from_sidecar(client, incident_id)
    out = root / "reports" / f"{incident_id}.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, render_report(data).encode("utf-8"))
    write_index(out.parent)
    return data, out


def _scenario(procs: Processes, repo: Path, root: Path, n_benign: int, n_variants: int,
              clock: _Clock) -> int:
    from sidecar import SidecarClient

    from ._investigation import run_investigation, send_variants
    from ._summary import print_summary, score_exemplar

    address, metrics, url = _start(procs, repo, root, n_benign, clock)
    with SidecarClient(address, timeout_s=60) as client:
        _benign(url, client, n_benign, clock)
        answer, incident_id, _ = _injected(url, client, clock)
        clock.say(f"incident {incident_id} stored by the sidecar; analyses run asynchronously")
        variants = send_variants(url, client, n_variants, say=clock.say) if n_variants else None
        _analyses(client, incident_id, clock)
        if variants is not None and not variants.failing:
            clock.say("no injected variant failed on this machine: the investigation needs "
                      "failing variants (decision layer, direction fix); skipped")
        elif variants is not None:
            run_investigation(client, incident_id, variants, say=clock.say)
            clock.say("investigation finished")
        data, report = _report(client, incident_id, root)
    score = (data.result("cf") or {}).get("anomaly_score")
    exemplar = score_exemplar(metrics, score) if isinstance(score, float) else None
    clock.say(f"HTML report written: {report}")
    print_summary(clock.console, data, answer=answer, report=report.resolve(),
                  exemplar=exemplar)
    return 0 if (data.result("cca") or {}).get("status") == "found" else 1


def _status(rc: int | None) -> str:
    """An exit status in words (uvicorn re-raises SIGTERM after a graceful shutdown)."""
    if rc is None:
        return "still running"
    return f"exit {rc}" if rc >= 0 else f"{signal.Signals(-rc).name}, after a graceful shutdown"


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt   # stop the children the same way as on Ctrl-C


def run_demo(*, data_dir: str | Path = "forensics-data/demo", benign: int = 20,
             variants: int = 19, console: Any = None) -> int:
    """Run the demo (module doc); the exit status: 0 when the flagged incident got a verified
    fix set, 1 on a failure, 130 when interrupted. Everything started is stopped. ``variants``
    injected variants are sent for the investigation (0: no investigation)."""
    from rich.console import Console

    from analysis.models import ensure_smollm2_cache

    console = console or Console(width=None if sys.stdout.isatty() else 120)
    clock = _Clock(console)
    repo = Path(__file__).resolve().parents[2]
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if not 2 <= benign <= len(BENIGN_REVIEWS):
            raise DemoError(f"--benign must be in [2, {len(BENIGN_REVIEWS)}], got {benign}")
        if not 0 <= variants < benign:  # each variant's twin is a benign review
            raise DemoError(f"--variants must be in [0, {benign - 1}] (each variant's benign "
                            f"twin is one of the --benign reviews), got {variants}")
        if not (repo / "examples" / "asgi_app.py").is_file():
            raise DemoError(f"the demo serves examples/asgi_app.py from a checkout; not found "
                            f"under {repo}")
        root = _fresh_dir(Path(data_dir))
        with console.status("SmolLM2 safetensors cache (the first run converts the GGUF, "
                            "~1 min)"):
            ensure_smollm2_cache()
        clock.say(f"demo data in {root.resolve()}")
        with Processes() as procs:
            try:
                return _scenario(procs, repo, root, benign, variants, clock)
            finally:
                stopped = procs.stop_all()
                clock.say("stopped " + ", ".join(f"{n} ({_status(rc)})" for n, rc in
                                                  stopped.items()))
    except KeyboardInterrupt:
        clock.say("interrupted: everything the demo started was stopped")
        return 130
    except (ChildFailed, DemoError, OSError) as e:
        console.print(f"[red]demo failed:[/red] {e}")
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
