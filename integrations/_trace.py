"""One-shot capture: record the forward calls of one block of code into an Incident.

``trace`` runs the block as one request of a private :class:`~integrations.Recorder` whose
trigger always fires, exporting to memory; on exit the recorder is flushed and shut down and
the incident is handed over. The incident is exactly what the recorder makes for a served
request — manifest (model reference + weight fingerprint, runtime, seeds, trigger, request),
inputs of every forward call, one step per forward call (``generate()`` included: step 0 =
prefill), the selected sites, last-position logits — because it *is* the recorder's.

Example::

    import integrations
    with integrations.trace(model, ["blocks.*.resid_post"], request_id="probe-1") as t:
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
        t.request.set_output(ids=out)        # optional, like req.set_output in a request
    inc = t.incident
    inc.steps("blocks.0.resid_post")         # [0, 1, 2, 3]
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from . import triggers as _triggers
from .errors import CaptureError, IncidentTooLargeError

if TYPE_CHECKING:
    import torch

    from ._request import RequestHandle
    from .config import ForensicsConfig
    from .exporters import InMemoryExporter
    from .incident import Incident

__all__ = ["Trace", "trace"]


class _Traced(_triggers.Trigger):
    """Fires for every request: the rule ``trace`` with the caller's reason."""

    def __init__(self, reason: str) -> None:
        self.fire = _triggers.Fire("trace", reason)

    def pre(self, view: _triggers.RequestView) -> _triggers.Fire | None:
        return self.fire


class Trace:
    """What ``with trace(...) as t`` gives: the request handle inside, the incident after."""

    def __init__(self, request: RequestHandle) -> None:
        self.request = request
        self._incident: Incident | None = None

    @property
    def incident(self) -> Incident:
        """The captured incident; available once the ``with`` block has exited."""
        if self._incident is None:
            raise CaptureError("the trace is still running: t.incident exists once the "
                               "`with integrations.trace(...)` block has exited")
        return self._incident


@contextlib.contextmanager
def trace(model: torch.nn.Module, sites: Sequence[str] | None = None, *,
          request_id: str | None = None, tenant: str | None = None, reason: str = "trace",
          tokenizer: Any = None, capture_content: bool = False, capture_logits: bool = True,
          max_bundle_size_mb: float | None = None, model_name: str | None = None,
          model_revision: str | None = None,
          config: ForensicsConfig | str | os.PathLike[str] | None = None,
          timeout_s: float = 120.0) -> Iterator[Trace]:
    """Capture every forward call of ``model`` inside the block into one Incident.

    ``sites`` are canonical site strings (default: the config's ``recorder.granularity``);
    ``reason`` goes into the manifest's trigger (``{"rule": "trace", "reason": reason}``);
    the other options are the :class:`~integrations.Recorder`'s. The capture is never switched
    off by ``recorder.enabled: false`` (that is the serving kill switch). Inside the block,
    ``t.request`` is the request's :class:`~integrations.RequestHandle` (``set_output``,
    ``set_generation``, ``flag``). After it, ``t.incident`` is the incident; if none was made
    (over ``max_bundle_size_mb``: :class:`~integrations.errors.IncidentTooLargeError`; a hook
    or the build failed: :class:`~integrations.errors.CaptureError`) the exit raises. An
    exception raised by the block propagates unchanged (and no incident is handed over); a block
    that never calls the model raises :class:`~integrations.errors.CaptureError` on exit.

    Example::

        with integrations.trace(model, ["blocks.*.mlp"], reason="probe") as t:
            model(input_ids=ids)
        t.incident.tensor("blocks.0.mlp", step=0)
    """
    from prometheus_client import CollectorRegistry

    from ._recorder import Recorder
    from .exporters import InMemoryExporter

    ex = InMemoryExporter()
    with Recorder(model, sites=sites, trigger=_Traced(reason), exporter=ex,
                  config=_always_enabled(config), tokenizer=tokenizer,
                  model_name=model_name, model_revision=model_revision, max_queue=1,
                  capture_logits=capture_logits, capture_content=capture_content,
                  max_bundle_size_mb=max_bundle_size_mb,
                  metrics_registry=CollectorRegistry()) as rec:  # never the serving metrics
        with rec.request(request_id=request_id, tenant=tenant) as req:
            t = Trace(req)
            yield t
        rec.shutdown(timeout_s=timeout_s)
        t._incident = _the_incident(ex, rec.stats(), req.request_id)


def _always_enabled(config: ForensicsConfig | str | os.PathLike[str] | None
                    ) -> ForensicsConfig:
    from .config import ForensicsConfig, load_config

    cfg = config if isinstance(config, ForensicsConfig) else load_config(config)
    if cfg.recorder.enabled:
        return cfg
    return dataclasses.replace(cfg, recorder=dataclasses.replace(cfg.recorder, enabled=True))


def _the_incident(ex: InMemoryExporter, stats: dict[str, Any], request_id: str) -> Incident:
    incidents = ex.incidents
    if incidents:
        return incidents[-1]
    if not stats.get("captured"):
        raise CaptureError(f"request {request_id!r} of the trace called no forward of the model; "
                           "run the model inside the `with integrations.trace(...)` block")
    dropped = stats.get("dropped") or {}
    if "too_large" in dropped:
        raise IncidentTooLargeError(
            f"the trace of request {request_id!r} is over recorder.max_bundle_size_mb; pass a "
            "larger max_bundle_size_mb= to trace(), or fewer sites")
    reasons = ", ".join(sorted(dropped)) or "not exported in time"
    raise CaptureError(f"the trace of request {request_id!r} made no incident ({reasons}); "
                       "the log says what failed")
