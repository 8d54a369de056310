"""``forensics report``: write an incident's HTML report — from a sidecar over gRPC, or from an
incident file and its results — and optionally the index page of the report's folder.

Example::

    forensics report <id> -o reports/<id>.html --index      # + reports/index.html
    forensics report --incident inc.arrow --results show.json -o report.html
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ._cli_common import client, client_args, rpc

__all__ = ["default_report_name", "register_report"]


def default_report_name(incident_id: str, *, tenant: str | None) -> str:
    """The report's file name when ``-o`` is not given: ``<id>.html``, or with a tenant named
    (admins: ids are unique per tenant only) ``<tenant dir>.<id>.html`` — the tenant as the store
    names its directory (``t-acme``, or ``x-<sha256>`` for a name that is not a plain one), never
    the raw name as a path.

    Example::

        default_report_name("inc-1", tenant=None)     # 'inc-1.html'
        default_report_name("inc-1", tenant="acme")   # 't-acme.inc-1.html'
    """
    from ._store_layout import tenant_dir

    return f"{incident_id}.html" if tenant is None else f"{tenant_dir(tenant)}.{incident_id}.html"


def register_report(subparsers: Any) -> None:
    """Add the ``report`` command to an argparse sub-parser set."""
    p = subparsers.add_parser(
        "report", help="write an incident's self-contained HTML report (from the sidecar, or "
                       "from --incident FILE.arrow [--results FILE.json])")
    client_args(p)
    p.add_argument("incident_id", nargs="?", help="incident id in the sidecar")
    p.add_argument("--incident", metavar="FILE", help="an incident .arrow file instead")
    p.add_argument("--results", metavar="FILE",
                   help="with --incident: analysis results as JSON ({kind: result}, or the "
                        "output of `forensics incidents show --json`)")
    p.add_argument("-o", "--output", help="HTML file to write (default ./<id>.html; with "
                                           "--tenant ./<tenant dir>.<id>.html, so an admin's "
                                           "reports of two tenants' same id never overwrite)")
    p.add_argument("--trace-url", help="link template for the trace id, e.g. "
                                       "http://localhost:16686/trace/{trace_id}")
    p.add_argument("--index", action="store_true",
                   help="also (re)write index.html listing the reports in the output folder")
    p.set_defaults(func=rpc(_cmd_report))


def _cmd_report(args: argparse.Namespace) -> int:
    from integrations.incident import atomic_write

    from .report import data_from_files, data_from_sidecar, render_report, write_index

    if (args.incident_id is None) == (args.incident is None):
        print("forensics report: give an incident id (sidecar) or --incident FILE",
              file=sys.stderr)
        return 2
    if args.incident is not None:
        data = data_from_files(args.incident, args.results)
    else:
        with client(args) as c:
            data = data_from_sidecar(c, args.incident_id)
    out = Path(args.output or default_report_name(data.incident_id,
                                                  tenant=getattr(args, "tenant", None)))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, render_report(data, trace_url=args.trace_url).encode("utf-8"))
    print(f"wrote {out}")
    if args.index:
        print(f"wrote {write_index(out.parent)}")
    return 0
