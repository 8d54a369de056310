"""``forensics replay``: replay an incident file on its model and print the measured fidelity.

Example::

    forensics replay forensics-data/demo/incidents/<id>.arrow
    forensics replay inc.arrow --allow-fingerprint-mismatch --json

The model comes from :mod:`analysis.registry` (the manifest's fingerprint, else its name;
SmolLM2 and MiniLM are built in). Exit status: 0 only if the replay is bit-exact, 1 otherwise
(errors included).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add the ``replay`` command to the ``forensics`` CLI's sub-parsers."""
    p = subparsers.add_parser(
        "replay", help="replay an incident deterministically and print its fidelity "
                       "(exit 0 only if bit-exact)")
    p.add_argument("incident", help="path of an incident .arrow file")
    p.add_argument("--allow-fingerprint-mismatch", action="store_true",
                   help="replay even if the model's weights differ from the recorded ones "
                        "(the override is reported)")
    p.add_argument("--json", action="store_true", help="print the fidelity as JSON")
    p.add_argument("--materialize", metavar="OUT",
                   help="also write a complete incident with replayed activations to OUT")
    p.add_argument("--sites", nargs="*", default=None,
                   help="sites to materialise (default: the recorder granularity)")
    p.set_defaults(func=_cmd_replay)


def _cmd_replay(args: argparse.Namespace) -> int:
    from analysis.registry import model_for_incident
    from analysis.replay import Replayer
    from integrations.incident import Incident

    inc = Incident.open(args.incident)
    model = model_for_incident(inc)
    session = Replayer(model, allow_fingerprint_mismatch=args.allow_fingerprint_mismatch) \
        .load(inc)
    fid = session.fidelity()
    if args.materialize:
        out = session.materialize(args.sites)
        out.write(args.materialize)
    if args.json:
        print(json.dumps({"incident": inc.id, "fingerprint": session.fingerprint_check,
                          "counts": session.counts(), "fidelity": fid.to_dict()}, indent=2))
    else:
        _print_table(inc.id, session, fid)
    return 0 if fid.exact else 1


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def _print_table(incident_id: str, session: Any, fid: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title=f"replay fidelity — incident {incident_id}")
    t.add_column("site")
    t.add_column("exact")
    t.add_column("max |diff|", justify="right")
    for site, v in sorted(fid.per_site.items()):
        t.add_row(site, "yes" if v["exact"] else "[red]NO[/red]", _fmt(v["max_abs_diff"]))
    if fid.logits is not None:
        t.add_row("logits", "yes" if fid.logits["exact"] else "[red]NO[/red]",
                  _fmt(fid.logits["max_abs_diff"]))
    console.print(t)
    check = session.fingerprint_check
    fp = "match" if check["match"] else "[yellow]MISMATCH (overridden)[/yellow]"
    console.print(f"mode {fid.mode}, steps {fid.steps_compared}, sites {fid.sites_compared}, "
                  f"compared {', '.join(fid.compared) or 'nothing'}; fingerprint {fp}")
    console.print(f"top-1 agreement {_fmt(fid.top1_agreement)}, token agreement "
                  f"{_fmt(fid.token_agreement)}, max |diff| {_fmt(fid.max_abs_diff)}")
    for note in fid.notes:
        console.print(f"note: {note}")
    verdict = "[green]EXACT[/green]" if fid.exact else "[red]NOT EXACT[/red]"
    console.print(f"replay: {verdict}")
