"""``forensics investigate``: why one failing incident failed, and a fix you could deploy —
DESIGN §14 on local files (the sidecar runs the same as the ``investigate`` job kind).

The model is the incident's (the in-process registry, ``analysis.registry``: SmolLM2 and
MiniLM built in, matched by the manifest's fingerprint, else its name), or ``--model`` — a
registered name or alias (``smollm2``), or a ``package.module:function`` loader returning
``(model, tokenizer)`` like the sidecar's ``models:`` entries. Incidents come from directories
of ``.arrow`` files. Progress is printed as the investigation goes; the output directory gets
``report.json`` (the investigation), ``fix.json`` + ``fix.safetensors`` when a deployable fix
was found (``FixSet.load``, ``with fix.apply(model):``) and ``report.html``. An episode (an
agent loop with recorded tool calls, DESIGN §15) is investigated at its failing model call:
``--failing-call K``, else the call before the tool call its tool marked destructive
(:mod:`sidecar.jobs._episode`); the report shows the episode's steps.

Example::

    forensics investigate failing/inc-1.arrow --benign benign/ --contrast controls/ \\
        --variants failing/ --failure-text HACKED --model smollm2 --out out/
    forensics investigate agent/ep-1.arrow --benign agent-benign/ --failing-call 1 \\
        --failure-text DELETE --steps spans,directions --out out/
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

__all__ = ["load_model", "read_incidents", "register_investigate"]


def register_investigate(subparsers: Any) -> None:
    """Add the ``investigate`` command to an argparse sub-parser set."""
    from .jobs._investigate import STEPS

    p = subparsers.add_parser(
        "investigate", help="investigate a failing incident file: input spans, causal trace "
                            "and decision layer, components, a deployable fix (JSON + HTML)")
    p.add_argument("incident", help="the failing incident (.arrow)")
    p.add_argument("--benign", metavar="DIR", help="benign incidents (.arrow), among them the "
                                                   "incident's benign twin")
    p.add_argument("--contrast", metavar="DIR",
                   help="incidents with the same kind of input that did not fail")
    p.add_argument("--variants", metavar="DIR", help="other failing incidents (the incident "
                                                     "itself is skipped if there)")
    p.add_argument("--failure-text", metavar="TEXT",
                   help="the failing text of the output (default: from the flag reason, e.g. "
                        "prompt_injection -> HACKED; for an episode, what its destructive tool "
                        "call names, e.g. DELETE)")
    p.add_argument("--model", metavar="NAME|MODULE:FUNCTION",
                   help="registered model name/alias (smollm2, minilm) or a loader returning "
                        "(model, tokenizer); default: the incident's model")
    p.add_argument("--steps", default=",".join(STEPS),
                   help=f"comma-separated subset of {','.join(STEPS)} (default: all)")
    p.add_argument("--budget-kl", type=float, default=0.1, metavar="NATS",
                   help="side-effect budget: mean KL on benign prompts (default 0.1)")
    p.add_argument("--max-variants", type=int, default=20)
    p.add_argument("--failing-call", type=int, metavar="K",
                   help="an episode's failing model call, counted from 0, here and in each "
                        "variant (default: in each episode the one before the tool call its "
                        "tool marked destructive, or the only one)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.set_defaults(func=_cmd_investigate)


def _loader(spec: str) -> tuple[Any, Any]:
    from .jobs._investigate import ModelNotRegisteredError

    module_name, _, fn_name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ModelNotRegisteredError(f"--model {spec}: cannot import the loader ({e}); give "
                                      "package.module:function") from e
    got = fn()
    return (got[0], got[1] if len(got) > 1 else None) if isinstance(got, tuple) else (got, None)


def load_model(choice: str | None, incident: Any) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for ``--model`` (module doc), else the incident's model."""
    from analysis import registry

    from .jobs._investigate import ModelNotRegisteredError

    if choice and ":" in choice:
        model, tok = _loader(choice)
    else:
        ref = incident.manifest.get("model") or {}
        name, fp = (choice, None) if choice else (ref.get("name"), ref.get("fingerprint"))
        entry = registry._find(name, fp)   # the registry has no public (model, tokenizer) call
        if entry is None:
            what = f"--model {choice!r} is" if choice else \
                f"the incident's model {ref.get('name')!r} is"
            raise ModelNotRegisteredError(
                f"{what} not registered (registered: {', '.join(registry.registered())}): pass "
                "--model smollm2 / minilm, or --model package.module:function (a loader "
                "returning (model, tokenizer))")
        model, tok = entry.load(), entry.tokenizer
    if hasattr(model, "eval"):
        model.eval()
    return model, tok


def read_incidents(directory: str | None, what: str, *, skip: str | None = None) -> list[Any]:
    """Every ``.arrow`` incident in ``directory`` (validated), except the one with id ``skip``."""
    from integrations.incident import Incident

    from .jobs._investigate import NoBenignIncidentsError

    if directory is None:
        return []
    d = Path(directory)
    if not d.is_dir():
        raise NoBenignIncidentsError(f"--{what} {directory}: not a directory of .arrow "
                                     "incident files")
    found = [Incident.open(p) for p in sorted(d.glob("*.arrow"))]
    return [i for i in found if i.id != skip]


def _say(line: str) -> None:
    print(line, flush=True)


def _cmd_investigate(args: argparse.Namespace) -> int:
    from analysis.replay import Replayer
    from integrations.incident import Incident

    from .jobs._episode import failing_target
    from .jobs._investigate import (
        NoBenignIncidentsError,
        investigation_result,
        run_investigation,
        save_outputs,
    )

    inc = Incident.open(args.incident)
    inputs = {k: read_incidents(getattr(args, k), k, skip=inc.id)
              for k in ("benign", "contrast", "variants")}
    if args.benign is not None and not inputs["benign"]:
        raise NoBenignIncidentsError(f"--benign {args.benign}: no .arrow incident in it")
    model, tok = load_model(args.model, inc)
    failing_target(inc, failing_call=args.failing_call, tokenizer=tok)   # before any replay
    _say(f"incident {inc.id}: model {(inc.manifest.get('model') or {}).get('name')}, "
         + ", ".join(f"{len(v)} {k}" for k, v in inputs.items()))
    session = Replayer(model).load(inc)
    fid = session.fidelity()
    _say(f"replay fidelity: exact {fid.exact}, max |diff| {fid.max_abs_diff:.3g}")
    rep = run_investigation(session, tok, **inputs, failure_text=args.failure_text,
                            steps=[s.strip() for s in args.steps.split(",") if s.strip()],
                            budget_kl=args.budget_kl, max_variants=args.max_variants,
                            progress=_say, failing_call=args.failing_call)
    result = investigation_result(rep, session, tok,
                                  inputs={k: len(v) for k, v in inputs.items()})
    out = Path(args.out)
    paths = save_outputs(rep, result, out)
    if "fix" in paths:
        result["fix_file"] = str(paths["fix"])
    paths["html"] = _write_html(inc, result, out, source=args.incident)
    _summary(rep, result, paths)
    return 0


def _write_html(inc: Any, result: dict[str, Any], out: Path, *, source: str) -> Path:
    """``report.html``: the incident, the investigation's sections, the links."""
    from integrations.incident import atomic_write

    from .report import ReportData, default_sections, investigation_sections, render_report

    base = {s.id: s for s in default_sections()}
    sections = [base["manifest"], base["content"], base["episode"], *investigation_sections(),
                base["links"]]
    data = ReportData(incident_id=inc.id, manifest=inc.manifest,
                      facts={"activations": inc.manifest.get("activations"),
                             "n_sites": len(inc.sites("activation"))},
                      results={"investigate": result}, source=f"forensics investigate {source}")
    path = out / "report.html"
    atomic_write(path, render_report(data, sections=sections).encode("utf-8"))
    return path


def _summary(rep: Any, result: dict[str, Any], paths: dict[str, Path]) -> None:
    spans = rep.input_spans.text if rep.input_spans is not None else "—"
    layer = rep.trace.decision_layer if rep.trace is not None else "—"
    if rep.span_trace is not None:
        layer = f"{rep.span_trace.decision_layer} from the span (read out from layer {layer})"
        sc = rep.span_consistency
        if sc is not None and sc.evaluated:
            layer += (f"; {sc.consistent} of {sc.evaluated} variants within ±{sc.tolerance} of "
                      f"layer {sc.reference}")
    _say(f"input spans: {spans}; decision layer: {layer}")
    if result.get("fix_found"):
        fx = rep.fix
        se = fx.side_effects
        kl = f"; benign mean KL {se.mean_kl:.3g} nats" if se is not None else ""
        _say(f"fix: {len(fx.interventions)} interventions, flips the incident: {fx.flip}, "
             f"greedy output with it: {fx.greedy_output!r}{kl}")
    else:
        _say("no deployable fix within the side-effect budget")
    for note in rep.notes:
        print(f"note: {note}", file=sys.stderr)
    for key, path in paths.items():
        _say(f"wrote {key}: {path}")
