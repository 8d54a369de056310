"""The serving-side middleware: record what the model computed when a trigger fires.

Example::

    import integrations
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

    with integrations.trace(model, ["blocks.*.resid_post"]) as t:   # one-shot capture
        model(**inputs)
    t.incident.tensor("blocks.0.resid_post", step=0)

    with integrations.outside_request():      # nothing in here is recorded (replay)
        model(**inputs)

Imports only torch, numpy, pyarrow (and, for the sidecar exporter, grpcio/protobuf),
prometheus-client and opentelemetry-api — never duckdb, scipy or transformers; ``import
integrations`` itself imports none of them (they load when first needed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import errors, exporters, triggers
from ._lazy import lazy_exports
from ._recorder import Recorder
from ._request import BatchHandle, RequestHandle, current_request, flag, outside_request
from ._trace import Trace, trace

if TYPE_CHECKING:
    from .incident import Incident

__all__ = [
    "BatchHandle",
    "Incident",
    "Recorder",
    "RequestHandle",
    "Trace",
    "current_request",
    "errors",
    "exporters",
    "flag",
    "outside_request",
    "trace",
    "triggers",
]

# Incident pulls in pyarrow: imported on first use
__getattr__, __dir__ = lazy_exports(__name__, {"Incident": ".incident"})
