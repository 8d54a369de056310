"""The sidecar's model registry at work: finding and loading the model an incident was recorded
with (config ``models:``), once per process, and replay fidelity as JSON.

Example::

    spec = registered_spec(ctx.config, inc)              # None: not registered
    model, tokenizer = load_registered(spec)
    fidelity_dict(Replayer(model).load(inc).fidelity())  # {'exact': True, ...}
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._kind import JobFailed

if TYPE_CHECKING:
    from integrations.incident import Incident

    from .._config import SidecarConfig
    from .._config_sections import ModelSpec

__all__ = ["fidelity_dict", "load_registered", "model_ref", "registered_spec",
           "require_registered"]

_MODEL_CACHE: dict[str, Any] = {}
_MODEL_LOCK = threading.Lock()


def model_ref(inc: Incident) -> tuple[str | None, str | None]:
    """(name, fingerprint) of the model an incident was recorded with."""
    ref = inc.manifest.get("model") or {}
    return ref.get("name"), ref.get("fingerprint")


def registered_spec(config: SidecarConfig, inc: Incident) -> ModelSpec | None:
    """The registry entry for the incident's model (fingerprint first, then name)."""
    name, fingerprint = model_ref(inc)
    return config.find_model(name=name, fingerprint=fingerprint)


def require_registered(config: SidecarConfig, inc: Incident, *, job: str) -> ModelSpec:
    """:func:`registered_spec`, or :class:`JobFailed` saying what to add to the config;
    ``job`` names what needed the model (e.g. ``"CCA replays"``)."""
    spec = registered_spec(config, inc)
    if spec is None:
        name, fingerprint = model_ref(inc)
        fp = f"{fingerprint[:16]}…" if isinstance(fingerprint, str) else "none"
        raise JobFailed(
            f"model not registered: {job} incident {inc.id}, recorded with model {name!r} "
            f"(fingerprint {fp}); add it to the sidecar config under `models:` as "
            "{name, fingerprint, loader: 'module:function'} (the loader returns the model, or "
            "(model, tokenizer) where text is decoded) and run the analysis again")
    return spec


def load_registered(spec: ModelSpec) -> tuple[Any, Any]:
    """Load (once per process) ``(model, tokenizer or None)`` of a registry entry via its
    ``module:function`` (which returns a model or ``(model, tokenizer)``)."""
    key = json.dumps([spec.name, spec.loader, spec.fingerprint, dict(spec.kwargs)],
                     sort_keys=True, default=str)
    with _MODEL_LOCK:
        if key in _MODEL_CACHE:
            return _MODEL_CACHE[key]  # type: ignore[no-any-return]
        module_name, _, fn_name = spec.loader.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise JobFailed(f"model {spec.name!r}: loader {spec.loader!r} cannot be imported "
                            f"({e}); fix models[].loader in the sidecar config") from e
        loaded = fn(**dict(spec.kwargs))
        model, tok = (loaded[0], loaded[1] if len(loaded) > 1 else None) \
            if isinstance(loaded, tuple) else (loaded, None)
        if hasattr(model, "eval"):
            model.eval()
        _MODEL_CACHE[key] = (model, tok)
        return model, tok


def fidelity_dict(fid: Any) -> dict[str, Any]:
    """A replay's measured fidelity as a JSON-able dict."""
    if dataclasses.is_dataclass(fid) and not isinstance(fid, type):
        raw = dataclasses.asdict(fid)
    elif isinstance(fid, Mapping):
        raw = dict(fid)
    else:
        raw = {k: getattr(fid, k) for k in dir(fid)
               if not k.startswith("_") and not callable(getattr(fid, k))}
    return json.loads(json.dumps(raw, default=str))  # type: ignore[no-any-return]
