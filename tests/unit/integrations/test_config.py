"""Tests of integrations.config: defaults, layering, validation, env mapping, lazy PyYAML."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import sys
from pathlib import Path

import pytest

from integrations.config import (
    CCAConfig,
    CFConfig,
    ForensicsConfig,
    RecorderConfig,
    default_sites,
    load_config,
)
from integrations.errors import ConfigError

REPO = Path(__file__).resolve().parents[3]
DEFAULT_YAML = REPO / "configs" / "default.yaml"
#: Middleware configurations; ``fleet.yaml`` is a sidecar's (tests/unit/sidecar/test_deploy_fleet.py).
EXAMPLES = sorted(p for p in (REPO / "configs" / "examples").glob("*.yaml") if p.name != "fleet.yaml")


def test_embedded_defaults_equal_default_yaml() -> None:
    import yaml

    raw = yaml.safe_load(DEFAULT_YAML.read_text())
    assert ForensicsConfig().to_dict() == raw  # same keys, same values (500 == 500.0)
    assert load_config(DEFAULT_YAML, env={}) == ForensicsConfig()
    assert load_config(env={}) == ForensicsConfig()


def test_default_values_are_the_documented_ones() -> None:
    cfg = ForensicsConfig()
    assert cfg.recorder == RecorderConfig(True, "layer", 1.0, 500.0)
    assert cfg.modules.cf == CFConfig(True, 2.0, 1000)
    assert cfg.modules.cca == CCAConfig(True, 8, "greedy", 0.8)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_loads_and_differs_from_defaults(path: Path) -> None:
    cfg = load_config(path, env={})
    assert cfg != ForensicsConfig()


def test_examples_exist() -> None:
    assert len(EXAMPLES) >= 2


def test_file_values_override_defaults_and_keep_the_rest(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("recorder:\n  granularity: neuron\nmodules:\n  cca:\n    max_fix_set_size: 3\n")
    cfg = load_config(f, env={})
    assert cfg.recorder.granularity == "neuron"
    assert cfg.modules.cca.max_fix_set_size == 3
    assert cfg.recorder.max_bundle_size_mb == 500.0
    assert cfg.modules.cca.search_strategy == "greedy"


def test_precedence_overrides_over_env_over_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("recorder:\n  max_bundle_size_mb: 100\n  granularity: head\n"
                 "modules:\n  cca:\n    search_strategy: exhaustive\n")
    env = {"FORENSICS_RECORDER__MAX_BUNDLE_SIZE_MB": "10",
           "FORENSICS_MODULES__CCA__SEARCH_STRATEGY": "beam"}
    cfg = load_config(f, env=env)
    assert cfg.recorder.max_bundle_size_mb == 10.0      # env beats file
    assert cfg.recorder.granularity == "head"           # file beats default
    assert cfg.modules.cca.search_strategy == "beam"
    cfg2 = load_config(f, env=env, overrides={"recorder": {"max_bundle_size_mb": 1},
                                              "modules.cca.search_strategy": "greedy"})
    assert cfg2.recorder.max_bundle_size_mb == 1.0      # overrides beat env
    assert cfg2.modules.cca.search_strategy == "greedy"


def test_env_values_are_yaml_scalars() -> None:
    cfg = load_config(env={"FORENSICS_RECORDER__ENABLED": "false",
                           "FORENSICS_MODULES__CF__BASELINE_SAMPLES": "20",
                           "FORENSICS_MODULES__CF__ANOMALY_THRESHOLD": "3.5"})
    assert cfg.recorder.enabled is False
    assert cfg.modules.cf.baseline_samples == 20
    assert cfg.modules.cf.anomaly_threshold == 3.5


def test_env_config_path_and_unrelated_forensics_vars(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("recorder:\n  enabled: false\n")
    cfg = load_config(env={"FORENSICS_CONFIG": str(f), "FORENSICS_CACHE_DIR": "/tmp/x",
                           "OTHER__THING": "1"})
    assert cfg.recorder.enabled is False


def test_unknown_keys_are_all_named_with_valid_keys(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("recorder:\n  granulrity: layer\nmodules:\n  cf:\n    treshold: 1\n"
                 "  dbc: {}\nextra: 1\n")
    with pytest.raises(ConfigError) as ei:
        load_config(f, env={})
    msg = str(ei.value)
    assert "'recorder.granulrity'" in msg and "did you mean 'granularity'" in msg
    assert "valid keys at recorder: compression_ratio, enabled, granularity, max_bundle_size_mb" in msg
    assert "'modules.cf.treshold'" in msg
    assert "valid keys at modules.cf: anomaly_threshold, baseline_samples, enabled" in msg
    assert "'modules.dbc'" in msg and "valid keys at modules: cca, cf" in msg
    assert "'extra'" in msg and "valid keys at top level: exporter, modules, recorder" in msg
    assert str(f) in msg


def test_unknown_env_and_override_keys() -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(env={"FORENSICS_MODULES__CCA__STRATEGY": "beam"},
                    overrides={"recorder.size": 3})
    msg = str(ei.value)
    assert "'modules.cca.strategy'" in msg and "FORENSICS_MODULES__CCA__STRATEGY" in msg
    assert "search_strategy" in msg
    assert "'recorder.size'" in msg and "overrides" in msg


def test_single_underscore_env_is_an_error_not_ignored() -> None:
    with pytest.raises(ConfigError, match=r"FORENSICS_RECORDER_ENABLED.*'__'"):
        load_config(env={"FORENSICS_RECORDER_ENABLED": "false"})


def test_env_cannot_set_a_whole_section() -> None:
    with pytest.raises(ConfigError, match=re.escape("modules.cf: is a section")):
        load_config(env={"FORENSICS_MODULES__CF": "1"})


@pytest.mark.parametrize(
    ("key", "value", "expect"),
    [
        ("recorder.enabled", "yes please", "must be true or false"),
        ("recorder.enabled", 1, "must be true or false"),
        ("recorder.granularity", "token", "must be one of layer, module, neuron, head"),
        ("recorder.compression_ratio", 0, "must be > 0"),
        ("recorder.compression_ratio", 1.5, "must be <= 1"),
        ("recorder.compression_ratio", float("nan"), "must be finite"),
        ("recorder.max_bundle_size_mb", -1, "must be > 0"),
        ("recorder.max_bundle_size_mb", "big", "must be a number"),
        ("modules.cf.enabled", None, "must be true or false"),
        ("modules.cf.anomaly_threshold", 0.0, "must be > 0"),
        ("modules.cf.baseline_samples", 1, "must be >= 2"),
        ("modules.cf.baseline_samples", True, "must be an integer"),
        ("modules.cca.max_fix_set_size", 0, "must be >= 1"),
        ("modules.cca.max_fix_set_size", 2.0, "must be an integer"),
        ("modules.cca.search_strategy", "random", "must be one of greedy, beam, exhaustive"),
        ("modules.cca.early_stop_threshold", 0.0, "must be > 0"),
        ("modules.cca.early_stop_threshold", 1.01, "must be <= 1"),
        ("modules.cca.enabled", "true", "must be true or false"),
    ],
)
def test_bad_values_name_the_key(key: str, value: object, expect: str) -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(env={}, overrides={key: value})
    assert str(ei.value).count(key + ":") == 1
    assert expect in str(ei.value)


def test_section_must_be_a_mapping(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("recorder: 5\n")
    with pytest.raises(ConfigError, match="recorder: is a section"):
        load_config(f, env={})


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml", env={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("recorder: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad, env={})
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(lst, env={})
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert load_config(empty, env={}) == ForensicsConfig()


def test_constructor_validates_and_is_frozen() -> None:
    with pytest.raises(ConfigError, match=re.escape("recorder.granularity")):
        RecorderConfig(granularity="tokens")
    with pytest.raises(ConfigError, match=re.escape("modules.cca.search_strategy")):
        CCAConfig(search_strategy="dfs")
    with pytest.raises(ConfigError, match=re.escape("modules.cf.baseline_samples")):
        CFConfig(baseline_samples=0)
    cfg = RecorderConfig(max_bundle_size_mb=3)
    assert isinstance(cfg.max_bundle_size_mb, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.enabled = False  # type: ignore[misc]


def test_recorder_helpers() -> None:
    assert RecorderConfig().ipc_compression is None
    assert RecorderConfig(compression_ratio=0.99).ipc_compression == "zstd"
    assert RecorderConfig(max_bundle_size_mb=1.5).max_bundle_size_bytes == 1572864
    assert RecorderConfig(granularity="module").default_sites() == ["blocks.*.attn",
                                                                    "blocks.*.mlp"]


def test_ipc_compression_is_accepted_by_pyarrow() -> None:
    import pyarrow as pa

    codec = RecorderConfig(compression_ratio=0.5).ipc_compression
    assert codec is not None
    opts = pa.ipc.IpcWriteOptions(compression=codec)
    sink = pa.BufferOutputStream()
    table = pa.table({"x": list(range(1000))})
    with pa.ipc.new_stream(sink, table.schema, options=opts) as w:
        w.write_table(table)
    assert pa.ipc.open_stream(sink.getvalue()).read_all().equals(table)  # lossless


def test_default_sites() -> None:
    assert default_sites("layer") == ["blocks.*.resid_post"]
    assert default_sites("module") == ["blocks.*.attn", "blocks.*.mlp"]
    assert default_sites("neuron") == ["blocks.*.mlp.post"]
    assert default_sites("head") == ["blocks.*.attn.z"]
    with pytest.raises(ConfigError, match=re.escape("recorder.granularity")):
        default_sites("token")


def test_to_dict_round_trips() -> None:
    cfg = load_config(env={}, overrides={"recorder.granularity": "head"})
    assert load_config(env={}, overrides=cfg.to_dict()) == cfg


def test_imports_and_defaults_work_without_pyyaml(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    """`integrations` must import without PyYAML; only file/env parsing needs it."""
    monkeypatch.setitem(sys.modules, "yaml", None)  # makes `import yaml` raise ImportError
    spec = importlib.util.spec_from_file_location(
        "_config_without_yaml", REPO / "integrations" / "config.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)  # dataclasses looks the module up
    spec.loader.exec_module(mod)
    cfg = mod.load_config(env={"FORENSICS_CACHE_DIR": "/x"},
                          overrides={"recorder.enabled": False})
    assert cfg.recorder.enabled is False
    f = tmp_path / "c.yaml"
    f.write_text("recorder: {}\n")
    with pytest.raises(ConfigError, match="pip install pyyaml"):
        mod.load_config(f, env={})
    with pytest.raises(ConfigError, match="pip install pyyaml"):
        mod.load_config(env={"FORENSICS_RECORDER__ENABLED": "false"})


def test_the_exporters_inline_deadline_is_set_from_the_yaml_config(tmp_path: Path) -> None:
    """Issue 14 item 5: ``inline_deadline_s`` (and ``deadline_s``) come from the middleware's
    YAML config; constructor arguments win, the environment overrides the file."""
    from integrations.exporters import SidecarExporter

    f = tmp_path / "c.yaml"
    f.write_text("exporter:\n  inline_deadline_s: 0.25\n  deadline_s: 12\n")
    assert ForensicsConfig().exporter.inline_deadline_s == 1.0     # the safe default
    assert load_config(f, env={}).exporter.inline_deadline_s == 0.25
    env = {"FORENSICS_CONFIG": str(f), "FORENSICS_EXPORTER__INLINE_DEADLINE_S": "0.5"}
    assert load_config(env=env).exporter.inline_deadline_s == 0.5
    for kwargs, expected in (({"config": f}, (12.0, 0.25)),
                             ({"config": load_config(f, env={})}, (12.0, 0.25)),
                             ({"config": f, "inline_deadline_s": 2.0}, (12.0, 2.0)),
                             ({"config": ForensicsConfig()}, (30.0, 1.0))):
        ex = SidecarExporter("127.0.0.1:1", **kwargs)   # type: ignore[arg-type]
        try:
            assert (ex.deadline_s, ex.inline_deadline_s) == expected
        finally:
            ex.shutdown(timeout_s=0)
    for bad in ("0", "-1", "soon"):
        f.write_text(f"exporter:\n  inline_deadline_s: {bad}\n")
        with pytest.raises(ConfigError, match=re.escape("exporter.inline_deadline_s")):
            load_config(f, env={})

