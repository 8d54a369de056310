"""The Recorder: hooks on the selected sites, per-request capture, bounded export queue.

Serving path (the model's own thread): hooks check the request context, copy the selected
activations of requests whose trigger fired, and at the end of the request hand the copies to a
bounded queue with ``put_nowait``. Everything else — building the Arrow incident, hashing the
weights, exporting — runs on the recorder's worker thread (:mod:`integrations._worker`). No
exception from forensics ever reaches the model call; every captured incident is either
exported or counted as dropped, by reason.

Example::

    from integrations import Recorder, triggers, exporters
    ex = exporters.InMemoryExporter()
    rec = Recorder(model, sites=["blocks.*.resid_post"], trigger=triggers.OnFlag(), exporter=ex)
    with rec.request(request_id="r-1") as req:
        req.flag("prompt_injection")            # flagged before the model runs: capture
        out = model.generate(**inputs)
        req.set_output(ids=out)
    rec.force_flush(timeout_s=10)
    inc = ex.incidents[-1]
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from . import triggers as _triggers
from ._metrics import RecorderMetrics
from ._request import (
    BatchHandle,
    RequestHandle,
    RequestState,
    _Active,
    _current,
    _Row,
    _StepCounter,
    new_state,
)
from ._worker import ExportWorker, PendingIncident
from .external import active_sandbox

if TYPE_CHECKING:
    import torch

    from .config import ForensicsConfig
    from .exporters import Exporter

__all__ = ["Recorder"]

_log = logging.getLogger(__name__)

#: Top-level forward kwargs recorded as ``kind="input"`` rows (everything replay needs).
_INPUT_NAMES = ("input_ids", "attention_mask", "position_ids", "token_type_ids",
                "cache_position", "inputs_embeds")
#: Inputs without a batch dimension (stored whole for every request of a batch).
_UNBATCHED = frozenset({"cache_position"})


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
    """

    def __init__(self, model: torch.nn.Module, *, sites: Sequence[str] | None = None,
                 trigger: _triggers.Trigger | None = None, exporter: Exporter | None = None,
                 config: ForensicsConfig | str | os.PathLike[str] | None = None,
                 tokenizer: Any = None, model_name: str | None = None,
                 model_revision: str | None = None, max_queue: int = 64,
                 capture_logits: bool = True, capture_content: bool = False,
                 max_bundle_size_mb: float | None = None,
                 metrics_registry: Any | None = None) -> None:
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
        self.capture_logits = capture_logits
        self.capture_content = capture_content
        mb = max_bundle_size_mb if max_bundle_size_mb is not None else \
            cfg.recorder.max_bundle_size_mb
        self.max_bundle_bytes = int(mb * 1024 * 1024)
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
        self._ambient: _Active | None = None
        self._handles: list[Any] = []
        self._attach: contextlib.AbstractContextManager[Any] | None = None
        self.bound: list[Any] = []
        if self.enabled:
            self._install()
        self._worker = ExportWorker(recorder=self, max_queue=max_queue,
                                    compression_ratio=cfg.recorder.compression_ratio)
        self._worker.start()

    # ------------------------------------------------------------------ hooks
    def _install(self) -> None:
        from .sites import attach, resolve_sites

        self.bound = resolve_sites(self.model, self.site_specs)  # fails early on bad names
        self._attach = attach(self.model, self.bound, self._on_site)
        self._attach.__enter__()
        try:
            self._handles.append(self.model.register_forward_pre_hook(
                self._on_forward_pre, with_kwargs=True))
            self._handles.append(self.model.register_forward_hook(
                self._on_forward, with_kwargs=True))
        except BaseException:
            self._remove_hooks()
            raise

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._attach is not None:
            self._attach.__exit__(None, None, None)
            self._attach = None

    def _active(self) -> _Active | None:
        act = _current.get()
        if act is None and self._ambient is not None and active_sandbox() is None:
            act = self._ambient  # never record a deterministic replay as served traffic
        if act is None or act.recorder is not self:
            return None
        return act

    def _on_forward_pre(self, module: Any, args: tuple[Any, ...],
                        kwargs: dict[str, Any]) -> None:
        act = self._active()
        if act is None:
            return None
        try:
            ctr = act.counter
            ctr.depth += 1
            if ctr.depth > 1:
                return None
            step = ctr.next_step
            ctr.next_step += 1
            inputs = dict(kwargs)
            if args and "input_ids" not in inputs:
                inputs["input_ids"] = args[0]
            for st in act.states:
                if not st.decided:
                    st.decided = True
                    fire = self.trigger.pre(st.view())
                    if fire is not None:
                        st.fire, st.capturing, st.capture_from_step = fire, True, step
                for name in _INPUT_NAMES:
                    t = inputs.get(name)
                    if t is None or not hasattr(t, "detach"):
                        continue
                    if name == "inputs_embeds" and not st.capturing:
                        continue  # float inputs are only kept for captured requests
                    sel = t if name in _UNBATCHED else t[st.rows]
                    _keep(self, st, _Row("input", name, "", step, sel.detach().to(
                        "cpu", copy=True)))
        except Exception as e:  # never into the model call
            _fail_all(act, e)
        return None

    def _on_forward(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                    output: Any) -> None:
        act = self._active()
        if act is None:
            return None
        try:
            ctr = act.counter
            ctr.depth -= 1
            if ctr.depth > 0 or not self.capture_logits:
                return None
            caps = [st for st in act.states if st.capturing]
            if not caps:
                return None
            logits = _logits_of(output)
            if logits is None:
                return None
            last = logits[:, -1, :] if logits.dim() == 3 else logits  # [batch, vocab|labels]
            step = ctr.next_step - 1
            for st in caps:
                _keep(self, st, _Row("logits", "logits", "", step,
                                     last[st.rows].detach().to("cpu", copy=True)))
        except Exception as e:
            _fail_all(act, e)
        return None

    def _on_site(self, b: Any, value: torch.Tensor) -> None:
        act = self._active()
        if act is None:
            return None
        try:
            step = act.counter.next_step - 1
            for st in act.states:
                if st.capturing:
                    _keep(self, st, _Row("activation", b.site, b.module_path, step,
                                         value[st.rows].detach().to("cpu", copy=True)))
        except Exception as e:
            _fail_all(act, e)
        return None

    # --------------------------------------------------------------- requests
    @contextlib.contextmanager
    def request(self, *, request_id: str | None = None, tenant: str | None = None,
                headers: Mapping[str, str] | None = None,
                traceparent: str | None = None) -> Iterator[RequestHandle]:
        """Serve one request under the recorder (its batch rows are all of the forward's)."""
        st = new_state(request_id=request_id, tenant=tenant, headers=headers,
                       traceparent=traceparent, rows=slice(None))
        with self._serving([st]) as act:
            yield RequestHandle(self, st, act)

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
            yield BatchHandle(self, act)

    @contextlib.contextmanager
    def _serving(self, states: list[RequestState]) -> Iterator[_Active]:
        act = _Active(recorder=self, states=states, counter=_StepCounter())
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
        self._ambient = _Active(recorder=self, states=[st], counter=_StepCounter())

    def end_ambient(self, *, incident_id: str | None = None) -> str | None:
        """Finish the ambient capture; returns the incident id queued (None if dropped)."""
        act, self._ambient = self._ambient, None
        if act is None:
            return None
        if incident_id is not None:
            act.states[0].incident_id = incident_id
        return self._finish(act)[0]

    def _finish(self, act: _Active) -> list[str | None]:
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
        rows = st.records if full else [r for r in st.records if r.kind == "input"]
        pending = PendingIncident(state=st, fire=fire, rows=rows,
                                  activations="captured" if full else "replay",
                                  last_step=last_step)
        return self._worker.submit(pending)

    # ------------------------------------------------------------------ output
    def _decode(self, ids: torch.Tensor) -> str | None:
        if self.tokenizer is None:
            return None
        try:
            seq = ids[0] if ids.dim() > 1 else ids
            return str(self.tokenizer.decode(seq.tolist(), skip_special_tokens=True))
        except Exception:
            return None

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
        self._remove_hooks()
        self._worker.stop(timeout_s=timeout_s)

    close = shutdown

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _keep(rec: Recorder, st: RequestState, row: _Row) -> None:
    if st.too_large:
        return
    n = row.tensor.element_size() * row.tensor.nelement()
    st.nbytes += n
    if st.nbytes > rec.max_bundle_bytes:
        st.too_large = True
        st.records.clear()  # free memory now; the incident is dropped and counted at the end
        return
    st.records.append(row)


def _fail_all(act: _Active, e: Exception) -> None:
    _log.warning("forensics: capture failed (%s: %s); the incident will be dropped",
                 type(e).__name__, e)
    for st in act.states:
        if st.error is None:
            st.error = f"{type(e).__name__}: {e}"


def _snapshot_rng(states: list[RequestState]) -> None:
    import torch

    rng = torch.get_rng_state()  # a copy; reading the state never advances it
    for st in states:
        st.rng_state = rng


def _logits_of(output: Any) -> torch.Tensor | None:
    import torch

    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def _model_name(model: Any) -> str:
    cfg = getattr(model, "config", None)
    for attr in ("_name_or_path", "name_or_path"):
        v = getattr(cfg, attr, None) or getattr(model, attr, None)
        if v:
            return str(v)
    return type(model).__name__
