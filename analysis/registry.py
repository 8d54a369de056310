"""In-process model registry: find the model an incident was recorded with, by fingerprint or name.

Replay needs the exact weights an incident was recorded with. Models (or loaders, called once on
first use) are registered under a name; lookups match the weights fingerprint first (of models
already loaded, or declared at registration), then the name. Built in: SmolLM2-135M-Instruct
(:func:`analysis.models.load_smollm2`) and all-MiniLM-L6-v2 (:func:`analysis.models.load_minilm`),
under the names their loaders stamp on the model. Scenario code registers its planted/tiny models.

Example::

    from analysis import registry
    registry.register_model("planted-gpt2-s0", loader=lambda: build_planted(seed=0))
    model = registry.model_for_incident(inc)          # fingerprint, else name from the manifest
    registry.register_model("my-model", model)        # an already loaded model
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from integrations.errors import ModelError

if TYPE_CHECKING:
    import torch

    from integrations.incident import Incident

__all__ = ["Loader", "ModelEntry", "get_model", "model_for_incident", "register_model",
           "registered", "unregister_model"]

Loader = Callable[[], Any]


@dataclass
class ModelEntry:
    """One registered model: a loaded module and/or a loader returning it (or ``(model, tok)``)."""

    name: str
    loader: Loader | None = None
    model: Any = None
    tokenizer: Any = None
    fingerprint: str | None = None
    aliases: tuple[str, ...] = ()
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def load(self) -> torch.nn.Module:
        """The model (loaded on first use; ``eval()`` mode)."""
        with self.lock:
            if self.model is None:
                if self.loader is None:  # pragma: no cover - register_model forbids it
                    raise ModelError(f"model {self.name!r} has neither a model nor a loader")
                got = self.loader()
                if isinstance(got, tuple):
                    self.model, self.tokenizer = got[0], (got[1] if len(got) > 1 else None)
                else:
                    self.model = got
                if hasattr(self.model, "eval"):
                    self.model.eval()
            return self.model  # type: ignore[no-any-return]

    def loaded_fingerprint(self) -> str | None:
        """The fingerprint of the loaded model (None when not loaded yet)."""
        if self.model is None:
            return self.fingerprint
        if self.fingerprint is None:
            from integrations.incident import model_fingerprint

            self.fingerprint = model_fingerprint(self.model)
        return self.fingerprint


_LOCK = threading.Lock()
_ENTRIES: dict[str, ModelEntry] = {}
_BUILTINS_DONE = False


def _builtins() -> None:
    global _BUILTINS_DONE
    if _BUILTINS_DONE:
        return
    _BUILTINS_DONE = True

    def smollm2() -> Any:
        from analysis.models import load_smollm2

        return load_smollm2()

    def minilm() -> Any:
        from analysis.models import load_minilm

        return load_minilm()

    from analysis.models import MINILM_NAME, SMOLLM2_NAME

    _ENTRIES.setdefault(SMOLLM2_NAME, ModelEntry(SMOLLM2_NAME, loader=smollm2,
                                                 aliases=("smollm2",)))
    _ENTRIES.setdefault(MINILM_NAME, ModelEntry(MINILM_NAME, loader=minilm,
                                                aliases=("minilm",)))


def register_model(name: str, model: Any = None, *, loader: Loader | None = None,
                   tokenizer: Any = None, fingerprint: str | None = None,
                   aliases: tuple[str, ...] = (), replace: bool = True) -> ModelEntry:
    """Register ``model`` (a loaded module) or ``loader`` (called once, on first use) as ``name``.

    ``fingerprint`` declares the weights fingerprint of a not-yet-loaded model (lets fingerprint
    lookups skip loading); ``replace=False`` keeps an existing entry of that name.
    """
    if (model is None) == (loader is None):
        raise ModelError(f"register_model({name!r}): give exactly one of model= or loader=")
    with _LOCK:
        _builtins()
        if not replace and name in _ENTRIES:
            return _ENTRIES[name]
        entry = ModelEntry(name, loader=loader, model=model, tokenizer=tokenizer,
                           fingerprint=fingerprint, aliases=tuple(aliases))
        _ENTRIES[name] = entry
        return entry


def unregister_model(name: str) -> bool:
    """Remove ``name``; True if it was registered."""
    with _LOCK:
        return _ENTRIES.pop(name, None) is not None


def registered() -> list[str]:
    """Registered model names (built-ins included), sorted."""
    with _LOCK:
        _builtins()
        return sorted(_ENTRIES)


def _find(name: str | None, fingerprint: str | None) -> ModelEntry | None:
    with _LOCK:
        _builtins()
        entries = list(_ENTRIES.values())
    if fingerprint:
        for e in entries:
            if e.model is not None or e.fingerprint is not None:
                if e.loaded_fingerprint() == fingerprint:
                    return e
    if name:
        for e in entries:
            if name == e.name or name in e.aliases:
                return e
    return None


def get_model(*, name: str | None = None, fingerprint: str | None = None) -> torch.nn.Module:
    """The registered model with this fingerprint (preferred) or name; loads it if needed.

    Raises :class:`~integrations.errors.ModelError` listing the registered names.
    """
    entry = _find(name, fingerprint)
    if entry is None:
        fp = f"{fingerprint[:23]}…" if fingerprint else "none"
        raise ModelError(
            f"no registered model for name {name!r} (fingerprint {fp}); registered: "
            f"{registered()}. Register it with analysis.registry.register_model(name, model) "
            "or register_model(name, loader=...)")
    return entry.load()


def model_for_incident(incident: Incident) -> torch.nn.Module:
    """The model an incident was recorded with (its manifest's fingerprint, else name)."""
    ref = incident.manifest.get("model") or {}
    return get_model(name=ref.get("name"), fingerprint=ref.get("fingerprint"))
