"""The portable fix file: a fix set's interventions as JSON + safetensors (no pickle).

``fix.json`` holds the format tag, the model reference the fix was derived on, the
interventions (site, kind, factor, subspace rule, gate bias) and the measurements that back
them (``FixSet.to_dict()``, labelled as measured at derivation); ``fix.safetensors`` beside it
holds the tensors (subspace bases and bounds, steering vectors, gate weights, mean vectors),
named ``iv<i>.<field>``, and its sha256 is in the JSON. Loading validates every field and
tensor (types, shapes, finiteness, sizes) before building anything: a fix file is untrusted
input. Only portable interventions (:func:`analysis.interventions.check_portable`) can be saved.

Example::

    write_fix("out/fix.json", interventions=ivs, measured=fix.to_dict(), model=ref)
    ivs, measured, model = read_fix("out/fix.json")   # what FixSet.save / FixSet.load do
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from analysis.interventions import (
    DonorBaseline,
    Intervention,
    LinearGate,
    PromptGate,
    Subspace,
    check_portable,
)
from integrations.errors import FixFileError, InterventionError
from integrations.incident import fsync_dir

__all__ = ["FORMAT", "read_fix", "write_fix"]

FORMAT = "model-forensics.fixset/1"
_MAX_JSON_BYTES = 16 << 20
_MAX_TENSOR_BYTES = 256 << 20
_RULE_FIELDS = ("mean", "lo", "hi")


def _tensors_path(path: Path) -> Path:
    return path.with_suffix(".safetensors")


def _encode(i: int, iv: Intervention, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    check_portable(iv)
    entry: dict[str, Any] = {"site": iv.site, "kind": iv.kind, "factor": iv.factor}
    if isinstance(iv.direction, Subspace):
        sub = iv.direction
        entry["to"] = sub.to
        tensors[f"iv{i}.basis"] = sub.basis
        for name in _RULE_FIELDS:
            v = getattr(sub, name)
            if v is not None:
                tensors[f"iv{i}.{name}"] = v
    elif isinstance(iv.direction, torch.Tensor):
        tensors[f"iv{i}.vector"] = iv.direction
    if isinstance(iv.gate, PromptGate):
        tensors[f"iv{i}.prompt_gate"] = iv.gate.weight
        entry["prompt_gate"] = {"site": iv.gate.site, "bias": iv.gate.bias}
    elif iv.gate is not None:
        tensors[f"iv{i}.gate"] = iv.gate.weight
        entry["gate_bias"] = iv.gate.bias
    if iv.kind == "mean":
        assert iv.baseline is not None
        tensors[f"iv{i}.mean_vector"] = iv.baseline.mean(iv.site).float()
    return entry


def write_fix(path: str | os.PathLike[str], *, interventions: Sequence[Intervention],
              measured: dict[str, Any], model: dict[str, Any] | None) -> Path:
    """Write ``interventions`` to ``path`` (JSON, with ``measured`` and the ``model``
    reference) and their tensors beside it (module doc); returns the JSON path. Raises
    :class:`~integrations.errors.InterventionError` for a non-portable intervention."""
    from safetensors.torch import save

    p = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    entries = [_encode(i, iv, tensors) for i, iv in enumerate(interventions)]
    # clone: interventions may share one tensor (e.g. one PromptGate for every layer), and
    # safetensors refuses tensors that share memory
    blob = save({k: v.detach().to("cpu", torch.float32).clone().contiguous()
                 for k, v in tensors.items()})
    measured = {k: v for k, v in measured.items() if k != "interventions"}
    doc = {"format": FORMAT, "model": model, "interventions": entries,
           "tensors_sha256": hashlib.sha256(blob).hexdigest(),
           "measured_at_derivation": measured}
    p.parent.mkdir(parents=True, exist_ok=True)
    for target, data in ((_tensors_path(p), blob),
                         (p, json.dumps(doc, indent=1, allow_nan=False).encode())):
        tmp = target.with_name(f".{target.name}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    fsync_dir(p.parent)
    return p


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load

    try:
        raw = path.read_bytes()
        blob = _tensors_path(path).read_bytes()
    except OSError as e:
        raise FixFileError(f"cannot read fix file {path} (and its .safetensors): {e}") from e
    if len(raw) > _MAX_JSON_BYTES or len(blob) > _MAX_TENSOR_BYTES:
        raise FixFileError(f"fix file {path} is larger than a fix can be")
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise FixFileError(f"{path} is not JSON: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise FixFileError(f"{path} is not a fix file of format {FORMAT!r}")
    if doc.get("tensors_sha256") != hashlib.sha256(blob).hexdigest():
        raise FixFileError(f"{_tensors_path(path)} does not match {path} (sha256 differs); "
                           "copy both files together")
    try:
        tensors = load(blob)
    except Exception as e:   # safetensors raises its own error types for corrupt headers
        raise FixFileError(f"{_tensors_path(path)} is not a valid safetensors file: {e}") from e
    for k, t in tensors.items():
        if t.dtype != torch.float32 or not bool(torch.isfinite(t).all()):
            raise FixFileError(f"tensor {k!r} must be finite float32")
    return doc, tensors


def _decode(i: int, entry: Any, tensors: dict[str, torch.Tensor]) -> Intervention:
    if not isinstance(entry, dict) or not isinstance(entry.get("site"), str) \
            or not isinstance(entry.get("kind"), str):
        raise FixFileError(f"intervention {i} needs string 'site' and 'kind'")
    factor = entry.get("factor")
    if factor is not None and not isinstance(factor, int | float):
        raise FixFileError(f"intervention {i}: factor must be a number")
    t = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"iv{i}.")}
    kw: dict[str, Any] = {}
    if "basis" in t:
        kw["direction"] = Subspace(basis=t["basis"], to=entry.get("to", "zero"),
                                   **{n: t[n] for n in _RULE_FIELDS if n in t})
    elif "vector" in t:
        kw["direction"] = t["vector"]
    if "gate" in t:
        bias = entry.get("gate_bias", 0.0)
        if not isinstance(bias, int | float):
            raise FixFileError(f"intervention {i}: gate_bias must be a number")
        kw["gate"] = LinearGate(weight=t["gate"], bias=float(bias))
    if "prompt_gate" in t:
        pg = entry.get("prompt_gate")
        if not isinstance(pg, dict) or not isinstance(pg.get("site"), str) or \
                not isinstance(pg.get("bias"), int | float):
            raise FixFileError(f"intervention {i}: prompt_gate needs a site and a numeric bias")
        kw["gate"] = PromptGate(site=pg["site"], weight=t["prompt_gate"], bias=float(pg["bias"]))
    if entry["kind"] == "mean":
        if "mean_vector" not in t:
            raise FixFileError(f"intervention {i} (mean) has no mean vector")
        kw["donor"] = DonorBaseline.from_vectors({entry["site"]: t["mean_vector"][None]})
    iv = Intervention(entry["site"], entry["kind"], factor=factor, **kw)
    check_portable(iv)
    return iv


def read_fix(path: str | os.PathLike[str]
             ) -> tuple[list[Intervention], dict[str, Any], dict[str, Any] | None]:
    """Read a fix written by :func:`write_fix`, validated (module doc): its interventions,
    the measurements saved with it, and the model reference."""
    p = Path(path)
    doc, tensors = _read(p)
    entries = doc.get("interventions")
    if not isinstance(entries, list) or not entries:
        raise FixFileError(f"{p} lists no interventions")
    try:
        ivs = [_decode(i, e, tensors) for i, e in enumerate(entries)]
    except FixFileError:
        raise
    except InterventionError as e:
        raise FixFileError(f"{p}: {e}") from e
    measured = doc.get("measured_at_derivation")
    measured = measured if isinstance(measured, dict) else {}
    model = doc.get("model")
    return ivs, measured, model if isinstance(model, dict) else None
