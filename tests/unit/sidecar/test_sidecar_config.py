"""Sidecar config: embedded defaults, the shipped YAML, strict validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from integrations.errors import ConfigError
from sidecar._auth import ANONYMOUS_ADMIN, Authenticator, Principal
from sidecar._config import AuthConfig, SidecarConfig, load_config

REPO = Path(__file__).resolve().parents[3]


def test_shipped_yaml_is_the_embedded_defaults() -> None:
    cfg = load_config(REPO / "configs" / "sidecar.yaml")
    assert cfg == SidecarConfig() == load_config(None)
    assert (cfg.data_dir, cfg.grpc.address, cfg.metrics.address) == \
        ("./forensics-data", "127.0.0.1:7431", "127.0.0.1:9464")
    assert cfg.limits.max_chunk_bytes == 1024 * 1024 and not cfg.auth.enabled
    assert cfg.modules.cf.enabled and cfg.ingest_kinds() == ("cf",)
    assert cfg.baselines.sample_rules == ("ratio",) and cfg.baselines.detector == "mahalanobis"


@pytest.mark.parametrize(("raw", "match"), [
    ({"grpc": {"adress": "x:1"}}, r"unknown config key\(s\) grpc.adress"),
    ({"grpc": {"address": "nohost"}}, "grpc.address must be 'host:port'"),
    ({"grpc": {"max_workers": "8"}}, "grpc.max_workers must be int"),
    ({"grpc": {"tls": {"cert_file": "c.pem"}}}, "both cert_file and key_file"),
    ({"grpc": {"tls": {"cert_file": "c", "key_file": "k", "require_client_auth": True}}},
     "client_ca_file"),
    ({"limits": {"max_chunk_bytes": 64 * 1024 * 1024}}, "max_chunk_bytes"),
    ({"jobs": {"workers": 0}}, "jobs.workers"),
    ({"jobs": {"max_pending_per_tenant": 0}}, "max_pending_per_tenant must be >= 1"),
    ({"jobs": {"lease_s": 0.5}}, "jobs.lease_s must be >= 1"),
    ({"limits": {"max_decoded_bytes": 0}}, "limits.max_decoded_bytes must be positive"),
    ({"limits": {"idle_timeout_s": 0}}, "limits.idle_timeout_s must be positive"),
    ({"limits": {"max_concurrent_uploads": 16}}, "must be below grpc.max_workers"),
    ({"limits": {"max_response_bytes": 8 * 1024 * 1024}}, "max_response_bytes must hold"),
    ({"baselines": {"shared": [{"name": "../x", "fingerprint": "f", "tenants": ["a"]}]}},
     r"baselines.shared\[0\].name"),
    ({"baselines": {"shared": [{"name": "fleet", "fingerprint": "f", "tenants": []}]}},
     "at least one tenant"),
    ({"jobs": {"on_ingest": "stats"}}, "jobs.on_ingest must be a list"),
    ({"auth": {"tokens": [{"token": "short", "tenant": "a"}]}}, "at least 8"),
    ({"auth": {"tokens": [{"token_env": "FORENSICS_NOPE_UNSET", "tenant": "a"}]}}, "not set"),
    ({"models": [{"name": "m", "loader": "nocolon"}]}, "module:function"),
    ({"telemetry": {"otlp_protocol": "carrier-pigeon"}}, "otlp_protocol"),
    ({"bogus": 1}, "unknown config key"),
    ({"modules": {"cf": {"anomaly_treshold": 2}}}, "modules.cf.anomaly_treshold"),
    ({"modules": {"cca": {"search_strategy": "random"}}}, "search_strategy"),
    ({"baselines": {"detector": "magic"}}, "baselines.detector"),
    ({"baselines": {"min_samples": 1}}, "min_samples"),
    ({"baselines": {"sample_rules": "ratio"}}, "sample_rules must be a list"),
])
def test_bad_config_is_refused_naming_the_key(raw: dict, match: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError, match=match):
        SidecarConfig.from_dict(raw)


def test_tokens_from_env_and_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORENSICS_T_ACME", "acme-secret-token")
    p = tmp_path / "s.yaml"
    p.write_text("auth:\n  tokens:\n    - {tenant: acme, token_env: FORENSICS_T_ACME}\n"
                 "    - {tenant: globex, token: globex-secret}\n"
                 "  admin_tokens: [admin-secret-token]\njobs: {on_ingest: [stats]}\n")
    cfg = load_config(p)
    assert dict(cfg.auth.tokens) == {"acme-secret-token": "acme", "globex-secret": "globex"}
    assert cfg.jobs.on_ingest == ("stats",)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_authenticator() -> None:
    auth = Authenticator(AuthConfig(tokens={"acme-secret": "acme", "globex-secret": "globex"},
                                    admin_tokens=("root-secret",)))
    assert auth.resolve("Bearer acme-secret") == Principal(tenant="acme", admin=False)
    assert auth.resolve("Bearer globex-secret").scope() == "globex"
    assert auth.resolve("Bearer root-secret") == ANONYMOUS_ADMIN
    assert ANONYMOUS_ADMIN.scope() is None
    for bad in (None, "", "acme-secret", "Bearer acme-secre", "Bearer acme-secretX",
                "Basic acme-secret"):
        assert auth.resolve(bad) is None
    assert Authenticator(AuthConfig()).resolve(None) == ANONYMOUS_ADMIN   # auth off


def test_modules_follow_the_seed_keys() -> None:
    cfg = SidecarConfig.from_dict({"modules": {"cf": {"enabled": False, "anomaly_threshold": 3},
                                               "cca": {"max_fix_set_size": 2}},
                                   "jobs": {"on_ingest": ["stats"]}})
    assert cfg.modules.cf.anomaly_threshold == 3.0 and cfg.modules.cca.max_fix_set_size == 2
    assert cfg.ingest_kinds() == ("stats",)      # cf disabled: not enqueued on ingest


def test_one_loading_mechanism_defaults_file_env_arguments(tmp_path: Path) -> None:
    """Embedded defaults < file < FORENSICS_SIDECAR__* < explicit arguments, key by key; the
    middleware's loader (same mechanism, ``FORENSICS_`` namespace) leaves the sidecar's alone."""
    from integrations.config import load_config as load_forensics_config

    p = tmp_path / "s.yaml"
    p.write_text("data_dir: /from-file\njobs: {workers: 3, max_attempts: 5}\n"
                 "grpc: {address: '127.0.0.1:1111', grace_s: 2.5}\n")
    env = {"FORENSICS_SIDECAR__JOBS__WORKERS": "4",
           "FORENSICS_SIDECAR__GRPC__ADDRESS": "127.0.0.1:2222",
           "FORENSICS_MODULES__CF__ENABLED": "false"}
    cfg = load_config(p, env=env, overrides={"grpc.address": "127.0.0.1:3333"})
    assert cfg.data_dir == "/from-file"                                 # file over defaults
    assert (cfg.jobs.workers, cfg.jobs.max_attempts) == (4, 5)          # env over file
    assert (cfg.grpc.address, cfg.grpc.grace_s) == ("127.0.0.1:3333", 2.5)  # args over env
    assert cfg.grpc.max_workers == SidecarConfig().grpc.max_workers     # defaults below all
    assert cfg.modules.cf.enabled                  # FORENSICS_MODULES__* is the middleware's
    assert load_forensics_config(env=env).modules.cf.enabled is False   # ... and ignores ours
    nested = load_config(p, env={}, overrides={"jobs": {"workers": 7}})
    assert (nested.jobs.workers, nested.jobs.max_attempts) == (7, 5)    # mappings merge


@pytest.mark.parametrize(("env", "overrides", "match"), [
    ({"FORENSICS_SIDECAR__JOBS__WORKERZ": "2"}, None, r"unknown config key\(s\) jobs.workerz"),
    ({}, {"grpc.adress": "x:1"}, r"unknown config key\(s\) grpc.adress"),
    ({"FORENSICS_SIDECAR__BOGUS": "1"}, None, r"unknown config key\(s\) bogus"),
    ({"FORENSICS_SIDECAR__GRPC__ADDRESS": "nohost"}, None, "grpc.address must be 'host:port'"),
    ({"FORENSICS_SIDECAR__JOBS__ON_INGEST": "[stats]"}, None, "must be a scalar"),
    ({"FORENSICS_SIDECAR__GRPC": "1", "FORENSICS_SIDECAR__GRPC__ADDRESS": "a:1"}, None,
     "grpc: is a section"),
])
def test_every_layer_is_validated_naming_the_key(env: dict[str, str], overrides: dict | None,  # type: ignore[type-arg]
                                                 match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(env=env, overrides=overrides)
