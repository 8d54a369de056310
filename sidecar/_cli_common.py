"""What every client command of the ``forensics`` CLI shares: the connection options, the
client they build, gRPC errors as one line, and output that survives a pipe.

Client commands talk gRPC to ``--address`` (env ``FORENSICS_SIDECAR``, default
``127.0.0.1:7431``) with ``--token`` (env ``FORENSICS_TOKEN``) and optional TLS; an admin
token names the tenant it acts on with ``--tenant`` (incident ids are unique per tenant).

Example::

    p = subparsers.add_parser("list")
    client_args(p)
    p.set_defaults(func=rpc(my_command))      # my_command(args) -> exit status
    with client(args) as c:
        c.list(page_size=10)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_ADDRESS", "client", "client_args", "emit_json", "incident_dict", "rpc",
           "ts", "wait_job"]

DEFAULT_ADDRESS = "127.0.0.1:7431"


def client_args(p: argparse.ArgumentParser) -> None:
    """Add the connection options (address, token, TLS, deadline) to a sub-command."""
    p.add_argument("--address", default=os.environ.get("FORENSICS_SIDECAR", DEFAULT_ADDRESS),
                   help="sidecar gRPC host:port (env FORENSICS_SIDECAR, default "
                        f"{DEFAULT_ADDRESS})")
    p.add_argument("--token", default=os.environ.get("FORENSICS_TOKEN"),
                   help="bearer token (env FORENSICS_TOKEN)")
    p.add_argument("--tenant", help="admin tokens: act on this tenant's incidents (ids are "
                                    "unique per tenant; needed for an id several tenants hold)")
    p.add_argument("--ca-cert", help="PEM CA certificate: use TLS")
    p.add_argument("--client-cert", help="PEM client certificate (mTLS)")
    p.add_argument("--client-key", help="PEM client key (mTLS)")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline per call, seconds")


def client(args: argparse.Namespace) -> Any:
    """A :class:`~sidecar.SidecarClient` for the options of :func:`client_args`."""
    from ._client import SidecarClient

    def read(p: str | None) -> bytes | None:
        return Path(p).read_bytes() if p else None

    return SidecarClient(args.address, token=args.token, timeout_s=args.timeout,
                         root_certificates=read(args.ca_cert), private_key=read(args.client_key),
                         certificate_chain=read(args.client_cert), tenant=args.tenant)


def rpc(fn: Callable[[argparse.Namespace], int | None]) -> Callable[[argparse.Namespace], int]:
    """Wrap a client command: a gRPC error becomes one line on stderr and exit status 1."""
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


def ts(msg: Any, field: str) -> str:
    """A Timestamp field of ``msg`` as ``YYYY-MM-DD HH:MM:SS`` (UTC), or "" when unset."""
    if not msg.HasField(field):
        return ""
    return str(getattr(msg, field).ToDatetime().isoformat(sep=" ", timespec="seconds"))


#: Optional ``Incident`` fields printed as ``null`` when absent (a stable JSON schema).
_NULLABLE = ("anomaly_score", "anomaly_p", "cf_flagged", "failure_p")


def incident_dict(msg: Any) -> dict[str, Any]:
    """A message as a JSON-able dict (proto field names; an incident's CF fields are ``null``
    until it is scored)."""
    from google.protobuf.json_format import MessageToDict

    out = dict(MessageToDict(msg, preserving_proto_field_name=True))
    if msg.DESCRIPTOR.name == "Incident":
        for key in _NULLABLE:
            out.setdefault(key, None)
    return out


def emit_json(obj: Mapping[str, Any] | list[Any], *, indent: int | None = None) -> None:
    """Print one JSON document and flush, so a reader sees each line as it is produced (a
    closed pipe is handled once, in ``model_forensics.cli.main``)."""
    sys.stdout.write(json.dumps(obj, indent=indent) + "\n")
    sys.stdout.flush()


def wait_job(c: Any, job: Any, seconds: float) -> Any:
    """Poll ``job`` until it is done or failed, for at most ``seconds``."""
    from .api import v1

    deadline = time.monotonic() + seconds
    while job.state not in (v1.JOB_STATE_DONE, v1.JOB_STATE_FAILED) and \
            time.monotonic() < deadline:
        time.sleep(0.2)
        job = c.get_analysis(job.analysis_id)
    return job
