"""Detector baselines, per (scope, model fingerprint, detector), and the detector classes.

A baseline's *scope* says whose incidents built it and who uses it (DESIGN §10: per tenant unless
an operator declared a shared one, ``BaselinesConfig.scope``): ``tenant:<name>`` or
``shared:<name>``. Baselines are versioned per scope and model and stored through the store
(:mod:`sidecar._artefacts`: ``<data_dir>`` for the local store, ``store.uri`` for a shared one)
at ``baselines/<scope dir>/<fingerprint, ':' -> '-'>/<detector>-v0001.npz`` (no pickle; on a
shared store the name also carries the building job's id, so two sidecars never write one
object). The scope directory is ``tenant-<name>`` / ``shared-<name>`` for names that are safe as
file names, else a hash. Which version is newest is the catalog's ``baselines`` table (each row
with its object's sha256), never a directory listing. The detector of a job is
``params.detector``, else the sidecar's ``baselines.detector``; its class comes from
``analysis.cf``.

Example::

    version = next_baseline_version(host, cfg, "tenant:acme", fp, "mahalanobis")
    rel = baseline_rel("tenant:acme", fp, "mahalanobis", version)
    base = load_baseline(cfg, artefact_ref(row, what="baseline"))     # checked, then parsed
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

from .._config_sections import DETECTORS
from ._kind import JobFailed

if TYPE_CHECKING:
    from .._config import SidecarConfig
    from ._queries import Reader

__all__ = ["baseline_rel", "baseline_versions", "detector_class", "detector_name",
           "load_baseline", "next_baseline_version", "scope_dir", "usable_fingerprint"]

_FP = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,199}")   # e.g. "sha256:<hex>"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: The shape of a hashed scope name: a plain name of this shape is hashed too (no collisions).
_HASHED = re.compile(r"h[0-9a-f]{24}")


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


def _model_rel(scope: str, fingerprint: str) -> str:
    return f"baselines/{scope_dir(scope)}/{fingerprint.replace(':', '-')}"


def _version(path: Path) -> int:
    return int(path.stem.rsplit("-v", 1)[1])


def baseline_versions(data_dir: str | Path, scope: str, fingerprint: str,
                      detector: str) -> list[Path]:
    """The baseline files of a scope's model for ``detector`` in the local store's layout,
    oldest version first (files without a catalog row are never used, only never reused)."""
    if not usable_fingerprint(fingerprint) or detector not in DETECTORS:
        return []
    d = Path(data_dir) / _model_rel(scope, fingerprint)
    return sorted(d.glob(f"{detector}-v[0-9][0-9][0-9][0-9].npz"))


def next_baseline_version(reader: Reader, config: SidecarConfig, scope: str,
                          fingerprint: str, detector: str) -> int:
    """The version a new baseline of (scope, model, detector) gets: one past the newest in the
    catalog (and, on the local store, past any file of today's layout)."""
    rows = reader.read("SELECT max(version) FROM baselines WHERE scope = ? AND fingerprint = ? "
                       "AND detector = ?", [scope, fingerprint, detector])
    newest = int(rows[0][0] or 0) if rows else 0
    if config.store.is_local:
        files = baseline_versions(config.data_dir, scope, fingerprint, detector)
        newest = max(newest, _version(files[-1]) if files else 0)
    return newest + 1


def baseline_rel(scope: str, fingerprint: str, detector: str, version: int, *,
                 job_id: str | None = None) -> str:
    """Where a baseline version lives, relative to the store's root; ``job_id`` (shared
    stores) makes the name unique to the building job."""
    if not usable_fingerprint(fingerprint):
        raise JobFailed(f"the model fingerprint {fingerprint!r} cannot name a baseline")
    suffix = f"-{hashlib.sha256(job_id.encode('utf-8')).hexdigest()[:12]}" if job_id else ""
    return f"{_model_rel(scope, fingerprint)}/{detector}-v{version:04d}{suffix}.npz"


def load_baseline(config: SidecarConfig, ref: Mapping[str, Any]) -> Any:
    """The ``CFBaseline`` a catalog reference names: its bytes checked against the row's
    sha256, then parsed without pickle, once while its file is unchanged
    (:func:`sidecar._artefacts.load_artefact`). ``ArtefactError`` when missing, altered or not
    a baseline."""
    from .._artefacts import load_artefact

    return load_artefact(config, ref, lambda data: _parse_baseline(data, ref))


def _parse_baseline(data: bytes, ref: Mapping[str, Any]) -> Any:
    from analysis.cf import CFBaseline
    from integrations.errors import AnalysisError, ArtefactError

    try:
        return CFBaseline.from_bytes(data)
    except AnalysisError as e:
        raise ArtefactError(f"baseline {ref.get('path')} is not a valid baseline: {e}") from e
