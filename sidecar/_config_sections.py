"""The sections of the sidecar configuration: one frozen dataclass each, with embedded defaults
and the values derived from them (``grpc.host``, ``metrics.bind``, ``auth.enabled``, ...).

``sidecar._config`` assembles them into :class:`~sidecar._config.SidecarConfig`, validates raw
mappings into them and loads them (see ``configs/sidecar.yaml`` for every key).

Example::

    GrpcConfig().port                     # 7431
    MetricsConfig(address="0.0.0.0:9464").bind   # ('0.0.0.0', 9464)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

__all__ = [
    "DETECTORS",
    "EXECUTORS",
    "AuthConfig",
    "BaselinesConfig",
    "CatalogConfig",
    "GrpcConfig",
    "JobsConfig",
    "LimitsConfig",
    "MetricsConfig",
    "MiB",
    "ModelSpec",
    "RayConfig",
    "SharedBaseline",
    "TelemetryConfig",
    "TlsConfig",
]

MiB = 1024 * 1024
#: ``baselines.detector`` values (the detectors of ``analysis.cf`` the sidecar offers).
DETECTORS = ("cf", "norm", "mahalanobis")
#: ``jobs.executor`` values: today's thread pool, or Ray tasks (DESIGN §12).
EXECUTORS = ("local", "ray")


@dataclasses.dataclass(frozen=True)
class TlsConfig:
    """Server TLS. ``client_ca_file`` + ``require_client_auth`` = mTLS."""

    cert_file: str | None = None
    key_file: str | None = None
    client_ca_file: str | None = None
    require_client_auth: bool = False

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


@dataclasses.dataclass(frozen=True)
class GrpcConfig:
    """gRPC listener: address ``host:port``, thread pool, concurrency and size caps."""

    address: str = "127.0.0.1:7431"
    max_workers: int = 16
    max_concurrent_rpcs: int = 64
    grace_s: float = 5.0
    tls: TlsConfig = dataclasses.field(default_factory=TlsConfig)

    @property
    def host(self) -> str:
        return self.address.rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])


@dataclasses.dataclass(frozen=True)
class LimitsConfig:
    """Every documented limit of the sidecar (``configs/sidecar.yaml`` says why each exists):
    one chunk, one incident stored and decoded (bytes, rows, IPC messages, manifest size and
    depth: checked before anything is inflated), one upload stream (idle time between
    messages, messages, concurrent uploads), and ListIncidents pages (count, and bytes for
    ``view = FULL``)."""

    max_chunk_bytes: int = MiB
    max_incident_bytes: int = 512 * MiB
    max_decoded_bytes: int = 512 * MiB
    max_rows: int = 65_536
    max_ipc_messages: int = 1_024
    max_manifest_bytes: int = 256 * 1024
    max_manifest_depth: int = 32
    idle_timeout_s: float = 30.0
    max_stream_messages: int = 16_384
    max_concurrent_uploads: int = 8
    max_page_size: int = 1000
    default_page_size: int = 50
    max_response_bytes: int = 4 * MiB

    def decode_limits(self) -> Any:
        """The :class:`integrations.incident.DecodeLimits` every incident read here gets."""
        from integrations.incident import DecodeLimits

        return DecodeLimits(max_decoded_bytes=self.max_decoded_bytes, max_rows=self.max_rows,
                            max_messages=self.max_ipc_messages,
                            max_manifest_bytes=self.max_manifest_bytes,
                            max_manifest_depth=self.max_manifest_depth)


@dataclasses.dataclass(frozen=True)
class AuthConfig:
    """Bearer tokens. Empty ``tokens`` and ``admin_tokens`` = auth off (single-tenant mode).

    ``tokens`` maps a token to its tenant; each entry in YAML is ``{token: ..., tenant: ...}`` or
    ``{token_env: VAR, tenant: ...}`` (the token read from the environment).
    """

    tokens: Mapping[str, str] = dataclasses.field(default_factory=dict)
    admin_tokens: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.tokens) or bool(self.admin_tokens)


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    """Prometheus ``/metrics`` HTTP endpoint (served by ``sidecar.telemetry``)."""

    enabled: bool = True
    address: str = "127.0.0.1:9464"

    @property
    def bind(self) -> tuple[str, int]:
        """(host without IPv6 brackets, default loopback; port) to serve ``/metrics`` on."""
        host, _, port = self.address.rpartition(":")
        return host.strip("[]") or "127.0.0.1", int(port)


@dataclasses.dataclass(frozen=True)
class TelemetryConfig:
    """OpenTelemetry span export: OTLP when ``otlp_endpoint`` is set; ``console_spans`` prints
    every finished span to stdout as JSON (local debugging)."""

    otlp_endpoint: str | None = None
    otlp_protocol: str = "grpc"          # grpc | http/protobuf
    service_name: str = "forensics-sidecar"
    console_spans: bool = False


@dataclasses.dataclass(frozen=True)
class RayConfig:
    """``jobs.ray``: the Ray cluster ``jobs.executor: ray`` runs job attempts on, and what each
    attempt asks for. ``address``: ``""`` starts a Ray instance owned by this sidecar (tests,
    one machine), ``"auto"`` joins the cluster of this node (``RAY_ADDRESS`` or the running
    local one), ``ray://head:10001`` (Ray Client) or ``host:port`` (GCS) a remote one."""

    address: str = ""
    namespace: str = "model-forensics"
    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclasses.dataclass(frozen=True)
class JobsConfig:
    """Analysis job runner: worker threads, retries, kinds enqueued on every new incident, and
    default parameters per kind (``params: {cca: {permutations: 19}}``; a job's own params win).
    ``lease_s`` (a shared catalog only): a running job whose owner has not heartbeaten for
    that long is resumed by another sidecar (owners heartbeat every ``lease_s / 6``); shorter
    resumes a dead sidecar's jobs sooner, longer tolerates longer pauses of a live one.
    """

    workers: int = 2
    max_attempts: int = 3
    on_ingest: tuple[str, ...] = ()
    poll_interval_s: float = 1.0
    params: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    max_pending_per_tenant: int = 100
    executor: str = "local"                  # local | ray (EXECUTORS)
    lease_s: float = 60.0
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)


@dataclasses.dataclass(frozen=True)
class CatalogConfig:
    """Where the incident catalog lives (DESIGN §12): ``duckdb`` (``<data_dir>/index.duckdb``,
    one per sidecar) or ``postgres`` (one shared catalog for the fleet; the libpq DSN — it
    carries the password — only from the environment variable named ``dsn_env``, never YAML).
    ``backfill_interval_s``: how often incidents acknowledged while the catalog was unreachable
    are written into it."""

    kind: str = "duckdb"                 # duckdb | postgres
    dsn_env: str = "FORENSICS_CATALOG_DSN"
    connect_timeout_s: float = 5.0
    backfill_interval_s: float = 10.0


@dataclasses.dataclass(frozen=True)
class SharedBaseline:
    """A baseline an operator declared shared: the model ``fingerprint``'s baseline is built
    from, and used by, the incidents of ``tenants`` together (every other tenant keeps its
    own). Its scope name is ``shared:<name>``."""

    name: str
    fingerprint: str
    tenants: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class BaselinesConfig:
    """Detector baselines kept by the sidecar, per model fingerprint (DESIGN §7).

    Built from sampled benign traffic: incidents whose trigger rule is in ``sample_rules`` (the
    sampling trigger, never a flag) and that CF did not flag, at most
    ``modules.cf.baseline_samples`` of them, newest first. The first build happens once
    ``min_samples`` such incidents exist; it is rebuilt after ``refresh_every`` more arrive
    (0 = never automatically; ``forensics baseline build`` always works)."""

    detector: str = "mahalanobis"             # cf | norm | mahalanobis (benchmarks/RESULTS_cf.md)
    min_samples: int = 30
    refresh_every: int = 200
    sample_rules: tuple[str, ...] = ("ratio",)
    cca_benign: int = 8                       # benign incidents for CCA side effects / means
    shared: tuple[SharedBaseline, ...] = ()

    def is_sampled(self, trigger_rule: str | None) -> bool:
        """Whether an incident with this trigger rule is sampled traffic (a baseline
        candidate), not a flag."""
        return trigger_rule in self.sample_rules

    def scope(self, tenant: str, fingerprint: str) -> tuple[str, tuple[str, ...]]:
        """(scope name, tenants whose incidents build it) of the baseline ``tenant`` uses for a
        model: its own (``tenant:<tenant>``) unless an operator declared a shared one.

        Example::

            BaselinesConfig().scope("acme", fp)        # ('tenant:acme', ('acme',))
        """
        for entry in self.shared:
            if entry.fingerprint == fingerprint and tenant in entry.tenants:
                return f"shared:{entry.name}", entry.tenants
        return f"tenant:{tenant}", (tenant,)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model the sidecar can load for replay: ``loader`` is ``"module:function"`` returning a
    model or ``(model, tokenizer)``; matched by ``fingerprint`` (preferred) or ``name``."""

    name: str
    loader: str
    fingerprint: str | None = None
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
