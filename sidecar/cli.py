"""``forensics sidecar …`` and ``forensics incidents …`` sub-commands (argparse).

``register(subparsers)`` adds both groups to the ``forensics`` CLI:

    forensics sidecar serve [--config FILE] [--data-dir DIR] [--address HOST:PORT]
    forensics sidecar reindex [--config FILE] [--data-dir DIR]
    forensics incidents list [--filter F] [--order-by O] [--page-size N] [--all] [--json]
    forensics incidents show ID [--json]
    forensics incidents download ID [-o FILE]
    forensics incidents delete ID
    forensics incidents analyze ID [--kind stats] [--params JSON] [--wait SECONDS]
    forensics baseline build (--fingerprint FP | --from-dir DIR) [--detector cf]

Client commands talk gRPC to ``--address`` (env ``FORENSICS_SIDECAR``, default
127.0.0.1:7431) with ``--token`` (env ``FORENSICS_TOKEN``) and optional TLS (``--ca-cert``,
``--client-cert``/``--client-key`` for mTLS).

Example::

    forensics sidecar serve --config configs/sidecar.yaml
    forensics incidents list --filter 'trigger_rule = "flag"' --order-by "created_at desc"
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ._config_sections import DETECTORS

__all__ = ["register"]

DEFAULT_ADDRESS = "127.0.0.1:7431"


def register(subparsers: Any) -> None:
    """Add the ``sidecar``, ``incidents`` and ``baseline`` command groups to an argparse
    sub-parser set."""
    _register_sidecar(subparsers)
    _register_incidents(subparsers)
    _register_baseline(subparsers)


def _register_sidecar(subparsers: Any) -> None:
    sc = subparsers.add_parser("sidecar", help="run or maintain the forensics sidecar")
    scs = sc.add_subparsers(dest="sidecar_command", metavar="COMMAND", required=True)
    serve = scs.add_parser("serve", help="serve gRPC ingest/queries, jobs and /metrics")
    _server_args(serve)
    serve.add_argument("--address", help="gRPC listen address host:port (overrides config)")
    serve.add_argument("--log-level", default="INFO")
    serve.set_defaults(func=_cmd_serve)
    reindex = scs.add_parser("reindex", help="rebuild the DuckDB index from the Arrow files "
                                             "(run while the sidecar is stopped)")
    _server_args(reindex)
    reindex.set_defaults(func=_cmd_reindex)


def _register_incidents(subparsers: Any) -> None:
    inc = subparsers.add_parser("incidents", help="query incidents stored in a sidecar")
    incs = inc.add_subparsers(dest="incidents_command", metavar="COMMAND", required=True)
    ls = incs.add_parser("list", help="list incidents (AIP-160 filter, order_by)")
    _client_args(ls)
    ls.add_argument("--filter", default="", help='e.g. tenant = "acme" AND n_sites > 2')
    ls.add_argument("--order-by", default="", help='e.g. "created_at desc"')
    ls.add_argument("--page-size", type=int, default=50)
    ls.add_argument("--page-token", default="")
    ls.add_argument("--all", action="store_true", help="follow page tokens to the end")
    ls.add_argument("--json", action="store_true", help="print JSON lines")
    ls.set_defaults(func=_cmd_list)
    show = incs.add_parser("show", help="show one incident with its manifest and analyses")
    _client_args(show)
    show.add_argument("incident_id")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=_cmd_show)
    dl = incs.add_parser("download", help="download an incident's Arrow file")
    _client_args(dl)
    dl.add_argument("incident_id")
    dl.add_argument("-o", "--output", help="file to write (default ./<id>.arrow)")
    dl.set_defaults(func=_cmd_download)
    rm = incs.add_parser("delete", help="delete an incident, its file and its analyses")
    _client_args(rm)
    rm.add_argument("incident_id")
    rm.set_defaults(func=_cmd_delete)
    an = incs.add_parser("analyze", help="run an analysis job (stats, replay, ...)")
    _client_args(an)
    an.add_argument("incident_id")
    an.add_argument("--kind", default="stats")
    an.add_argument("--params", default="", help="job parameters as a JSON object")
    an.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                    help="poll until the job finishes (0 = return at once)")
    an.set_defaults(func=_cmd_analyze)


def _register_baseline(subparsers: Any) -> None:
    bl = subparsers.add_parser("baseline", help="detector baselines kept by the sidecar")
    bls = bl.add_subparsers(dest="baseline_command", metavar="COMMAND", required=True)
    build = bls.add_parser("build", help="build (or refresh) a model's CF baseline in the "
                                         "sidecar from benign incidents")
    _client_args(build)
    src = build.add_mutually_exclusive_group(required=True)
    src.add_argument("--fingerprint", help="model fingerprint: use its stored sampled benign "
                                           "incidents (trigger rule ratio, not flagged)")
    src.add_argument("--from-dir", metavar="DIR", help="upload DIR/*.arrow (e.g. a scenario's "
                                                       "benign set) and build from exactly those")
    build.add_argument("--detector", choices=DETECTORS, default=None,
                       help="default: the sidecar's baselines.detector")
    build.add_argument("--wait", type=float, default=600.0, metavar="SECONDS")
    build.set_defaults(func=_cmd_baseline_build)


def _server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="sidecar YAML config (default: embedded defaults)")
    p.add_argument("--data-dir", help="store directory (overrides config data_dir)")


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=os.environ.get("FORENSICS_SIDECAR", DEFAULT_ADDRESS))
    p.add_argument("--token", default=os.environ.get("FORENSICS_TOKEN"),
                   help="bearer token (env FORENSICS_TOKEN)")
    p.add_argument("--ca-cert", help="PEM CA certificate: use TLS")
    p.add_argument("--client-cert", help="PEM client certificate (mTLS)")
    p.add_argument("--client-key", help="PEM client key (mTLS)")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline per call, seconds")


def _config(args: argparse.Namespace) -> Any:
    """The sidecar config: ``--config`` (file) < ``FORENSICS_SIDECAR__*`` < ``--data-dir`` /
    ``--address`` (explicit arguments)."""
    from ._config import load_config

    given = {"data_dir": getattr(args, "data_dir", None),
             "grpc.address": getattr(args, "address", None)}
    return load_config(args.config, overrides={k: v for k, v in given.items() if v})


def _cmd_serve(args: argparse.Namespace) -> int:
    from ._server import create_server

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = _config(args)
    telemetry = None
    if cfg.metrics.enabled or cfg.telemetry.otlp_endpoint or cfg.telemetry.console_spans:
        from .telemetry import SidecarTelemetry

        telemetry = SidecarTelemetry.from_config(cfg)
    sidecar, port = create_server(cfg, port=None, telemetry=telemetry)
    stop = threading.Event()
    log = logging.getLogger("sidecar.cli")

    def on_signal(signum: int, frame: Any) -> None:
        log.info("received %s: shutting down (draining for up to %.1f s)",
                 signal.Signals(signum).name, cfg.grpc.grace_s)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    sidecar.start()
    metrics = getattr(telemetry, "metrics_url", None)
    print(f"forensics sidecar listening on {cfg.grpc.host}:{port}"
          f"{' (TLS)' if cfg.grpc.tls.enabled else ''}; data in {cfg.data_dir}"
          f"{'; metrics at ' + metrics if metrics else ''}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        sidecar.stop()
        if telemetry is not None:
            telemetry.shutdown()
            log.info("telemetry flushed; metrics endpoint closed")
        log.info("forensics sidecar stopped")
    return 0


def _cmd_reindex(args: argparse.Namespace) -> int:
    from ._store import LocalStore

    cfg = _config(args)
    t0 = time.monotonic()
    try:
        store = LocalStore.from_config(cfg)
    except Exception as e:
        if "lock" in str(e).lower():
            from integrations.errors import SidecarError

            raise SidecarError(f"the index in {cfg.data_dir} is in use; stop the sidecar "
                               "before reindexing") from e
        raise
    with store:
        report = store.reindex()
    print(f"reindexed {report.indexed} incident(s) in {time.monotonic() - t0:.2f}s; "
          f"removed {report.removed_rows} stale row(s), {report.tmp_removed} temp file(s); "
          f"quarantined {len(report.quarantined)}"
          + (f": {', '.join(report.quarantined)}" if report.quarantined else ""))
    return 1 if report.quarantined else 0


def _client(args: argparse.Namespace) -> Any:
    from ._client import SidecarClient

    def read(p: str | None) -> bytes | None:
        return Path(p).read_bytes() if p else None

    return SidecarClient(args.address, token=args.token, timeout_s=args.timeout,
                         root_certificates=read(args.ca_cert), private_key=read(args.client_key),
                         certificate_chain=read(args.client_cert))


def _rpc(fn: Any) -> Any:
    import grpc

    def run(args: argparse.Namespace) -> int:
        try:
            return int(fn(args) or 0)
        except grpc.RpcError as e:
            code = e.code().name if hasattr(e, "code") else "UNKNOWN"
            detail = e.details() if hasattr(e, "details") else str(e)
            print(f"forensics: {code}: {detail} (sidecar {args.address})", file=sys.stderr)
            return 1
    return run


def _ts(msg: Any, field: str) -> str:
    if not msg.HasField(field):
        return ""
    return str(getattr(msg, field).ToDatetime().isoformat(sep=" ", timespec="seconds"))


def _incident_dict(i: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    return dict(MessageToDict(i, preserving_proto_field_name=True))


@_rpc
def _cmd_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    with _client(args) as c:
        if args.all:
            items = list(c.list_all(filter=args.filter, order_by=args.order_by,
                                    page_size=args.page_size))
            next_token, total = "", len(items)
        else:
            page = c.list(filter=args.filter, order_by=args.order_by, page_size=args.page_size,
                          page_token=args.page_token)
            items, next_token, total = list(page.incidents), page.next_page_token, page.total_size
    if args.json:
        for i in items:
            print(json.dumps(_incident_dict(i)))
        return 0
    table = Table(title=f"{len(items)} of {total} incident(s)")
    for col in ("id", "tenant", "created", "model", "trigger", "sites", "size"):
        table.add_column(col)
    for i in items:
        table.add_row(i.id, i.tenant, _ts(i, "created_at"), i.model_name,
                      f"{i.trigger_rule}:{i.trigger_reason}", str(i.n_sites), f"{i.size_bytes:,}")
    console = Console()
    console.print(table)
    if next_token:
        console.print(f"next page: --page-token {next_token}")
    return 0


@_rpc
def _cmd_show(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    with _client(args) as c:
        inc = c.get(args.incident_id, full=True)
        analyses = c.list_analyses(args.incident_id)
    if args.json:
        out = _incident_dict(inc)
        out["manifest"] = json.loads(out.pop("manifest_json", "null") or "null")
        out["analyses"] = [_incident_dict(a) for a in analyses]
        print(json.dumps(out, indent=2))
        return 0
    console = Console()
    table = Table(title=f"incident {inc.id}", show_header=False)
    for key, value in (("tenant", inc.tenant), ("created", _ts(inc, "created_at")),
                       ("received", _ts(inc, "received_at")), ("model", inc.model_name),
                       ("fingerprint", inc.model_fingerprint),
                       ("trigger", f"{inc.trigger_rule}: {inc.trigger_reason}"),
                       ("request", inc.request_id), ("traceparent", inc.traceparent),
                       ("activations", inc.activations), ("sites", str(inc.n_sites)),
                       ("size", f"{inc.size_bytes:,} bytes"), ("sha256", inc.sha256)):
        table.add_row(key, value)
    console.print(table)
    if analyses:
        at = Table(title="analyses")
        for col in ("id", "kind", "state", "attempts", "finished", "error"):
            at.add_column(col)
        for a in analyses:
            state = a.DESCRIPTOR.fields_by_name["state"].enum_type.values_by_number[a.state].name
            at.add_row(a.analysis_id, a.kind, state.removeprefix("JOB_STATE_").lower(),
                       str(a.attempts), _ts(a, "finished_at"), a.error)
        console.print(at)
        from ._cli_render import render_analyses

        render_analyses(console, analyses)
    return 0


@_rpc
def _cmd_download(args: argparse.Namespace) -> int:
    out = Path(args.output or f"{args.incident_id}.arrow")
    with _client(args) as c:
        data = c.download(args.incident_id, to=out)
    print(f"wrote {len(data):,} bytes to {out}")
    return 0


@_rpc
def _cmd_delete(args: argparse.Namespace) -> int:
    with _client(args) as c:
        c.delete(args.incident_id)
    print(f"deleted {args.incident_id}")
    return 0


@_rpc
def _cmd_analyze(args: argparse.Namespace) -> int:
    from .api import v1

    with _client(args) as c:
        job = _wait_job(c, c.run_analysis(args.incident_id, args.kind, params_json=args.params),
                        args.wait)
    print(json.dumps(_incident_dict(job), indent=2))
    return 1 if job.state == v1.JOB_STATE_FAILED else 0


def _wait_job(c: Any, job: Any, seconds: float) -> Any:
    """Poll ``job`` until it is done or failed, for at most ``seconds``."""
    from .api import v1

    deadline = time.monotonic() + seconds
    while job.state not in (v1.JOB_STATE_DONE, v1.JOB_STATE_FAILED) and \
            time.monotonic() < deadline:
        time.sleep(0.2)
        job = c.get_analysis(job.analysis_id)
    return job


@_rpc
def _cmd_baseline_build(args: argparse.Namespace) -> int:
    from integrations.errors import SidecarError

    from .api import v1

    params: dict[str, Any] = {}
    if args.detector:
        params["detector"] = args.detector
    with _client(args) as c:
        if args.fingerprint:
            page = c.list(filter=f"model_fingerprint = {json.dumps(args.fingerprint)}",
                          page_size=1)
            if not page.incidents:
                raise SidecarError(f"no stored incident has model fingerprint "
                                   f"{args.fingerprint}; record sampled benign traffic first")
            anchor = page.incidents[0].id
            params["fingerprint"] = args.fingerprint
        else:
            files = sorted(Path(args.from_dir).glob("*.arrow"))
            if len(files) < 2:
                raise SidecarError(f"{args.from_dir} holds {len(files)} .arrow incident(s); a "
                                   "baseline needs at least 2 benign incidents")
            from integrations.incident import Incident

            ids = []
            for f in files:
                data = f.read_bytes()
                inc_id = Incident.from_bytes(data).id
                c.upload(inc_id, data)
                ids.append(inc_id)
            print(f"uploaded {len(ids)} incident(s) from {args.from_dir}")
            anchor, params["incident_ids"] = ids[0], ids
        job = c.run_analysis(anchor, "baseline", params_json=json.dumps(params))
        job = _wait_job(c, job, args.wait)
    if job.state != v1.JOB_STATE_DONE:
        state = v1.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()
        print(f"baseline job {job.analysis_id}: {state} {job.error}".rstrip(), file=sys.stderr)
        return 1
    r = json.loads(job.result_json)
    print(f"built {r['detector']} baseline v{r['version']} for model {r.get('model_name')!r} "
          f"(fingerprint {r['fingerprint'][:16]}…) from {r['sample_count']} benign incidents, "
          f"{len(r['sites'])} sites -> {r['path']}")
    return 0
