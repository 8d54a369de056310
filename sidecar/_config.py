"""Sidecar configuration: embedded defaults < a YAML file < environment < explicit arguments.

Unknown keys and bad values raise :class:`~integrations.errors.ConfigError` naming the key, so a
typo never silently falls back to a default.

Example::

    cfg = load_config("configs/sidecar.yaml")        # or SidecarConfig.defaults()
    cfg.data_dir, cfg.grpc.address, cfg.limits.max_incident_bytes
    cfg = SidecarConfig.from_dict({"data_dir": "/tmp/x", "auth": {"tokens": [
        {"token": "s3cret", "tenant": "acme"}]}})
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from integrations.errors import ConfigError

from ._config_sections import (
    DETECTORS,
    EXECUTORS,
    AuthConfig,
    BaselinesConfig,
    CatalogConfig,
    GrpcConfig,
    JobsConfig,
    LimitsConfig,
    MetricsConfig,
    MiB,
    ModelSpec,
    RayConfig,
    SharedBaseline,
    TelemetryConfig,
    TlsConfig,
)
from ._config_store import StoreConfig, parse_store

if TYPE_CHECKING:
    from integrations.config import ModulesConfig

#: gRPC clients' default receive limit (``sidecar.api.v1.MAX_RESPONSE_BYTES``).
MAX_RESPONSE_BYTES = 4 * MiB

__all__ = ["SECTIONS", "SidecarConfig", "load_config"]   # sections: sidecar._config_sections

#: The top-level keys of the sidecar configuration.
SECTIONS = ("data_dir", "grpc", "limits", "auth", "metrics", "telemetry", "jobs", "models",
            "modules", "baselines", "store", "catalog")


@dataclasses.dataclass(frozen=True)
class SidecarConfig:
    """The whole sidecar configuration (see ``configs/sidecar.yaml`` for every key)."""

    data_dir: str = "./forensics-data"
    grpc: GrpcConfig = dataclasses.field(default_factory=GrpcConfig)
    limits: LimitsConfig = dataclasses.field(default_factory=LimitsConfig)
    auth: AuthConfig = dataclasses.field(default_factory=AuthConfig)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)
    telemetry: TelemetryConfig = dataclasses.field(default_factory=TelemetryConfig)
    jobs: JobsConfig = dataclasses.field(default_factory=JobsConfig)
    models: tuple[ModelSpec, ...] = ()
    #: ``modules.cf`` / ``modules.cca``: the seed's keys (``integrations.config.ModulesConfig``,
    #: same names, defaults and validation as ``configs/default.yaml``).
    modules: ModulesConfig = dataclasses.field(default_factory=lambda: _modules(None))
    baselines: BaselinesConfig = dataclasses.field(default_factory=BaselinesConfig)
    #: Where incident files and receipts live (``sidecar._config_store``; "" = data_dir).
    store: StoreConfig = dataclasses.field(default_factory=StoreConfig)
    catalog: CatalogConfig = dataclasses.field(default_factory=CatalogConfig)

    def ingest_kinds(self) -> tuple[str, ...]:
        """Job kinds enqueued for every new incident: ``jobs.on_ingest`` plus ``cf`` when
        ``modules.cf.enabled`` (CCA follows CF, see ``sidecar.jobs._cf``)."""
        kinds = list(self.jobs.on_ingest)
        if self.modules.cf.enabled and "cf" not in kinds:
            kinds.append("cf")
        return tuple(kinds)

    @classmethod
    def defaults(cls, **overrides: Any) -> SidecarConfig:
        """The embedded defaults, with top-level fields replaced by ``overrides``."""
        return dataclasses.replace(cls(), **overrides)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> SidecarConfig:
        """Build from a parsed YAML mapping (missing keys take the embedded defaults)."""
        raw = dict(raw or {})
        _check_keys(raw, set(SECTIONS), "")
        grpc_raw = dict(_mapping(raw.get("grpc"), "grpc"))
        tls = _section(TlsConfig, grpc_raw.pop("tls", None), "grpc.tls")
        grpc_cfg = dataclasses.replace(_section(GrpcConfig, grpc_raw, "grpc"), tls=tls)
        _parse_address(grpc_cfg.address, "grpc.address")
        if tls.enabled != (tls.key_file is not None):
            raise ConfigError("grpc.tls needs both cert_file and key_file")
        if tls.require_client_auth and not tls.client_ca_file:
            raise ConfigError("grpc.tls.require_client_auth needs grpc.tls.client_ca_file")
        limits = _limits(raw.get("limits"), grpc_cfg)
        jobs = _jobs(raw.get("jobs"))
        metrics = _section(MetricsConfig, raw.get("metrics"), "metrics")
        _parse_address(metrics.address, "metrics.address")
        telemetry = _section(TelemetryConfig, raw.get("telemetry"), "telemetry")
        if telemetry.otlp_protocol not in ("grpc", "http/protobuf"):
            raise ConfigError("telemetry.otlp_protocol must be 'grpc' or 'http/protobuf'")
        data_dir = raw.get("data_dir", cls.data_dir)
        if not isinstance(data_dir, str) or not data_dir:
            raise ConfigError("data_dir must be a non-empty path string")
        baselines = _baselines(raw.get("baselines"))
        return cls(data_dir=data_dir, grpc=grpc_cfg, limits=limits,
                   auth=_auth(raw.get("auth")), metrics=metrics, telemetry=telemetry, jobs=jobs,
                   models=_models(raw.get("models")), modules=_modules(raw.get("modules")),
                   baselines=baselines, store=parse_store(raw.get("store")),
                   catalog=_catalog(raw.get("catalog")))

    def find_model(self, *, name: str | None, fingerprint: str | None) -> ModelSpec | None:
        """The registered model for an incident's model reference: a fingerprint match first,
        then a name match among specs without a fingerprint; ``None`` when not registered."""
        if fingerprint:
            for spec in self.models:
                if spec.fingerprint == fingerprint:
                    return spec
        for spec in self.models:
            if name and spec.name == name and spec.fingerprint is None:
                return spec
        return None


def load_config(path: str | os.PathLike[str] | None = None, *,
                overrides: Mapping[str, Any] | None = None,
                env: Mapping[str, str] = os.environ) -> SidecarConfig:
    """The sidecar configuration: embedded defaults < the YAML file at ``path`` < environment
    variables ``FORENSICS_SIDECAR__<SECTION>__<KEY>`` (YAML scalars) < ``overrides`` (nested
    or dotted keys, e.g. the CLI's ``--data-dir`` / ``--address``) — the project's one loading
    mechanism (:func:`integrations.config.read_settings`). Unknown keys and bad values raise
    :class:`~integrations.errors.ConfigError` naming them.

    Example::

        cfg = load_config("configs/sidecar.yaml", overrides={"grpc.address": "0.0.0.0:7431"},
                          env={"FORENSICS_SIDECAR__JOBS__WORKERS": "4"})
        cfg.jobs.workers       # 4
    """
    from integrations.config import SIDECAR_ENV_PREFIX, merge_settings, read_settings

    errors: list[str] = []
    settings = read_settings(path, env=env, overrides=overrides, env_prefix=SIDECAR_ENV_PREFIX,
                             sections=SECTIONS, errors=errors)
    if errors:
        raise ConfigError("invalid sidecar configuration:\n  " + "\n  ".join(errors))
    return SidecarConfig.from_dict(merge_settings(settings))


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(value).__name__}")
    return value


def _check_keys(raw: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
                          f"valid: {', '.join(sorted(prefix + k for k in allowed))}")


def _section(cls: Any, value: Any, where: str) -> Any:
    raw = dict(_mapping(value, where))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _check_keys(raw, set(fields), where)
    default = cls()
    for key, val in raw.items():
        want = type(getattr(default, key))
        if want is float and isinstance(val, int) and not isinstance(val, bool):
            val = float(val)
            raw[key] = val
        ok = (val is None and getattr(default, key) is None) or isinstance(val, want) or (
            getattr(default, key) is None and isinstance(val, str))
        if not ok or (want is int and isinstance(val, bool)):
            raise ConfigError(f"{where}.{key} must be {want.__name__}, got {val!r}")
    return cls(**raw)


def _limits(value: Any, grpc_cfg: GrpcConfig) -> LimitsConfig:
    limits: LimitsConfig = _section(LimitsConfig, value, "limits")
    if not 0 < limits.max_chunk_bytes <= 4 * MiB:
        raise ConfigError("limits.max_chunk_bytes must be in (0, 4 MiB]")
    positive = [f.name for f in dataclasses.fields(limits) if getattr(limits, f.name) <= 0]
    if positive:
        raise ConfigError(f"limits.{', limits.'.join(positive)} must be positive")
    if limits.max_concurrent_uploads >= grpc_cfg.max_workers:
        raise ConfigError(
            f"limits.max_concurrent_uploads ({limits.max_concurrent_uploads}) must be below "
            f"grpc.max_workers ({grpc_cfg.max_workers}): stalled uploads must never hold every "
            "handler thread (health checks and queries need one)")
    if not max(3 * limits.max_manifest_bytes, limits.max_chunk_bytes) + 64 * 1024 <= \
            limits.max_response_bytes <= MAX_RESPONSE_BYTES:
        raise ConfigError("limits.max_response_bytes must hold one chunk and one FULL incident "
                          "(>= max_chunk_bytes + 64 KiB and >= 3 x max_manifest_bytes + 64 KiB) "
                          f"and be <= {MAX_RESPONSE_BYTES} (gRPC clients' default receive limit)")
    return limits


def _jobs(value: Any) -> JobsConfig:
    jobs_raw = dict(_mapping(value, "jobs"))
    if "on_ingest" in jobs_raw:
        jobs_raw["on_ingest"] = tuple(_str_list(jobs_raw["on_ingest"], "jobs.on_ingest"))
    if "params" in jobs_raw:
        jobs_raw["params"] = {str(kind): dict(_mapping(p, f"jobs.params.{kind}"))
                              for kind, p in _mapping(jobs_raw["params"], "jobs.params").items()}
    if "ray" in jobs_raw:
        jobs_raw["ray"] = _ray(jobs_raw["ray"])
    jobs: JobsConfig = _section(JobsConfig, jobs_raw, "jobs")
    if jobs.workers < 1 or jobs.max_attempts < 1 or jobs.max_pending_per_tenant < 1:
        raise ConfigError("jobs.workers, jobs.max_attempts and jobs.max_pending_per_tenant "
                          "must be >= 1")
    if not jobs.lease_s >= 1:
        raise ConfigError(f"jobs.lease_s must be >= 1 (seconds), got {jobs.lease_s!r}")
    if jobs.executor not in EXECUTORS:
        raise ConfigError(f"jobs.executor must be one of {', '.join(EXECUTORS)}, "
                          f"got {jobs.executor!r}")
    return jobs


def _ray(value: Any) -> RayConfig:
    """``jobs.ray`` (:class:`RayConfig`): an address Ray can join, requests >= 0."""
    ray: RayConfig = _section(RayConfig, value, "jobs.ray")
    address = ray.address
    if address not in ("", "auto", "local"):
        host_port = address.removeprefix("ray://")
        try:
            _parse_address(host_port, "jobs.ray.address")
        except ConfigError:
            raise ConfigError("jobs.ray.address must be '' (a Ray instance of this sidecar), "
                              "'auto', 'ray://host:port' or 'host:port', "
                              f"got {address!r}") from None
    if not ray.namespace.strip():
        raise ConfigError("jobs.ray.namespace must be a non-empty string")
    for key in ("num_cpus", "num_gpus"):
        if not 0 <= getattr(ray, key) < float("inf"):
            raise ConfigError(f"jobs.ray.{key} must be a finite number >= 0, "
                              f"got {getattr(ray, key)!r}")
    return ray


def _shared_baselines(value: Any) -> tuple[SharedBaseline, ...]:
    if not isinstance(value, list):
        raise ConfigError("baselines.shared must be a list of {name, fingerprint, tenants}")
    out: list[SharedBaseline] = []
    for i, entry in enumerate(value):
        where = f"baselines.shared[{i}]"
        entry = _mapping(entry, where)
        _check_keys(entry, {"name", "fingerprint", "tenants"}, where)
        name, fp = entry.get("name"), entry.get("fingerprint")
        tenants = _str_list(entry.get("tenants"), f"{where}.tenants")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
            raise ConfigError(f"{where}.name must be 1-64 characters of [A-Za-z0-9._-]")
        if not isinstance(fp, str) or not fp or not tenants:
            raise ConfigError(f"{where} needs a fingerprint and at least one tenant")
        out.append(SharedBaseline(name=name, fingerprint=fp, tenants=tuple(tenants)))
    return tuple(out)


def _catalog(value: Any) -> CatalogConfig:
    catalog: CatalogConfig = _section(CatalogConfig, value, "catalog")
    if catalog.kind not in ("duckdb", "postgres"):
        raise ConfigError(f"catalog.kind must be 'duckdb' or 'postgres', got {catalog.kind!r}")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", catalog.dsn_env):
        raise ConfigError("catalog.dsn_env must name an environment variable (letters, digits, "
                          f"_), got {catalog.dsn_env!r}; put the DSN in that variable, not here")
    for key in ("connect_timeout_s", "backfill_interval_s"):
        if not getattr(catalog, key) > 0:
            raise ConfigError(f"catalog.{key} must be > 0, got {getattr(catalog, key)!r}")
    return catalog


def _baselines(value: Any) -> BaselinesConfig:
    base_raw = dict(_mapping(value, "baselines"))
    if "sample_rules" in base_raw:
        base_raw["sample_rules"] = tuple(_str_list(base_raw["sample_rules"],
                                                   "baselines.sample_rules"))
    if "shared" in base_raw:
        base_raw["shared"] = _shared_baselines(base_raw["shared"])
    baselines: BaselinesConfig = _section(BaselinesConfig, base_raw, "baselines")
    if baselines.detector not in DETECTORS:
        raise ConfigError(f"baselines.detector must be one of {', '.join(DETECTORS)}")
    if baselines.min_samples < 2 or baselines.refresh_every < 0 or baselines.cca_benign < 0:
        raise ConfigError("baselines.min_samples must be >= 2; refresh_every and cca_benign "
                          ">= 0")
    return baselines


def _parse_address(address: str, where: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{where} must be 'host:port', got {address!r}")


def _str_list(value: Any, where: str) -> list[str]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of strings")
    return list(value)


def _auth(value: Any) -> AuthConfig:
    raw = _mapping(value, "auth")
    _check_keys(raw, {"tokens", "admin_tokens"}, "auth")
    tokens: dict[str, str] = {}
    entries = raw.get("tokens") or []
    if not isinstance(entries, list):
        raise ConfigError("auth.tokens must be a list of {token|token_env, tenant}")
    for i, entry in enumerate(entries):
        where = f"auth.tokens[{i}]"
        entry = _mapping(entry, where)
        _check_keys(entry, {"token", "token_env", "tenant"}, where)
        token = _token(entry, where)
        tenant = entry.get("tenant")
        if not isinstance(tenant, str) or not tenant:
            raise ConfigError(f"{where}.tenant must be a non-empty string")
        if token in tokens:
            raise ConfigError(f"{where}: duplicate token")
        tokens[token] = tenant
    admin: list[str] = []
    for i, entry in enumerate(raw.get("admin_tokens") or []):
        where = f"auth.admin_tokens[{i}]"
        admin.append(entry if isinstance(entry, str) else _token(_mapping(entry, where), where))
    return AuthConfig(tokens=tokens, admin_tokens=tuple(admin))


def _token(entry: Mapping[str, Any], where: str) -> str:
    if "token_env" in entry:
        var = entry["token_env"]
        token = os.environ.get(var) if isinstance(var, str) else None
        if not token:
            raise ConfigError(f"{where}.token_env: environment variable {var!r} is not set")
        return token
    token = entry.get("token")
    if not isinstance(token, str) or len(token) < 8:
        raise ConfigError(f"{where}.token must be a string of at least 8 characters")
    return token


def _modules(value: Any) -> Any:
    """``modules:`` validated by ``integrations.config`` (the seed's keys, one schema)."""
    from integrations.config import load_config as load_forensics_config

    raw = _mapping(value, "modules")
    return load_forensics_config(overrides={"modules": dict(raw)} if raw else None,
                                 env={}).modules


def _models(value: Any) -> tuple[ModelSpec, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError("models must be a list of {name, loader, fingerprint?, kwargs?}")
    specs = []
    for i, entry in enumerate(value):
        where = f"models[{i}]"
        entry = _mapping(entry, where)
        _check_keys(entry, {"name", "loader", "fingerprint", "kwargs"}, where)
        name, loader = entry.get("name"), entry.get("loader")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}.name must be a non-empty string")
        if not isinstance(loader, str) or ":" not in loader:
            raise ConfigError(f"{where}.loader must be 'module:function', got {loader!r}")
        fp = entry.get("fingerprint")
        if fp is not None and not isinstance(fp, str):
            raise ConfigError(f"{where}.fingerprint must be a string")
        specs.append(ModelSpec(name=name, loader=loader, fingerprint=fp,
                               kwargs=dict(_mapping(entry.get("kwargs"), f"{where}.kwargs"))))
    return tuple(specs)
