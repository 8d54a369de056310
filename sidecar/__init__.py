"""The Model Forensics sidecar: gRPC ingest + queries, durable store, analysis jobs, telemetry.

Importing ``sidecar`` (or ``sidecar.api.v1``) is light: the server, the DuckDB-backed store and
the job runner are loaded on first attribute access.

Example::

    from sidecar import SidecarConfig, create_server
    server, port = create_server(SidecarConfig.defaults(data_dir="./forensics-data"), port=0)
    server.start()
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sidecar._config import SidecarConfig, load_config
    from sidecar._filters import FilterError, compile_filter, compile_order_by
    from sidecar._hooks import NoopTelemetry, Telemetry
    from sidecar._jobs import JobRunner, register_job_kind
    from sidecar._server import Sidecar, create_server
    from sidecar._store import IncidentStore, LocalStore, StoreError

_LAZY = {
    "FilterError": "sidecar._filters",
    "IncidentStore": "sidecar._store",
    "JobRunner": "sidecar._jobs",
    "LocalStore": "sidecar._store",
    "NoopTelemetry": "sidecar._hooks",
    "Sidecar": "sidecar._server",
    "SidecarConfig": "sidecar._config",
    "StoreError": "sidecar._store",
    "Telemetry": "sidecar._hooks",
    "compile_filter": "sidecar._filters",
    "compile_order_by": "sidecar._filters",
    "create_server": "sidecar._server",
    "load_config": "sidecar._config",
    "register_job_kind": "sidecar._jobs",
}

__all__ = [
    "FilterError",
    "IncidentStore",
    "JobRunner",
    "LocalStore",
    "NoopTelemetry",
    "Sidecar",
    "SidecarConfig",
    "StoreError",
    "Telemetry",
    "compile_filter",
    "compile_order_by",
    "create_server",
    "load_config",
    "register_job_kind",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sidecar' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
