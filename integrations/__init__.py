"""The serving-side middleware: record what the model computed when a trigger fires.

Example::

    from integrations import Recorder, flag, triggers, exporters
    ex = exporters.InMemoryExporter()
    rec = Recorder(model, sites=["blocks.*.resid_post"],
                   trigger=triggers.AnyOf(triggers.OnFlag(), triggers.Ratio(0.01)), exporter=ex)
    with rec.request(request_id="r-1", tenant="acme") as req:
        out = model.generate(**inputs)
        if "HACKED" in decode(out):
            req.flag("prompt_injection")
    rec.force_flush(timeout_s=10)
    inc = ex.incidents[-1]

Imports only torch, numpy, pyarrow (and, for the sidecar exporter, grpcio/protobuf),
prometheus-client and opentelemetry-api — never duckdb, scipy or transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import errors, exporters, triggers
from ._recorder import Recorder
from ._request import BatchHandle, RequestHandle, current_request, flag

if TYPE_CHECKING:
    from .incident import Incident

__all__ = [
    "BatchHandle",
    "Incident",
    "Recorder",
    "RequestHandle",
    "current_request",
    "errors",
    "exporters",
    "flag",
    "triggers",
]


def __getattr__(name: str) -> Any:  # Incident pulls in pyarrow: import it on first use
    if name == "Incident":
        from .incident import Incident

        return Incident
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
