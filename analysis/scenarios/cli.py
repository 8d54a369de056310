"""``forensics scenarios list|run``: the scenario zoo from the command line.

Example::

    forensics scenarios list
    forensics scenarios run planted-gpt2 --out forensics-data/scenarios/planted-gpt2
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add the ``scenarios`` command group to the ``forensics`` parser."""
    p = sub.add_parser("scenarios", help="list the scenario zoo or record a scenario's incidents")
    ss = p.add_subparsers(dest="scenarios_command", metavar="SUBCOMMAND")
    ls = ss.add_parser("list", help="list scenarios")
    ls.set_defaults(func=_list)
    run = ss.add_parser("run", help="serve a scenario's benign and failing cases through the "
                                    "recorder and write one incident per case")
    run.add_argument("name", help="the scenario: one of `forensics scenarios list` (e.g. "
                                  "injection, agent-db, multiturn, tool-misuse, toxic)")
    run.add_argument("--out", help="output directory (default forensics-data/scenarios/NAME)")
    run.add_argument("--benign", type=int, default=20, help="benign cases (default 20)")
    run.add_argument("--failing", type=int, default=10, help="failing cases (default 10)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--sites", nargs="*", help="sites to record (default: config granularity)")
    run.set_defaults(func=_run)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from analysis.scenarios import SCENARIOS

    t = Table(title="Scenarios")
    t.add_column("name")
    t.add_column("model")
    t.add_column("description")
    for s in SCENARIOS.values():
        t.add_row(s.name, "real (offline package)" if s.real_model else "tiny, planted fault",
                  s.description)
    Console().print(t)
    return 0


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from analysis.scenarios import record_scenario

    console = Console()
    out = args.out or f"forensics-data/scenarios/{args.name}"
    with console.status(f"recording {args.name}") as status:
        summary = record_scenario(args.name, out, n_benign=args.benign, n_failing=args.failing,
                                  seed=args.seed, sites=args.sites,
                                  progress=lambda m: status.update(f"{args.name}: {m}"))
    n_fail = sum(r["failed"] for r in summary["cases"])
    console.print(f"{len(summary['cases'])} incidents in {out}/incidents; {n_fail} failed in "
                  f"this run (flagged); agreement with the scenario's expectation "
                  f"{summary['agreement']:.0%}; recorder {summary['recorder']}")
    return 0
