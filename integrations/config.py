"""Typed, validated configuration of Model Forensics (the seed's ``configs/default.yaml`` keys).

Every key is validated and means exactly one thing:

``recorder.enabled`` (bool, true)
    false: the Recorder installs no hooks and never fires.
``recorder.granularity`` ("layer")
    which sites are recorded when none are given (see :func:`default_sites`):
    ``layer`` → ``blocks.*.resid_post``; ``module`` → ``blocks.*.attn`` + ``blocks.*.mlp``;
    ``neuron`` → ``blocks.*.mlp.post``; ``head`` → ``blocks.*.attn.z``.
``recorder.compression_ratio`` (1.0, 0 < r ≤ 1)
    lossless only — lossy sketches are never used. ``1.0``: incident files are written
    uncompressed (zero-copy memory-mapped reads). Any value ``< 1.0`` turns on lossless zstd
    compression of the incident file's Arrow buffers (``pa.ipc.IpcWriteOptions(compression=
    "zstd")``); the value itself is not a target size, only the switch.
``recorder.max_bundle_size_mb`` (500, > 0)
    an incident larger than this (MiB) is dropped and counted (reason ``"too_large"``).
``modules.cf.enabled`` / ``modules.cca.enabled`` (bool, true)
    run Compression Forensics / causal fix-set search in sidecar analysis jobs.
``modules.cf.anomaly_threshold`` (2.0, > 0)
    CF flags a site / an incident when its robust z score (median/MAD) reaches this value.
``modules.cf.baseline_samples`` (1000, ≥ 2)
    at most this many benign incidents are sampled to build a CF baseline.
``modules.cca.max_fix_set_size`` (8, ≥ 1)
    largest fix set CCA reports; larger sets are "no minimal fix found".
``modules.cca.search_strategy`` ("greedy" | "beam" | "exhaustive")
    greedy = ranking-guided growth + adaptive group testing; beam = keep several partial sets;
    exhaustive = every set up to ``max_fix_set_size`` (the oracle).
``modules.cca.early_stop_threshold`` (0.8, 0 < t ≤ 1)
    CCA stops growing a fix set once its verified flip rate reaches this value.
``exporter.deadline_s`` (30.0, > 0)
    ``SidecarExporter``: the deadline of one upload attempt (the spool drain's; without a
    spool, every attempt's).
``exporter.inline_deadline_s`` (1.0, > 0)
    ``SidecarExporter`` with a spool: the deadline of the export worker's one inline attempt
    (plus 1 s per 32 MiB, at most ``deadline_s``); on a timeout the incident is spooled. Short,
    so a hung sidecar never holds the single export worker.

Precedence (highest first): ``overrides`` / constructor arguments > environment variables >
the YAML file > embedded defaults (identical to ``configs/default.yaml``). Environment variables
are ``FORENSICS_<SECTION>__<KEY>`` with ``__`` between levels, values parsed as YAML scalars::

    FORENSICS_RECORDER__MAX_BUNDLE_SIZE_MB=10
    FORENSICS_MODULES__CCA__SEARCH_STRATEGY=beam

``FORENSICS_*`` names without ``__`` belong to other components (``FORENSICS_CACHE_DIR``,
``FORENSICS_CONFIG`` = default file path) and are ignored here, except ones that look like a
mistyped config key (``FORENSICS_RECORDER_ENABLED``), which are errors; so are the sidecar's
``FORENSICS_SIDECAR__*`` (its own configuration, loaded the same way: :func:`read_settings`). Unknown keys and bad
values raise :class:`~integrations.errors.ConfigError` naming the key and where it came from.
PyYAML is imported only when a file or an environment value has to be parsed.

Example::

    from integrations.config import load_config, default_sites
    cfg = load_config("configs/default.yaml", overrides={"modules.cca.search_strategy": "beam"})
    cfg.modules.cca.search_strategy      # 'beam'
    default_sites(cfg.recorder.granularity)   # ['blocks.*.resid_post']
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from integrations._config_sources import (
    SIDECAR_ENV_PREFIX,
    Setting,
    merge_settings,
    read_settings,
)
from integrations.errors import ConfigError

__all__ = [
    "ENV_PREFIX",
    "GRANULARITIES",
    "SEARCH_STRATEGIES",
    "SIDECAR_ENV_PREFIX",
    "CCAConfig",
    "CFConfig",
    "ExporterConfig",
    "ForensicsConfig",
    "ModulesConfig",
    "RecorderConfig",
    "Setting",
    "default_sites",
    "load_config",
    "merge_settings",
    "read_settings",
]

ENV_PREFIX = "FORENSICS_"
GRANULARITIES: dict[str, tuple[str, ...]] = {
    "layer": ("blocks.*.resid_post",),
    "module": ("blocks.*.attn", "blocks.*.mlp"),
    "neuron": ("blocks.*.mlp.post",),
    "head": ("blocks.*.attn.z",),
}
SEARCH_STRATEGIES = ("greedy", "beam", "exhaustive")


def default_sites(granularity: str) -> list[str]:
    """Site patterns recorded by default at a ``recorder.granularity``.

    Example::

        default_sites("module")   # ['blocks.*.attn', 'blocks.*.mlp']
    """
    if granularity not in GRANULARITIES:
        raise ConfigError(f"recorder.granularity: {granularity!r} is not one of "
                          f"{', '.join(GRANULARITIES)}")
    return list(GRANULARITIES[granularity])


# --------------------------------------------------------------------------- value checking


def _opt(kind: type, *, choices: tuple[str, ...] | None = None, gt: float | None = None,
         ge: float | None = None, le: float | None = None) -> dict[str, Any]:
    return {"kind": kind, "choices": choices, "gt": gt, "ge": ge, "le": le}


def _check(key: str, value: Any, spec: Mapping[str, Any], source: str | None = None) -> Any:
    """Validate (and normalise int→float) one leaf value; ConfigError names ``key``."""
    where = f" (from {source})" if source else ""
    kind = spec["kind"]

    def bad(why: str) -> ConfigError:
        return ConfigError(f"{key}: {why}, got {value!r}{where}")

    if kind is bool:
        if not isinstance(value, bool):
            raise bad("must be true or false")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("must be an integer")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("must be a number")
        value = float(value)
        if not math.isfinite(value):
            raise bad("must be finite")
    elif kind is str:
        if not isinstance(value, str):
            raise bad("must be a string")
    if spec["choices"] is not None and value not in spec["choices"]:
        raise bad(f"must be one of {', '.join(spec['choices'])}")
    if spec["gt"] is not None and not value > spec["gt"]:
        raise bad(f"must be > {spec['gt']}")
    if spec["ge"] is not None and not value >= spec["ge"]:
        raise bad(f"must be >= {spec['ge']}")
    if spec["le"] is not None and not value <= spec["le"]:
        raise bad(f"must be <= {spec['le']}")
    return value


class _Section:
    """Shared validation of the frozen config dataclasses (leaves carry ``metadata`` specs)."""

    _path: ClassVar[str]

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            key = f"{self._path}.{f.name}" if self._path else f.name
            sub = f.metadata.get("section")
            if sub is not None:
                if not isinstance(value, sub):
                    raise ConfigError(f"{key}: must be a {sub.__name__}, got {value!r}")
            else:
                object.__setattr__(self, f.name, _check(key, value, f.metadata))

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict, the shape of ``configs/default.yaml``."""
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, _Section) else value
        return out


@dataclass(frozen=True)
class RecorderConfig(_Section):
    """``recorder:`` section — what the in-process Recorder captures (see module docstring).

    Example::

        RecorderConfig(granularity="head").default_sites()   # ['blocks.*.attn.z']
    """

    _path: ClassVar[str] = "recorder"
    enabled: bool = field(default=True, metadata=_opt(bool))
    granularity: str = field(default="layer", metadata=_opt(str, choices=tuple(GRANULARITIES)))
    compression_ratio: float = field(default=1.0, metadata=_opt(float, gt=0.0, le=1.0))
    max_bundle_size_mb: float = field(default=500.0, metadata=_opt(float, gt=0.0))

    def default_sites(self) -> list[str]:
        """Site patterns for :attr:`granularity` (see :func:`default_sites`)."""
        return default_sites(self.granularity)

    @property
    def ipc_compression(self) -> str | None:
        """Arrow IPC buffer compression for incident files: ``"zstd"`` if ratio < 1, else None."""
        return "zstd" if self.compression_ratio < 1.0 else None

    @property
    def max_bundle_size_bytes(self) -> int:
        """:attr:`max_bundle_size_mb` in bytes (MiB × 2**20)."""
        return int(self.max_bundle_size_mb * (1 << 20))


@dataclass(frozen=True)
class CFConfig(_Section):
    """``modules.cf:`` — Compression Forensics (DESIGN §7)."""

    _path: ClassVar[str] = "modules.cf"
    enabled: bool = field(default=True, metadata=_opt(bool))
    anomaly_threshold: float = field(default=2.0, metadata=_opt(float, gt=0.0))
    baseline_samples: int = field(default=1000, metadata=_opt(int, ge=2))


@dataclass(frozen=True)
class CCAConfig(_Section):
    """``modules.cca:`` — causal minimal fix-set search (DESIGN §8)."""

    _path: ClassVar[str] = "modules.cca"
    enabled: bool = field(default=True, metadata=_opt(bool))
    max_fix_set_size: int = field(default=8, metadata=_opt(int, ge=1))
    search_strategy: str = field(default="greedy", metadata=_opt(str, choices=SEARCH_STRATEGIES))
    early_stop_threshold: float = field(default=0.8, metadata=_opt(float, gt=0.0, le=1.0))


@dataclass(frozen=True)
class ModulesConfig(_Section):
    """``modules:`` — the analysis modules run by the sidecar."""

    _path: ClassVar[str] = "modules"
    cf: CFConfig = field(default_factory=CFConfig, metadata={"section": CFConfig})
    cca: CCAConfig = field(default_factory=CCAConfig, metadata={"section": CCAConfig})


@dataclass(frozen=True)
class ExporterConfig(_Section):
    """``exporter:`` — how ``SidecarExporter`` uploads (its constructor arguments win).

    Example::

        load_config(overrides={"exporter.inline_deadline_s": 0.5}).exporter.inline_deadline_s
    """

    _path: ClassVar[str] = "exporter"
    deadline_s: float = field(default=30.0, metadata=_opt(float, gt=0.0))
    inline_deadline_s: float = field(default=1.0, metadata=_opt(float, gt=0.0))


@dataclass(frozen=True)
class ForensicsConfig(_Section):
    """The whole configuration; build it with :func:`load_config`.

    Example::

        cfg = ForensicsConfig()                      # embedded defaults
        cfg.recorder.max_bundle_size_mb              # 500.0
    """

    _path: ClassVar[str] = ""
    recorder: RecorderConfig = field(default_factory=RecorderConfig,
                                     metadata={"section": RecorderConfig})
    modules: ModulesConfig = field(default_factory=ModulesConfig,
                                   metadata={"section": ModulesConfig})
    exporter: ExporterConfig = field(default_factory=ExporterConfig,
                                     metadata={"section": ExporterConfig})


# --------------------------------------------------------------------------- layering


_Leaf = tuple[Any, str]  # (value, source)


def _schema_keys(cls: type[_Section]) -> dict[str, Any]:
    """``{name: nested section class | None}`` for one level."""
    return {f.name: f.metadata.get("section") for f in fields(cls)}  # type: ignore[arg-type]


def _unknown(path: list[str], name: str, cls: type[_Section], source: str) -> str:
    level = ".".join(path) or "top level"
    valid = sorted(_schema_keys(cls))
    near = difflib.get_close_matches(name, valid, n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    key = ".".join([*path, name])
    return f"unknown key {key!r} (from {source}); valid keys at {level}: {', '.join(valid)}{hint}"


def _merge(dest: dict[str, Any], cls: type[_Section], path: list[str], name: str, value: Any,
           source: str, errors: list[str]) -> None:
    """Put one (possibly nested) value from ``source`` into ``dest``, checking keys/leaves."""
    schema = _schema_keys(cls)
    key = ".".join([*path, name])
    if name not in schema:
        errors.append(_unknown(path, name, cls, source))
        return
    sub = schema[name]
    if sub is None:
        spec = next(f.metadata for f in fields(cls) if f.name == name)  # type: ignore[arg-type]
        try:
            dest[name] = (_check(key, value, spec, source), source)
        except ConfigError as e:
            errors.append(str(e))
        return
    if not isinstance(value, Mapping):
        errors.append(f"{key}: is a section and must be a mapping of its keys "
                      f"({', '.join(sorted(_schema_keys(sub)))}), got {value!r} (from {source})")
        return
    child = dest.setdefault(name, {})
    for k, v in value.items():
        _merge(child, sub, [*path, name], str(k), v, source, errors)


def _build(cls: type[_Section], layer: dict[str, Any]) -> Any:
    kwargs: dict[str, Any] = {}
    for name, sub in _schema_keys(cls).items():
        if name not in layer:
            continue
        kwargs[name] = _build(sub, layer[name]) if sub is not None else layer[name][0]
    return cls(**kwargs)


def _nest(parts: list[str], value: Any) -> dict[str, Any]:
    out: Any = value
    for p in reversed(parts[1:]):
        out = {p: out}
    return {parts[0]: out}


def load_config(path: str | os.PathLike[str] | None = None, *,
                overrides: Mapping[str, Any] | None = None,
                env: Mapping[str, str] = os.environ) -> ForensicsConfig:
    """Build a validated :class:`ForensicsConfig` from defaults, a file, env vars and overrides.

    ``path`` defaults to ``$FORENSICS_CONFIG`` if set, else no file. ``overrides`` is a nested
    mapping (``{"recorder": {"enabled": False}}``) or dotted keys (``{"recorder.enabled":
    False}``). Unknown keys and bad values raise one ConfigError listing every problem.
    Layering: :func:`read_settings`.

    Example::

        cfg = load_config(env={"FORENSICS_MODULES__CCA__SEARCH_STRATEGY": "beam"})
        cfg.modules.cca.search_strategy      # 'beam'
    """
    errors: list[str] = []
    merged: dict[str, Any] = {}
    if path is None and env.get("FORENSICS_CONFIG"):
        path = env["FORENSICS_CONFIG"]
    sections = list(_schema_keys(ForensicsConfig))
    for setting in read_settings(path, env=env, overrides=overrides, env_prefix=ENV_PREFIX,
                                 sections=sections, errors=errors):
        parts = list(setting.key)
        for k, v in _nest(parts, setting.value).items():
            _merge(merged, ForensicsConfig, [], k, v, setting.source, errors)
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
    cfg: ForensicsConfig = _build(ForensicsConfig, merged)
    return cfg
