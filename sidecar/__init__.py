"""The Model Forensics sidecar: gRPC ingest + queries, durable store, analysis jobs, telemetry.

Job kinds (``JobKind``, ``builtin_kinds``; the host and context a kind sees) are in
:mod:`sidecar.jobs`.

Importing ``sidecar`` is light (no torch, duckdb, grpc server or OpenTelemetry SDK): every public
name below is loaded from its private module on first attribute access.

Example::

    from sidecar import SidecarClient, SidecarConfig, create_server
    server, port = create_server(SidecarConfig.defaults(data_dir="./forensics-data"), port=0)
    server.start()
    with SidecarClient(f"127.0.0.1:{port}") as c:
        c.list(filter="anomaly_score > 2.5", order_by="anomaly_score desc")
    server.stop()
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from integrations._lazy import lazy_exports

if TYPE_CHECKING:
    from sidecar._catalog import Catalog, open_catalog
    from sidecar._catalog_postgres import PostgresCatalog
    from sidecar._client import SidecarClient
    from sidecar._config import SidecarConfig, load_config
    from sidecar._filters import FilterError, compile_filter, compile_order_by
    from sidecar._incident_files import IncidentFiles
    from sidecar._observer import Metric, NoopTelemetry, Telemetry
    from sidecar._server import Sidecar, create_server
    from sidecar._store import (
        AmbiguousIncidentError,
        IncidentRow,
        IncidentStore,
        LocalStore,
        ReindexReport,
        StoreError,
    )
    from sidecar.jobs import JobKind, JobRecord, JobRunner, builtin_kinds
    from sidecar.telemetry import MetricsHTTPServer, SidecarMetrics, SidecarTelemetry


__all__ = [
    "AmbiguousIncidentError",
    "Catalog",
    "FilterError",
    "IncidentFiles",
    "IncidentRow",
    "IncidentStore",
    "JobKind",
    "JobRecord",
    "JobRunner",
    "LocalStore",
    "Metric",
    "MetricsHTTPServer",
    "NoopTelemetry",
    "PostgresCatalog",
    "ReindexReport",
    "Sidecar",
    "SidecarClient",
    "SidecarConfig",
    "SidecarMetrics",
    "SidecarTelemetry",
    "StoreError",
    "Telemetry",
    "builtin_kinds",
    "compile_filter",
    "compile_order_by",
    "create_server",
    "load_config",
    "open_catalog",
]


_LAZY = {
    "AmbiguousIncidentError": "sidecar._store",
    "Catalog": "sidecar._catalog",
    "FilterError": "sidecar._filters",
    "IncidentFiles": "sidecar._incident_files",
    "IncidentRow": "sidecar._store",
    "IncidentStore": "sidecar._store",
    "JobKind": "sidecar.jobs",
    "JobRecord": "sidecar.jobs",
    "JobRunner": "sidecar.jobs",
    "LocalStore": "sidecar._store",
    "Metric": "sidecar._observer",
    "MetricsHTTPServer": "sidecar.telemetry",
    "NoopTelemetry": "sidecar._observer",
    "PostgresCatalog": "sidecar._catalog_postgres",
    "ReindexReport": "sidecar._store",
    "Sidecar": "sidecar._server",
    "SidecarClient": "sidecar._client",
    "SidecarConfig": "sidecar._config",
    "SidecarMetrics": "sidecar.telemetry",
    "SidecarTelemetry": "sidecar.telemetry",
    "StoreError": "sidecar._store",
    "Telemetry": "sidecar._observer",
    "builtin_kinds": "sidecar.jobs",
    "compile_filter": "sidecar._filters",
    "compile_order_by": "sidecar._filters",
    "create_server": "sidecar._server",
    "load_config": "sidecar._config",
    "open_catalog": "sidecar._catalog",
}

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
