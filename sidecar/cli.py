"""``forensics sidecar …``, ``forensics incidents …``, ``forensics baseline …``,
``forensics report`` and ``forensics investigate`` (argparse).

``register(subparsers)`` adds the groups to the ``forensics`` CLI:

    forensics sidecar serve [--config FILE] [--data-dir DIR] [--address HOST:PORT]
    forensics sidecar reindex [--config FILE] [--data-dir DIR]
    forensics incidents list|show|push|download|delete|analyze ...   (sidecar._cli_incidents)
    forensics baseline build (--fingerprint FP | --from-dir DIR) [--detector cf]
    forensics baseline to-store --config cfg.yaml
    forensics report ID [-o report.html] [--index]                      (sidecar._cli_report)
    forensics investigate INCIDENT.arrow --benign DIR --out DIR   (sidecar._cli_investigate)

Client commands talk gRPC to ``--address`` (env ``FORENSICS_SIDECAR``, default
127.0.0.1:7431) with ``--token`` (env ``FORENSICS_TOKEN``) and optional TLS (``--ca-cert``,
``--client-cert``/``--client-key`` for mTLS). The server's configuration is a YAML file
(``--config``), overridden by ``FORENSICS_SIDECAR__<SECTION>__<KEY>`` environment variables.

Example::

    forensics sidecar serve --config configs/sidecar.yaml
    forensics incidents list --filter 'trigger_rule = "flag"' --order-by "created_at desc"
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ._cli_common import client, client_args, rpc, wait_job
from ._config_sections import DETECTORS

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add the ``sidecar``, ``incidents``, ``baseline``, ``report`` and ``investigate``
    commands to an argparse sub-parser set."""
    from ._cli_incidents import register_incidents
    from ._cli_investigate import register_investigate
    from ._cli_report import register_report

    _register_sidecar(subparsers)
    register_incidents(subparsers)
    _register_baseline(subparsers)
    register_report(subparsers)
    register_investigate(subparsers)


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


def _register_baseline(subparsers: Any) -> None:
    bl = subparsers.add_parser("baseline", help="detector baselines kept by the sidecar")
    bls = bl.add_subparsers(dest="baseline_command", metavar="COMMAND", required=True)
    build = bls.add_parser("build", help="build (or refresh) a model's CF baseline in the "
                                         "sidecar from benign incidents")
    client_args(build)
    src = build.add_mutually_exclusive_group(required=True)
    src.add_argument("--fingerprint", help="model fingerprint: use its stored sampled benign "
                                           "incidents (trigger rule ratio, not flagged)")
    src.add_argument("--from-dir", metavar="DIR", help="upload DIR/*.arrow (e.g. a scenario's "
                                                       "benign set) and build from exactly those")
    build.add_argument("--detector", choices=DETECTORS, default=None,
                       help="default: the sidecar's baselines.detector")
    build.add_argument("--wait", type=float, default=600.0, metavar="SECONDS")
    build.set_defaults(func=rpc(_cmd_baseline_build))
    to_store = bls.add_parser("to-store", help="copy this sidecar's baselines and probes from "
                                               "data_dir to store.uri (moving to a shared "
                                               "store; run while the sidecar is stopped)")
    _server_args(to_store)
    to_store.set_defaults(func=_cmd_baseline_to_store)


def _server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="sidecar YAML config (default: embedded defaults)")
    p.add_argument("--data-dir", help="store directory (overrides config data_dir)")


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
    opened = store.last_recovery   # a flat layout was migrated when the store opened
    quarantined = [*opened.quarantined, *report.quarantined]
    moved = f"moved {opened.migrated} from the flat layout; " if opened.migrated else ""
    print(f"reindexed {report.indexed} incident(s) in {time.monotonic() - t0:.2f}s; {moved}"
          f"removed {report.removed_rows} stale row(s), {report.tmp_removed} temp file(s); "
          f"quarantined {len(quarantined)}" + (f": {', '.join(quarantined)}" if quarantined else ""))
    return 1 if quarantined else 0


def _cmd_baseline_to_store(args: argparse.Namespace) -> int:
    from ._artefacts_migrate import copy_to_store
    from ._catalog import open_catalog

    cfg = _config(args)
    catalog = open_catalog(cfg)
    try:
        r = copy_to_store(cfg, catalog)
    finally:
        catalog.close()
    print(f"copied {len(r.copied)} baseline/probe file(s) to {cfg.store.uri}; "
          f"{len(r.already)} already there")
    for label, paths, what in (
            ("absent", r.absent, "neither in data_dir nor in the store: rebuild them, or run "
                                 "this on the sidecar that has them"),
            ("altered", r.altered, "differ from the sha256 their rows carry: not copied; "
                                   "rebuild them")):
        if paths:
            print(f"{len(paths)} {label} ({what}): {', '.join(paths)}", file=sys.stderr)
    return 1 if r.altered else 0


def _cmd_baseline_build(args: argparse.Namespace) -> int:
    from integrations.errors import SidecarError

    from .api import v1

    params: dict[str, Any] = {}
    if args.detector:
        params["detector"] = args.detector
    with client(args) as c:
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
        job = wait_job(c, job, args.wait)
    if job.state != v1.JOB_STATE_DONE:
        state = v1.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()
        print(f"baseline job {job.analysis_id}: {state} {job.error}".rstrip(), file=sys.stderr)
        return 1
    r = json.loads(job.result_json)
    print(f"built {r['detector']} baseline v{r['version']} for model {r.get('model_name')!r} "
          f"(fingerprint {r['fingerprint'][:16]}…) from {r['sample_count']} benign incidents, "
          f"{len(r['sites'])} sites -> {r['path']}")
    return 0
