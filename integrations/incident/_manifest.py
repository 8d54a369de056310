"""The incident manifest: what an incident is about (model, request, trigger, runtime, seeds).

The manifest is a JSON object stored in the Arrow schema metadata under ``forensics.manifest``.
Keys (all always present in a written incident; ``None`` means "not recorded"):

====================  ============================================================================
format_version        int, :data:`FORMAT_VERSION`
id                    str, client-generated idempotency key, ``[A-Za-z0-9][A-Za-z0-9._-]{0,199}``
created_at            str, timezone-aware ISO-8601 (UTC when made by :func:`new_manifest`)
model                 {name, revision, fingerprint}  (fingerprint from ``model_fingerprint``)
tokenizer             {name, revision} | None
trigger               {rule, reason, step}
request               {id, tenant, traceparent}
runtime               {python, torch, transformers, device, dtype, deterministic, num_threads, ...}
generation            {...} | None   (generation config as given to generate())
seeds                 {...} | None   (seeds / RNG state needed for exact replay)
content_captured      bool | None    (raw text kept or not)
activations           "captured" | "replay" | None
sites                 [str, ...]     (None/absent when building: the sorted activation sites)
integrity             {algorithm, rows, sha256}  (written by the builder, see ``_digest``)
====================  ============================================================================

Extra top-level keys are kept as they are (they must be JSON).

Example::

    m = new_manifest(id="inc-1", trigger={"rule": "flag", "reason": "prompt_injection", "step": 3})
    b = IncidentBuilder(manifest=m)
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from integrations.errors import IncidentFormatError

from ._schema import FORMAT_VERSION, SUPPORTED_FORMAT_VERSIONS

if TYPE_CHECKING:
    import torch

__all__ = [
    "ACTIVATIONS_VALUES",
    "ID_PATTERN",
    "REQUIRED_KEYS",
    "new_manifest",
    "normalize_manifest",
    "validate_manifest",
]

#: The incident id rule (``fullmatch``): 1-200 characters of ``[A-Za-z0-9._-]`` starting with a
#: letter or digit — an idempotency key that is also safe as a file name. The sidecar accepts
#: exactly these ids.
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
ACTIVATIONS_VALUES = ("captured", "replay")

# Nested objects and the keys each must have (values may be None = not recorded).
_NESTED: dict[str, tuple[str, ...]] = {
    "model": ("name", "revision", "fingerprint"),
    "trigger": ("rule", "reason", "step"),
    "request": ("id", "tenant", "traceparent"),
    "runtime": (
        "python", "torch", "transformers", "device", "dtype", "deterministic", "num_threads",
    ),
}
_NULLABLE_NESTED: dict[str, tuple[str, ...]] = {"tokenizer": ("name", "revision")}
_NULLABLE_OBJECTS = ("generation", "seeds")

REQUIRED_KEYS: tuple[str, ...] = (
    "format_version", "id", "created_at", "model", "tokenizer", "trigger", "request", "runtime",
    "generation", "seeds", "content_captured", "activations", "sites", "integrity",
)


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def new_manifest(
    *,
    id: str | None = None,
    model: Mapping[str, Any] | torch.nn.Module | None = None,
    tokenizer: Mapping[str, Any] | None = None,
    trigger: Mapping[str, Any] | None = None,
    request: Mapping[str, Any] | None = None,
    runtime: Mapping[str, Any] | None = None,
    generation: Mapping[str, Any] | None = None,
    seeds: Mapping[str, Any] | None = None,
    content_captured: bool = False,
    activations: str = "captured",
    sites: Sequence[str] | None = None,
    created_at: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A complete manifest dict for :class:`IncidentBuilder`, filling what can be measured here.

    ``id`` defaults to a fresh ``inc-<uuid4 hex>``; ``created_at`` to now (UTC ISO); ``runtime``
    to :func:`runtime_info` (of ``model`` when a module is given). ``model`` may be a torch module:
    its reference (name from ``config._name_or_path``, fingerprint over all weights — this hashes
    every parameter, so compute it once per model and pass the dict afterwards) is filled in.

    Example::

        m = new_manifest(id="inc-1", model={"name": "gpt2", "revision": None,
                                            "fingerprint": model_fingerprint(model)})
    """
    from ._runtime import model_reference, runtime_info

    module = None
    if model is not None and not isinstance(model, Mapping):
        module = model
        model = model_reference(module)
    m: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "id": id if id is not None else f"inc-{uuid.uuid4().hex}",
        "created_at": created_at if created_at is not None else _utc_now(),
        "model": dict(model) if model is not None else None,
        "tokenizer": dict(tokenizer) if tokenizer is not None else None,
        "trigger": dict(trigger) if trigger is not None else None,
        "request": dict(request) if request is not None else None,
        "runtime": dict(runtime) if runtime is not None else runtime_info(module),
        "generation": dict(generation) if generation is not None else None,
        "seeds": dict(seeds) if seeds is not None else None,
        "content_captured": content_captured,
        "activations": activations,
        **extra,
    }
    m["sites"] = list(sites) if sites is not None else None
    return normalize_manifest(m)


def _json_copy(manifest: Mapping[str, Any]) -> dict[str, Any]:
    try:
        text = json.dumps(manifest, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise IncidentFormatError(
            f"incident manifest is not JSON-serialisable ({e}); use only dict/list/str/int/"
            "float/bool/None values (no tensors, numpy scalars, NaN or inf)"
        ) from e
    out = json.loads(text)
    if not isinstance(out, dict):
        raise IncidentFormatError("incident manifest must be a JSON object (a dict)")
    return out


def normalize_manifest(
    manifest: Mapping[str, Any], *, sites: Sequence[str] | None = None
) -> dict[str, Any]:
    """A JSON deep copy of ``manifest`` with every format key present (writer side).

    Requires ``id``. Fills ``format_version`` and ``created_at`` (now, UTC) when missing, and
    ``sites`` from ``sites`` (else leaves ``None`` for the builder to derive); every other missing key, and every missing sub-key of
    ``model``/``trigger``/``request``/``runtime``/``tokenizer``, is set to ``None`` ("not
    recorded"). Drops a stale ``integrity`` (the builder computes it). Then validates.
    """
    m = _json_copy(manifest)
    if "id" not in m:
        raise IncidentFormatError(
            "incident manifest has no 'id'; pass a client-generated id, e.g. "
            "IncidentBuilder(manifest=new_manifest(id=...))"
        )
    m.setdefault("format_version", FORMAT_VERSION)
    if m["format_version"] != FORMAT_VERSION:
        raise IncidentFormatError(
            f"this code writes incident format_version {FORMAT_VERSION}, the manifest says "
            f"{m['format_version']!r}; drop 'format_version' from the manifest"
        )
    m.setdefault("created_at", _utc_now())
    for key, subkeys in {**_NESTED, **_NULLABLE_NESTED}.items():
        if m.get(key) is None and key in _NESTED:
            m[key] = {}
        value = m.setdefault(key, None)
        if isinstance(value, dict):
            for sk in subkeys:
                value.setdefault(sk, None)
    for key in (*_NULLABLE_OBJECTS, "content_captured", "activations"):
        m.setdefault(key, None)
    if m.get("sites") is None:  # None = "derive from the rows" (the builder does)
        m["sites"] = list(sites) if sites is not None else None
    m.pop("integrity", None)
    validate_manifest(m, require_integrity=False)
    return m


def _fail(msg: str) -> IncidentFormatError:
    return IncidentFormatError(
        f"invalid incident manifest: {msg}; the incident was not written by a compatible "
        "IncidentBuilder or was corrupted — re-export it from the source"
    )


def _check_created_at(ca: Any) -> None:
    """A timezone-aware ISO-8601 instant that exists in UTC (year 1 at +14:00 does not)."""
    try:
        parsed = datetime.fromisoformat(ca) if isinstance(ca, str) else None
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise _fail(f"created_at {ca!r} must be a timezone-aware ISO-8601 timestamp")
    try:
        parsed.astimezone(timezone.utc)
    except (OverflowError, ValueError):
        raise _fail(f"created_at {ca!r} is outside years 1-9999 once converted to UTC") from None


def validate_manifest(m: Any, *, require_integrity: bool = True) -> None:
    """Check a parsed manifest has every required key with the right type (reader side)."""
    if not isinstance(m, dict):
        raise _fail(f"expected a JSON object, got {type(m).__name__}")
    required = REQUIRED_KEYS if require_integrity else REQUIRED_KEYS[:-1]
    missing = [k for k in required if k not in m]
    if missing:
        raise _fail(f"missing required keys {missing}")
    fv = m["format_version"]
    if not isinstance(fv, int) or isinstance(fv, bool):
        raise _fail(f"format_version must be an integer, got {fv!r}")
    if fv not in SUPPORTED_FORMAT_VERSIONS:
        raise IncidentFormatError(
            f"unsupported incident format_version {fv}; this code reads versions "
            f"{sorted(SUPPORTED_FORMAT_VERSIONS)} — upgrade model-forensics to read it"
        )
    if not isinstance(m["id"], str) or not ID_PATTERN.fullmatch(m["id"]):
        raise _fail(
            f"id {m['id']!r} must be 1-200 characters of [A-Za-z0-9._-] starting with a letter "
            "or digit"
        )
    _check_created_at(m["created_at"])
    for key, subkeys in {**_NESTED, **_NULLABLE_NESTED}.items():
        value = m[key]
        if value is None and key in _NULLABLE_NESTED:
            continue
        if not isinstance(value, dict):
            raise _fail(f"{key!r} must be an object, got {type(value).__name__}")
        absent = [sk for sk in subkeys if sk not in value]
        if absent:
            raise _fail(f"{key!r} is missing keys {absent}")
    for key in _NULLABLE_OBJECTS:
        if m[key] is not None and not isinstance(m[key], dict):
            raise _fail(f"{key!r} must be an object or null")
    if m["content_captured"] is not None and not isinstance(m["content_captured"], bool):
        raise _fail("content_captured must be true, false or null")
    if m["activations"] is not None and m["activations"] not in ACTIVATIONS_VALUES:
        raise _fail(f"activations must be one of {ACTIVATIONS_VALUES} or null")
    sites = m["sites"]
    if sites is None and not require_integrity:
        pass  # writer side: the builder fills the incident's activation sites
    elif not isinstance(sites, list) or not all(isinstance(s, str) for s in sites):
        raise _fail("sites must be a list of strings")
    if require_integrity:
        integ = m["integrity"]
        if (
            not isinstance(integ, dict)
            or not isinstance(integ.get("algorithm"), str)
            or not isinstance(integ.get("rows"), int)
            or not isinstance(integ.get("sha256"), str)
        ):
            raise _fail("integrity must be {algorithm: str, rows: int, sha256: str}")
