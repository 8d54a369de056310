"""Where configuration values come from: one layering mechanism for every config of the project.

Embedded defaults < a YAML file < environment variables < explicit arguments: :func:`read_settings`
returns the values of the last three as :class:`Setting` objects (key path, value, source), lowest
precedence first; the caller's schema checks the keys (naming unknown ones) and values.
``integrations.config.load_config`` reads ``FORENSICS_<SECTION>__<KEY>`` variables; the
sidecar's ``sidecar._config.load_config`` reads ``FORENSICS_SIDECAR__<SECTION>__<KEY>`` (its own
namespace, which the former leaves alone) and nests the values with :func:`merge_settings`.
PyYAML is imported only when a file or an environment value has to be parsed.

Example::

    errors: list[str] = []
    settings = read_settings("sidecar.yaml", env=os.environ, overrides={"data_dir": "/data"},
                             env_prefix=SIDECAR_ENV_PREFIX, sections=("data_dir", "grpc"),
                             errors=errors)
    merge_settings(settings)      # {'data_dir': '/data', 'grpc': {...}}
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from integrations.errors import ConfigError

__all__ = ["COMPONENT_ENV_PREFIXES", "SIDECAR_ENV_PREFIX", "Setting", "merge_settings",
           "read_settings"]

#: Environment namespaces owned by one component (the sidecar's keys are
#: ``FORENSICS_SIDECAR__<SECTION>__<KEY>``); the shared ``FORENSICS_`` loader leaves them alone.
SIDECAR_ENV_PREFIX = "FORENSICS_SIDECAR__"
COMPONENT_ENV_PREFIXES = (SIDECAR_ENV_PREFIX,)


def _yaml() -> Any:
    try:
        import yaml
    except ImportError as e:
        raise ConfigError("reading YAML config (a file or FORENSICS_* environment values) needs "
                          "PyYAML: `pip install pyyaml`") from e
    return yaml


@dataclass(frozen=True)
class Setting:
    """One configured value: its key path, the value and where it came from (for messages)."""

    key: tuple[str, ...]
    value: Any
    source: str


def _read_file(path: Path, sections: Collection[str]) -> Mapping[str, Any]:
    yaml = _yaml()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"cannot read config file {path}: not found; pass an existing "
                          "file") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path} must hold a mapping with keys "
                          f"{', '.join(sections)}; got {type(data).__name__}")
    return data


def _foreign(var: str, prefix: str) -> bool:
    """A variable in another component's own namespace (e.g. the sidecar's)."""
    return any(var.startswith(ns) for ns in COMPONENT_ENV_PREFIXES if ns != prefix)


def _env_key(var: str, prefix: str, sections: Collection[str],
             errors: list[str]) -> list[str] | None:
    """The key path a variable sets, or None when it is not a config variable of ``prefix``.

    In a component's own namespace (a prefix ending in ``__``) every variable is a key; in the
    shared ``FORENSICS_`` namespace only names with ``__`` are, and a name that looks like a
    mistyped key (``FORENSICS_RECORDER_ENABLED``) is an error."""
    rest = var[len(prefix):].lower()
    if "__" not in rest and not prefix.endswith("__"):
        if any(rest == s or rest.startswith(s + "_") for s in sections):
            errors.append(f"environment variable {var} looks like a config key but keys are "
                          f"separated by '__', e.g. {prefix}{next(iter(sections)).upper()}"
                          "__ENABLED")
        return None
    parts = rest.split("__")
    if any(not p for p in parts):
        errors.append(f"environment variable {var}: empty key segment")
        return None
    return parts


def _env_settings(env: Mapping[str, str], prefix: str, sections: Collection[str],
                  errors: list[str]) -> list[Setting]:
    out: list[Setting] = []
    for var in sorted(env):
        if not var.startswith(prefix) or _foreign(var, prefix):
            continue
        parts = _env_key(var, prefix, sections, errors)
        if parts is None:
            continue
        try:
            value = _yaml().safe_load(env[var])
        except ConfigError:
            raise
        except Exception as e:
            errors.append(f"environment variable {var}: value is not a YAML scalar ({e})")
            continue
        if isinstance(value, (dict, list)):
            errors.append(f"environment variable {var}: value must be a scalar, got {value!r}")
            continue
        out.append(Setting(tuple(parts), value, f"environment variable {var}"))
    return out


def read_settings(path: str | os.PathLike[str] | None, *, env: Mapping[str, str],
                  overrides: Mapping[str, Any] | None, env_prefix: str,
                  sections: Collection[str], errors: list[str]) -> list[Setting]:
    """Every configured value, lowest precedence first: the YAML file at ``path`` (its
    top-level keys), then the environment variables ``<env_prefix><KEY>__<KEY>...`` (values
    parsed as YAML scalars), then the explicit ``overrides`` (nested or dotted keys).
    ``sections`` are the valid top-level keys (for messages). Problems that are not a key's
    are appended to ``errors``; the caller's schema checks the keys and values.

    Example::

        read_settings(None, env={"FORENSICS_SIDECAR__GRPC__ADDRESS": "0.0.0.0:7431"},
                      overrides={"data_dir": "/data"}, env_prefix=SIDECAR_ENV_PREFIX,
                      sections=("data_dir", "grpc"), errors=[])
        # [Setting(('grpc', 'address'), '0.0.0.0:7431', 'environment variable ...'),
        #  Setting(('data_dir',), '/data', 'overrides')]
    """
    out: list[Setting] = []
    if path is not None:
        p = Path(path)
        out += [Setting((str(k),), v, f"file {p}") for k, v in _read_file(p, sections).items()]
    out += _env_settings(env, env_prefix, sections, errors)
    for k, v in (overrides or {}).items():
        if not isinstance(k, str) or not k:
            errors.append(f"override key {k!r} must be a non-empty string")
            continue
        out.append(Setting(tuple(k.split(".")), v, "overrides"))
    return out


def merge_settings(settings: Iterable[Setting]) -> dict[str, Any]:
    """The settings as one nested mapping, later ones winning key by key (mappings merge,
    anything else replaces). A value set below a key that is not a mapping is a ConfigError.

    Example::

        merge_settings([Setting(("grpc",), {"address": "a:1", "grace_s": 1}, "file x"),
                        Setting(("grpc", "address"), "b:2", "overrides")])
        # {'grpc': {'address': 'b:2', 'grace_s': 1}}
    """
    merged: dict[str, Any] = {}
    for s in settings:
        node = merged
        for i, part in enumerate(s.key[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(s.key[:i + 1])}: is a section and must be a "
                                  f"mapping of its keys (setting {'.'.join(s.key)} from "
                                  f"{s.source})")
            node = child
        _merge_value(node, s.key[-1], s.value)
    return merged


def _merge_value(node: dict[str, Any], key: str, value: Any) -> None:
    old = node.get(key)
    if isinstance(value, Mapping) and isinstance(old, dict):
        for k, v in value.items():
            _merge_value(old, str(k), v)
    else:
        node[key] = dict(value) if isinstance(value, Mapping) else value
