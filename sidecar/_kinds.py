"""Built-in analysis job kinds: ``stats`` (per-site tensor statistics) and ``replay``; importing
this module also registers ``cf`` and ``baseline`` (:mod:`sidecar._kinds_cf`) and ``cca``
(:mod:`sidecar._kinds_cca`).

``stats`` reads the stored tensors and reports, per (kind, site, step), mean / std / L2 norm /
min / max / count of non-finite values, computed in float64 from the Arrow data.
``replay`` loads the incident's model from the sidecar's model registry (config ``models:``,
matched by fingerprint, else name), replays the incident with ``analysis.Replayer`` and records
the measured fidelity plus the per-site statistics. An unregistered model fails the job with a
message saying how to register it.

Example::

    runner.submit("inc-1", "stats", tenant="acme")
    runner.submit("inc-1", "replay", tenant="acme")
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._jobs import JobContext, JobFailed, register_job_kind

if TYPE_CHECKING:
    from integrations.incident import Incident

    from ._config import ModelSpec

__all__ = ["load_registered", "load_registered_model", "replay_job", "stats_job",
           "tensor_stats"]

_STAT_KINDS = ("activation", "logits", "reference")


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def tensor_stats(incident: Incident, *, kinds: tuple[str, ...] = _STAT_KINDS) -> list[dict[str, Any]]:
    """Statistics of every stored tensor of the given row kinds, in storage order."""
    import torch

    out: list[dict[str, Any]] = []
    for rec in incident.records():
        if rec.kind not in kinds:
            continue
        t = rec.tensor
        x = t.detach().to(torch.float64).reshape(-1)   # [numel]
        n = int(x.numel())
        finite = torch.isfinite(x)
        n_bad = int(n - int(finite.sum()))
        xf = x[finite]
        stats: dict[str, Any] = {
            "kind": rec.kind, "site": rec.site, "step": int(rec.step),
            "dtype": str(t.dtype).removeprefix("torch."), "shape": [int(d) for d in t.shape],
            "numel": n, "nonfinite": n_bad,
        }
        if xf.numel():
            stats.update(
                mean=_finite(float(xf.mean())),
                std=_finite(float(xf.std(unbiased=False))),
                norm=_finite(float(torch.linalg.vector_norm(xf))),
                min=_finite(float(xf.min())), max=_finite(float(xf.max())),
            )
        else:
            stats.update(mean=None, std=None, norm=None, min=None, max=None)
        out.append(stats)
    return out


@register_job_kind("stats")
def stats_job(ctx: JobContext) -> dict[str, Any]:
    """Job kind ``stats``: per-(kind, site, step) tensor statistics of the stored incident."""
    inc = ctx.open_incident()
    kinds = tuple(ctx.params.get("kinds", _STAT_KINDS))
    rows = tensor_stats(inc, kinds=kinds)
    return {"incident_id": inc.id, "n_tensors": len(rows), "tensors": rows}


_MODEL_CACHE: dict[str, Any] = {}
_MODEL_LOCK = threading.Lock()


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


def load_registered_model(spec: ModelSpec) -> Any:
    """The model of a registry entry (see :func:`load_registered`)."""
    return load_registered(spec)[0]


def _fidelity_dict(fid: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(fid) and not isinstance(fid, type):
        raw = dataclasses.asdict(fid)
    elif isinstance(fid, Mapping):
        raw = dict(fid)
    else:
        raw = {k: getattr(fid, k) for k in dir(fid)
               if not k.startswith("_") and not callable(getattr(fid, k))}
    return json.loads(json.dumps(raw, default=str))


@register_job_kind("replay")
def replay_job(ctx: JobContext) -> dict[str, Any]:
    """Job kind ``replay``: deterministic replay with the registered model; records fidelity
    (measured) and per-site statistics."""
    inc = ctx.open_incident()
    ref = inc.manifest.get("model") or {}
    name, fingerprint = ref.get("name"), ref.get("fingerprint")
    spec = ctx.config.find_model(name=name, fingerprint=fingerprint)
    if spec is None:
        fp = f"{fingerprint[:16]}…" if isinstance(fingerprint, str) else "none"
        raise JobFailed(
            f"model not registered: incident {inc.id} was recorded with model {name!r} "
            f"(fingerprint {fp}); add it to the sidecar config under `models:` as "
            "{name, fingerprint, loader: 'module:function'} and run the analysis again")
    try:
        from analysis.replay import Replayer
    except ImportError as e:
        raise JobFailed(f"analysis.Replayer is not available in this install ({e}); install "
                        "model-forensics[analysis] on the sidecar") from e
    model = load_registered_model(spec)
    session = Replayer(model).load(inc)
    fidelity = session.fidelity() if hasattr(session, "fidelity") else None
    return {
        "incident_id": inc.id,
        "model": {"name": spec.name, "fingerprint": fingerprint, "loader": spec.loader},
        "fidelity": None if fidelity is None else _fidelity_dict(fidelity),
        "tensors": tensor_stats(inc),
    }


def _register_analysis_kinds() -> None:
    from . import _kinds_cca, _kinds_cf  # noqa: F401  (register cf, baseline, cca)


_register_analysis_kinds()
