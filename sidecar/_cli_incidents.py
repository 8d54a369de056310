"""``forensics incidents …``: list, show, push, download, delete and analyze incidents stored in
a sidecar (gRPC client commands).

``list`` prints a table on a terminal and tab-separated lines with full ids when piped
(``--json``: one JSON object per incident, streamed page by page). ``push`` uploads incident
files (``.arrow``) someone recorded elsewhere (an ``ArrowFileExporter`` directory, a download).

Example::

    forensics incidents list --filter "anomaly_p <= 0.05" --order-by "anomaly_score desc"
    forensics incidents list --filter 'failure_p >= 0.9 AND trigger_rule != "flag"'
    forensics incidents list --json --all | head -3
    forensics incidents push forensics-data/examples/asgi/*.arrow
    forensics incidents show <id>
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ._cli_common import client, client_args, emit_json, incident_dict, rpc, ts, wait_job

__all__ = ["LIST_COLUMNS", "register_incidents"]

#: The columns of ``incidents list`` (the header of its piped, tab-separated form).
LIST_COLUMNS = ("id", "tenant", "created", "model", "trigger", "anomaly_score", "anomaly_p",
                "failure_p", "sites", "size_bytes")


def register_incidents(subparsers: Any) -> None:
    """Add the ``incidents`` command group to an argparse sub-parser set."""
    inc = subparsers.add_parser("incidents", help="query incidents stored in a sidecar")
    incs = inc.add_subparsers(dest="incidents_command", metavar="COMMAND", required=True)
    ls = incs.add_parser("list", help="list incidents (AIP-160 filter, order_by)")
    client_args(ls)
    ls.add_argument("--filter", default="", help='e.g. tenant = "acme" AND anomaly_p <= 0.05')
    ls.add_argument("--order-by", default="", help='e.g. "anomaly_score desc"')
    ls.add_argument("--page-size", type=int, default=50)
    ls.add_argument("--page-token", default="")
    ls.add_argument("--all", action="store_true", help="follow page tokens to the end")
    ls.add_argument("--json", action="store_true", help="print JSON lines")
    ls.set_defaults(func=rpc(_cmd_list))
    show = incs.add_parser("show", help="show one incident with its manifest and analyses")
    client_args(show)
    show.add_argument("incident_id")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=rpc(_cmd_show))
    push = incs.add_parser("push", help="upload incident files (.arrow) to the sidecar")
    client_args(push)
    push.add_argument("files", nargs="+", metavar="FILE")
    push.set_defaults(func=rpc(_cmd_push))
    dl = incs.add_parser("download", help="download an incident's Arrow file")
    client_args(dl)
    dl.add_argument("incident_id")
    dl.add_argument("-o", "--output", help="file to write (default ./<id>.arrow)")
    dl.set_defaults(func=rpc(_cmd_download))
    rm = incs.add_parser("delete", help="delete an incident, its file and its analyses")
    client_args(rm)
    rm.add_argument("incident_id")
    rm.set_defaults(func=rpc(_cmd_delete))
    an = incs.add_parser("analyze", help="run an analysis job (stats, replay, cf, cca, ...)")
    client_args(an)
    an.add_argument("incident_id")
    an.add_argument("--kind", default="stats")
    an.add_argument("--params", default="", help="job parameters as a JSON object")
    an.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                    help="poll until the job finishes (0 = return at once)")
    an.set_defaults(func=rpc(_cmd_analyze))


def _num(msg: Any, field: str, fmt: str) -> str:
    return format(getattr(msg, field), fmt) if msg.HasField(field) else ""


def _cells(i: Any) -> list[str]:
    return [i.id, i.tenant, ts(i, "created_at"), i.model_name,
            f"{i.trigger_rule}:{i.trigger_reason}", _num(i, "anomaly_score", ".2f"),
            _num(i, "anomaly_p", ".3g"), _num(i, "failure_p", ".3f"), str(i.n_sites),
            str(i.size_bytes)]


def _pages(c: Any, args: argparse.Namespace) -> Iterator[tuple[list[Any], str, int]]:
    """(incidents, next page token, total) per page: one page, or every page with ``--all``."""
    token = args.page_token
    while True:
        page = c.list(filter=args.filter, order_by=args.order_by, page_size=args.page_size,
                      page_token=token)
        yield list(page.incidents), page.next_page_token, page.total_size
        token = page.next_page_token
        if not (args.all and token):
            return


def _cmd_list(args: argparse.Namespace) -> int:
    with client(args) as c:
        if args.json:          # streamed: each page is printed as it arrives
            for page, _, _ in _pages(c, args):
                for i in page:
                    emit_json(incident_dict(i))
            return 0
        items: list[Any] = []
        next_token, total = "", 0
        for listed, token, count in _pages(c, args):
            items.extend(listed)
            next_token, total = token, count
    if not sys.stdout.isatty():   # piped: full values, one incident per line
        _print_tsv(items)
        if next_token:
            print(f"next page: --page-token {next_token}", file=sys.stderr)
    else:
        _print_table(items, total=total, next_token=next_token)
    return 0


def _print_tsv(items: Iterable[Any]) -> None:
    print("\t".join(LIST_COLUMNS), flush=True)
    for i in items:
        print("\t".join(_cells(i)), flush=True)


def _print_table(items: list[Any], *, total: int, next_token: str) -> None:
    from rich.console import Console
    from rich.measure import Measurement
    from rich.table import Table

    table = Table(title=f"{len(items)} of {total} incident(s)")
    for col in ("id", "tenant", "created", "model", "trigger", "score", "p", "failure p", "sites",
                "size"):
        table.add_column(col, no_wrap=True)
    for i in items:
        cells = _cells(i)
        cells[-1] = f"{i.size_bytes:,}"
        table.add_row(*cells)
    console = Console()
    wanted = Measurement.get(console, console.options.update_width(1 << 16), table).maximum
    # never cut a cell (`show` needs whole ids):
    if wanted > console.width:   # a wide table wraps in the terminal instead
        console = Console(width=wanted)
    console.print(table)
    if next_token:
        console.print(f"next page: --page-token {next_token}")


def _cmd_show(args: argparse.Namespace) -> int:
    with client(args) as c:
        inc = c.get(args.incident_id, full=True)
        analyses = c.list_analyses(args.incident_id)
    if args.json:
        out = incident_dict(inc)
        out["manifest"] = json.loads(out.pop("manifest_json", "null") or "null")
        out["analyses"] = [incident_dict(a) for a in analyses]
        emit_json(out, indent=2)
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"incident {inc.id}", show_header=False)
    for key, value in (("tenant", inc.tenant), ("created", ts(inc, "created_at")),
                       ("received", ts(inc, "received_at")), ("model", inc.model_name),
                       ("fingerprint", inc.model_fingerprint),
                       ("trigger", f"{inc.trigger_rule}: {inc.trigger_reason}"),
                       ("request", inc.request_id), ("traceparent", inc.traceparent),
                       ("activations", inc.activations), ("sites", str(inc.n_sites)),
                       ("anomaly score", _num(inc, "anomaly_score", ".3f") or "not scored"),
                       ("anomaly p", _num(inc, "anomaly_p", ".3g") or "not scored"),
                       ("failure p", _num(inc, "failure_p", ".3f") or "no probe score"),
                       ("size", f"{inc.size_bytes:,} bytes"),
                       ("sha256", inc.sha256 or "(computed after the content check)"),
                       ("content sha256", inc.content_sha256),
                       ("integrity", inc.integrity or "verified")):
        table.add_row(key, value)
    console.print(table)
    if analyses:
        _print_analyses(console, analyses)
    return 0


def _print_analyses(console: Any, analyses: list[Any]) -> None:
    from rich.table import Table

    from ._cli_render import render_analyses
    from .api import v1

    at = Table(title="analyses")
    for col in ("id", "kind", "state", "attempts", "finished", "error"):
        at.add_column(col)
    for a in analyses:
        state = v1.JobState.Name(a.state).removeprefix("JOB_STATE_").lower()
        at.add_row(a.analysis_id, a.kind, state, str(a.attempts), ts(a, "finished_at"), a.error)
    console.print(at)
    render_analyses(console, analyses)


def _cmd_push(args: argparse.Namespace) -> int:
    """Validate each file locally, then upload it (idempotent: a file already stored with the
    same bytes is a success). Every file is tried; the exit status is 1 if any failed."""
    import grpc

    from integrations.errors import IncidentFormatError
    from integrations.incident import Incident

    failed = 0
    with client(args) as c:
        for name in args.files:
            try:
                data = Path(name).read_bytes()
                inc = Incident.from_bytes(data)
                request = inc.manifest.get("request") or {}
                resp = c.upload(inc.id, data, traceparent=str(request.get("traceparent") or ""))
            except (OSError, IncidentFormatError) as e:
                print(f"forensics: {name}: not pushed: {e}", file=sys.stderr)
                failed += 1
                continue
            except grpc.RpcError as e:
                print(f"forensics: {name}: not pushed: {e.code().name}: {e.details()}",
                      file=sys.stderr)
                failed += 1
                continue
            how = "stored" if resp.created else "already stored (same bytes)"
            print(f"{inc.id}\t{how}\t{len(data)} bytes\t{name}", flush=True)
    return 1 if failed else 0


def _cmd_download(args: argparse.Namespace) -> int:
    out = Path(args.output or f"{args.incident_id}.arrow")
    with client(args) as c:
        data = c.download(args.incident_id, to=out)
    print(f"wrote {len(data):,} bytes to {out}")
    return 0


def _cmd_delete(args: argparse.Namespace) -> int:
    with client(args) as c:
        c.delete(args.incident_id)
    print(f"deleted {args.incident_id}")
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from .api import v1

    with client(args) as c:
        job = wait_job(c, c.run_analysis(args.incident_id, args.kind, params_json=args.params),
                       args.wait)
    emit_json(incident_dict(job), indent=2)
    return 1 if job.state == v1.JOB_STATE_FAILED else 0
