"""The Recorder: records what the model computed for requests whose trigger fires.

It wires three parts, one concept each: the capture hooks on the serving path
(:mod:`integrations._capture`: select, copy, keep), the request context
(:mod:`integrations._request`: ``rec.request``/``rec.batch`` handles, ``flag``), and the export
worker (:mod:`integrations._worker`), which is given the exporter, the metrics and the build
function (:mod:`integrations._build`) that turns a finished request into an Incident. When a
request ends, the recorder decides whether it makes an incident and counts it: every captured
incident is either exported or counted as dropped, by reason. No exception from forensics ever
reaches the model call.

Example::

    from integrations import Recorder, triggers, exporters
    ex = exporters.InMemoryExporter()
    with Recorder(model, sites=["blocks.*.resid_post"], trigger=triggers.OnFlag(),
                  exporter=ex) as rec:          # shut down on exit, even on an error
        with rec.request(request_id="r-1") as req:
            req.flag("prompt_injection")        # flagged before the model runs: capture
            out = model.generate(**inputs)
            req.set_output(ids=out)
        rec.force_flush(timeout_s=10)
    inc = ex.incidents[-1]
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from . import triggers as _triggers
from ._build import IncidentFactory, PendingIncident
from ._capture import CaptureHooks
from ._metrics import RecorderMetrics
from ._request import (
    BatchHandle,
    RequestContext,
    RequestHandle,
    RequestState,
    StepCounter,
    _current,
    new_state,
)
from ._worker import ExportWorker

if TYPE_CHECKING:
    import torch

    from .config import ForensicsConfig
    from .exporters import Exporter

__all__ = ["Recorder"]

_log = logging.getLogger(__name__)


class Recorder:
    """Records what the model computed for requests whose trigger fires.

    Args:
        model: the ``torch.nn.Module`` being served (hooks are installed at construction).
        sites: canonical site strings (DESIGN §4); default from ``recorder.granularity``.
        trigger: a :mod:`integrations.triggers` object; default ``OnFlag()``.
        exporter: where incidents go; default an :class:`~integrations.exporters.InMemoryExporter`.
        config: a ``ForensicsConfig``, a YAML path, or None (embedded defaults + environment).
        tokenizer: optional; referenced in the manifest and used to decode outputs.
        model_name / model_revision: the model reference written into every manifest.
        max_queue: bound of the export queue (a full queue drops and counts, never blocks).
        capture_logits: record last-position logits per step for captured requests.
        capture_content: keep raw text (input/output) in the manifest; off by default.
        max_bundle_size_mb: overrides ``recorder.max_bundle_size_mb``.
        metrics_registry: Prometheus registry for the recorder metrics (default: global).
        flight_recorder_mb: keep a per-request flight recorder of at most this many MiB:
            every request whose trigger has not fired is captured provisionally into its own
            bounded buffer, kept as the incident's activations if the trigger fires by the time
            the request ends (a guardrail flagging the output), else discarded. A request that
            outgrows the buffer stops capturing (a later flag then gives a replay incident).
            Costs a copy of the recorded sites on every request (measured in
            ``benchmarks/recorder_overhead.py``) and up to this much memory per request in
            flight. None (default): off.

    A context manager: ``with Recorder(...) as rec:`` shuts it down on exit (also when the body
    raises), so its worker thread and hooks never outlive the block.
    """

    def __init__(self, model: torch.nn.Module, *, sites: Sequence[str] | None = None,
                 trigger: _triggers.Trigger | None = None, exporter: Exporter | None = None,
                 config: ForensicsConfig | str | os.PathLike[str] | None = None,
                 tokenizer: Any = None, model_name: str | None = None,
                 model_revision: str | None = None, max_queue: int = 64,
                 capture_logits: bool = True, capture_content: bool = False,
                 max_bundle_size_mb: float | None = None,
                 metrics_registry: Any | None = None,
                 flight_recorder_mb: float | None = None) -> None:
        from .config import ForensicsConfig, default_sites, load_config
        from .exporters import InMemoryExporter

        cfg = config if isinstance(config, ForensicsConfig) else load_config(config)
        self.config = cfg
        self.model = model
        self.enabled = bool(cfg.recorder.enabled)
        self.site_specs = list(sites) if sites is not None else default_sites(
            cfg.recorder.granularity)
        self.trigger = trigger if trigger is not None else _triggers.OnFlag()
        self.exporter: Exporter = exporter if exporter is not None else InMemoryExporter()
        self.tokenizer = tokenizer
        max_bytes = (cfg.recorder.max_bundle_size_bytes if max_bundle_size_mb is None
                     else int(max_bundle_size_mb * (1 << 20)))
        self.metrics = RecorderMetrics(registry=metrics_registry)
        bind = getattr(self.exporter, "bind_metrics", None)
        if callable(bind):  # exporters that count their own drops / spool bytes
            bind(self.metrics)
        known = getattr(getattr(model, "config", None), "forensics_model_ref", None) or {}
        self.model_ref = {
            "name": model_name or known.get("name") or _model_name(model),
            "revision": model_revision or known.get("revision"),
            "class": type(model).__name__,
        }
        if flight_recorder_mb is not None and not flight_recorder_mb > 0:
            from .errors import ConfigError

            raise ConfigError(f"flight_recorder_mb={flight_recorder_mb}: use a positive size "
                              "in MiB, or None to turn the flight recorder off")
        flight = 0 if flight_recorder_mb is None else int(flight_recorder_mb * (1 << 20))
        self._hooks = CaptureHooks(owner=self, trigger=self.trigger,
                                   capture_logits=capture_logits, max_bytes=max_bytes,
                                   flight_bytes=min(flight, max_bytes))
        self.bound: list[Any] = []
        if self.enabled:
            from .sites import resolve_sites

            self.bound = resolve_sites(model, self.site_specs)  # fails early on bad names
        build = IncidentFactory(model=model, model_ref=self.model_ref, tokenizer=tokenizer,
                                sites=[b.site for b in self.bound],
                                capture_content=capture_content, max_bytes=max_bytes,
                                compression=cfg.recorder.ipc_compression)
        self._worker: ExportWorker[PendingIncident] = ExportWorker(
            exporter=self.exporter, metrics=self.metrics, build=build, max_queue=max_queue)
        if self.enabled:
            self._hooks.install(model, self.bound)
        self._worker.start()

    # --------------------------------------------------------------- requests
    @contextlib.contextmanager
    def request(self, *, request_id: str | None = None, tenant: str | None = None,
                headers: Mapping[str, str] | None = None,
                traceparent: str | None = None) -> Iterator[RequestHandle]:
        """Serve one request under the recorder (its batch rows are all of the forward's)."""
        st = new_state(request_id=request_id, tenant=tenant, headers=headers,
                       traceparent=traceparent, rows=slice(None))
        with self._serving([st]) as act:
            yield RequestHandle(st, act)

    @contextlib.contextmanager
    def batch(self, request_ids: Sequence[str], *, tenants: Sequence[str | None] | None = None,
              headers: Sequence[Mapping[str, str]] | None = None) -> Iterator[BatchHandle]:
        """Serve a batch: row ``i`` of every forward belongs to ``request_ids[i]``.

        Triggers are decided per request; only rows of requests that fire are copied; each
        request becomes its own incident.
        """
        states = [new_state(request_id=rid, tenant=None if tenants is None else tenants[i],
                            headers=None if headers is None else headers[i], traceparent=None,
                            rows=slice(i, i + 1)) for i, rid in enumerate(request_ids)]
        with self._serving(states) as act:
            yield BatchHandle(act)

    def _context(self, states: list[RequestState]) -> RequestContext:
        return RequestContext(owner=self, states=states, counter=StepCounter(),
                       tokenizer=self.tokenizer)

    @contextlib.contextmanager
    def _serving(self, states: list[RequestState]) -> Iterator[RequestContext]:
        act = self._context(states)
        if self.enabled:
            _snapshot_rng(states)
        token = _current.set(act)
        try:
            yield act
        except BaseException as e:
            for st in states:
                st.request_error = type(e).__name__
            raise
        finally:
            _current.reset(token)
            if self.enabled:
                self._finish(act)

    def start_ambient(self, *, request_id: str | None = None, incident_id: str | None = None,
                      fire: str = "always") -> None:
        """Capture every forward call, in any thread, until :meth:`end_ambient` (seed facade)."""
        st = new_state(request_id=request_id, tenant=None, headers=None, traceparent=None,
                       rows=slice(None))
        st.incident_id = incident_id
        st.decided, st.capturing, st.capture_from_step = True, True, 0
        st.fire = _triggers.Fire(fire, fire)
        _snapshot_rng([st])
        self._hooks.ambient = self._context([st])

    def end_ambient(self, *, incident_id: str | None = None) -> str | None:
        """Finish the ambient capture; returns the incident id queued (None if dropped)."""
        act, self._hooks.ambient = self._hooks.ambient, None
        if act is None:
            return None
        if incident_id is not None:
            act.states[0].incident_id = incident_id
        return self._finish(act)[0]

    def _finish(self, act: RequestContext) -> list[str | None]:
        """Turn finished request states into queued incidents (never raises)."""
        out: list[str | None] = []
        for st in act.states:
            try:
                out.append(self._finish_one(st, last_step=act.counter.next_step - 1))
            except Exception as e:  # pragma: no cover - defensive: never into serving
                _log.exception("forensics: finishing request %s failed", st.request_id)
                self.metrics.captured()
                self.metrics.dropped("capture_error")
                st.error = repr(e)
                out.append(None)
        return out

    def _finish_one(self, st: RequestState, *, last_step: int) -> str | None:
        fire = st.fire
        if fire is None:
            fire = self.trigger.post(st.view(with_output=True))
            if fire is None:
                return None
        self.metrics.captured()
        if st.too_large:
            self.metrics.dropped("too_large")
            return None
        if st.error is not None:
            self.metrics.dropped("capture_error")
            return None
        full = st.capturing and st.capture_from_step == 0
        records = st.records if full else [r for r in st.records if r.kind == "input"]
        pending = PendingIncident(incident_id=st.incident_id or uuid.uuid4().hex, state=st,
                                  fire=fire, records=records,
                                  activations="captured" if full else "replay",
                                  last_step=last_step)
        return self._worker.submit(pending.incident_id, pending)

    # -------------------------------------------------------------- lifecycle
    def stats(self) -> dict[str, Any]:
        """Captured / exported / dropped-by-reason tallies and the current queue depth."""
        snap = self.metrics.snapshot()
        snap["queue_depth"] = self._worker.depth()
        return snap

    def force_flush(self, *, timeout_s: float = 30.0) -> bool:
        """Wait until every queued incident was exported (or dropped); False on timeout."""
        return self._worker.flush(timeout_s=timeout_s)

    def shutdown(self, *, timeout_s: float = 30.0) -> None:
        """Remove the hooks, flush the queue (counting what is left as dropped), close the
        exporter. Idempotent."""
        self._hooks.remove()
        self._worker.stop(timeout_s=timeout_s)

    close = shutdown

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _snapshot_rng(states: list[RequestState]) -> None:
    import torch

    rng = torch.get_rng_state()  # a copy; reading the state never advances it
    for st in states:
        st.rng_state = rng


def _model_name(model: Any) -> str:
    cfg = getattr(model, "config", None)
    for attr in ("_name_or_path", "name_or_path"):
        v = getattr(cfg, attr, None) or getattr(model, attr, None)
        if v:
            return str(v)
    return type(model).__name__
