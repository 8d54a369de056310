"""The seed README's recorder API (``RecorderHooks``) on top of :class:`integrations.Recorder`.

The seed recorded every forward call between ``install_hooks`` and ``create_bundle``; here that
is an *ambient* capture on a real Recorder (same sites, same exact Arrow incidents), and the
model is registered in-process so ``SandboxReplayer()`` can find it from the bundle.

Example::

    recorder = RecorderHooks(config="configs/default.yaml")
    recorder.install_hooks(model)
    outputs = model(**inputs)
    bundle = recorder.create_bundle("incident_20240812")     # an analysis.Incident
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from integrations import Recorder
    from integrations.config import ForensicsConfig
    from integrations.incident import Incident

__all__ = ["RecorderHooks"]


class RecorderHooks:
    """Seed-compatible recorder: ``install_hooks(model)`` then ``create_bundle(name)``.

    Every forward call of the model between the two (in any thread) is recorded, one step per
    call, at the configured sites (default from ``recorder.granularity``).
    """

    def __init__(self, config: ForensicsConfig | str | os.PathLike[str] | None = None, *,
                 sites: Sequence[str] | None = None, timeout_s: float = 120.0) -> None:
        from integrations.config import ForensicsConfig, load_config

        self.config = config if isinstance(config, ForensicsConfig) else load_config(config)
        self.sites = list(sites) if sites is not None else None
        self.timeout_s = timeout_s
        self.recorder: Recorder | None = None
        self.model: torch.nn.Module | None = None
        self.bundles: dict[str, Incident] = {}

    def install_hooks(self, model: torch.nn.Module, *, tokenizer: Any = None) -> None:
        """Hook ``model`` and start recording its forward calls."""
        from prometheus_client import CollectorRegistry

        from integrations import Recorder, exporters, triggers

        if self.recorder is not None:
            self.remove_hooks()
        self.recorder = Recorder(model, sites=self.sites, trigger=triggers.Never(),
                                 exporter=exporters.InMemoryExporter(), config=self.config,
                                 tokenizer=tokenizer, metrics_registry=CollectorRegistry())
        self.model = model
        _register(str(self.recorder.model_ref["name"]), model, tokenizer)
        self.recorder.start_ambient(request_id="seed-recorder")

    def create_bundle(self, name: str) -> Incident:
        """Close the current recording as incident ``name`` and start a new one.

        Raises :class:`~integrations.errors.ForensicsError` if hooks are not installed, nothing
        was recorded, or the incident was dropped (e.g. over ``max_bundle_size_mb``).
        """
        from integrations.errors import ForensicsError, IncidentTooLargeError

        rec = self.recorder
        if rec is None:
            raise ForensicsError("create_bundle() before install_hooks(model): install first")
        before = rec.stats()["dropped"]
        queued = rec.end_ambient(incident_id=name)
        rec.force_flush(timeout_s=self.timeout_s)
        rec.start_ambient(request_id="seed-recorder")
        incs = [i for i in rec.exporter.incidents if i.id == name]  # type: ignore[attr-defined]
        if queued is None or not incs:
            after = rec.stats()["dropped"]
            why = {k: after.get(k, 0) - before.get(k, 0) for k in after} or "nothing recorded"
            if isinstance(why, dict) and why.get("too_large"):
                raise IncidentTooLargeError(
                    f"bundle {name!r} is larger than recorder.max_bundle_size_mb="
                    f"{self.config.recorder.max_bundle_size_mb}; record fewer sites or raise it")
            raise ForensicsError(f"bundle {name!r} was not created ({why}); run the model "
                                 "between install_hooks() and create_bundle()")
        inc = incs[-1]
        self.bundles[name] = inc
        return inc

    def remove_hooks(self) -> None:
        """Stop recording and remove every hook."""
        if self.recorder is not None:
            self.recorder.end_ambient()
            self.recorder.shutdown(timeout_s=self.timeout_s)
            self.recorder = None


def _register(name: str, model: Any, tokenizer: Any) -> None:
    """Make the model findable by ``SandboxReplayer()`` from a bundle's model reference."""
    try:
        from analysis.registry import register_model
    except ImportError:  # the analysis extra is not installed: replay needs an explicit model
        return
    register_model(name, model, tokenizer=tokenizer)
