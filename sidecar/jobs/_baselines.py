"""Detector baselines on disk, per (scope, model fingerprint, detector), and the detector classes.

A baseline's *scope* says whose incidents built it and who uses it (DESIGN §10: per tenant unless
an operator declared a shared one, ``BaselinesConfig.scope``): ``tenant:<name>`` or
``shared:<name>``. Files are versioned per scope and model: ``<data_dir>/baselines/<scope dir>/
<fingerprint, ':' -> '-'>/<detector>-v0001.npz`` (no pickle); the scope directory is
``tenant-<name>`` / ``shared-<name>`` for names that are safe as file names, else a hash. The
detector of a job is ``params.detector``, else the sidecar's ``baselines.detector``; its class
comes from ``analysis.cf``.

Example::

    latest_baseline(cfg.data_dir, "tenant:acme", fp, "mahalanobis")   # (version, path, base)
    version, path = next_baseline_path(cfg.data_dir, "tenant:acme", fp, "cf")
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

from .._config_sections import DETECTORS
from ._kind import JobFailed

if TYPE_CHECKING:
    from .._config import SidecarConfig

__all__ = ["baseline_versions", "detector_class", "detector_name", "latest_baseline",
           "next_baseline_path", "scope_dir", "usable_fingerprint"]

_FP = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,199}")   # e.g. "sha256:<hex>"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: The shape of a hashed scope name: a plain name of this shape is hashed too (no collisions).
_HASHED = re.compile(r"h[0-9a-f]{24}")
_CACHE: dict[tuple[str, float], Any] = {}
_CACHE_LOCK = threading.Lock()


def usable_fingerprint(fingerprint: Any) -> TypeGuard[str]:
    """Whether ``fingerprint`` names a model safely (it becomes a directory name)."""
    return isinstance(fingerprint, str) and _FP.fullmatch(fingerprint) is not None


def detector_name(options: Mapping[str, Any], config: SidecarConfig) -> str:
    """The detector a job uses: ``options["detector"]``, else ``baselines.detector``."""
    return str(options.get("detector") or config.baselines.detector)


def detector_class(name: str) -> Any:
    """The ``analysis.cf`` detector class of ``name`` (JobFailed when unknown/unavailable)."""
    if name not in DETECTORS:
        raise JobFailed(f"unknown detector {name!r}; use one of {', '.join(DETECTORS)}")
    try:
        from analysis.cf import detector_class as analysis_detector_class
    except ImportError as e:
        raise JobFailed(f"analysis.cf is not available in this install ({e}); install "
                        "model-forensics[analysis] on the sidecar") from e
    return analysis_detector_class(name)


def scope_dir(scope: str) -> str:
    """The directory name of a baseline scope (``tenant:acme`` -> ``tenant-acme``; a name that
    is not safe as a file name, or empty, becomes a hash: never a path of the caller's making).

    Example::

        scope_dir("shared:fleet")        # 'shared-fleet'
    """
    kind, _, name = scope.partition(":")
    if kind not in ("tenant", "shared", "legacy"):
        raise JobFailed(f"not a baseline scope: {scope!r}")
    if _NAME.fullmatch(name) and not _HASHED.fullmatch(name):
        return f"{kind}-{name}"
    return f"{kind}-h{hashlib.sha256(name.encode('utf-8')).hexdigest()[:24]}"


def _model_dir(data_dir: str | Path, scope: str, fingerprint: str) -> Path:
    return Path(data_dir) / "baselines" / scope_dir(scope) / fingerprint.replace(":", "-")


def _version(path: Path) -> int:
    return int(path.stem.rsplit("-v", 1)[1])


def baseline_versions(data_dir: str | Path, scope: str, fingerprint: str,
                      detector: str) -> list[Path]:
    """The stored baseline files of a scope's model for ``detector``, oldest version first."""
    if not usable_fingerprint(fingerprint) or detector not in DETECTORS:
        return []
    d = _model_dir(data_dir, scope, fingerprint)
    return sorted(d.glob(f"{detector}-v[0-9][0-9][0-9][0-9].npz"))


def next_baseline_path(data_dir: str | Path, scope: str, fingerprint: str,
                       detector: str) -> tuple[int, Path]:
    """(version, path) for a new baseline of the scope's model (its directory is created)."""
    existing = baseline_versions(data_dir, scope, fingerprint, detector)
    version = 1 + (_version(existing[-1]) if existing else 0)
    path = _model_dir(data_dir, scope, fingerprint) / f"{detector}-v{version:04d}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    return version, path


def latest_baseline(data_dir: str | Path, scope: str, fingerprint: str, detector: str,
                    ) -> tuple[int, Path, Any] | None:
    """(version, path, CFBaseline) of the scope's newest baseline, or None (cached per
    file)."""
    files = baseline_versions(data_dir, scope, fingerprint, detector)
    if not files:
        return None
    path = files[-1]
    key = (str(path), path.stat().st_mtime)
    with _CACHE_LOCK:
        base = _CACHE.get(key)
    if base is None:
        from analysis.cf import CFBaseline

        base = CFBaseline.load(path)
        with _CACHE_LOCK:
            _CACHE.clear()   # one model's newest baseline per process is the common case
            _CACHE[key] = base
    return _version(path), path, base
