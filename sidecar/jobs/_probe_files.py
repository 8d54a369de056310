"""Failure-signature probes on disk, per (tenant, model fingerprint), versioned (no pickle).

``<data_dir>/probes/<tenant key>/<fingerprint, ':' -> '-'>/probe-v0001.json``: the tenant key is
the first 16 hex digits of the tenant's SHA-256 (tenants are free text; the file says which
tenant it is for). A file holds the probe (``analysis.rca.LinearProbe.to_dict``), the site it
reads, how it was measured and where it came from; it is written atomically, a version is
claimed with an exclusive create (two trainings never share one).

Example::

    version, path = claim_probe_path(cfg.data_dir, "acme", fp)
    write_probe(path, {"probe": probe.to_dict(), "site": "blocks.2.resid_post", ...})
    found = latest_probe(cfg.data_dir, "acme", fp)     # (version, path, doc) or None
    LinearProbe.from_dict(found[2]["probe"]).score(x)
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from ._baselines import usable_fingerprint
from ._kind import JobFailed

__all__ = ["PROBE_FORMAT", "claim_probe_path", "has_probe", "latest_probe", "probe_versions",
           "tenant_key", "write_probe"]

#: The ``format`` of a probe file.
PROBE_FORMAT = "forensics-probe/1"
_CACHE: dict[tuple[str, float], dict[str, Any]] = {}
_CACHE_LOCK = threading.Lock()


def tenant_key(tenant: str) -> str:
    """The directory name of a tenant's probes (a hash: tenants are free text)."""
    return hashlib.sha256(tenant.encode("utf-8")).hexdigest()[:16]


def _model_dir(data_dir: str | os.PathLike[str], tenant: str, fingerprint: str) -> Path:
    return Path(data_dir) / "probes" / tenant_key(tenant) / fingerprint.replace(":", "-")


def _version(path: Path) -> int:
    return int(path.stem.rsplit("-v", 1)[1])


def probe_versions(data_dir: str | os.PathLike[str], tenant: str,
                   fingerprint: str | None) -> list[Path]:
    """The probe files of (tenant, model), oldest version first (empty for a bad fingerprint)."""
    if not usable_fingerprint(fingerprint):
        return []
    d = _model_dir(data_dir, tenant, fingerprint)
    return sorted(p for p in d.glob("probe-v[0-9][0-9][0-9][0-9].json") if p.stat().st_size)


def has_probe(data_dir: str | os.PathLike[str], tenant: str, fingerprint: str | None) -> bool:
    """Whether (tenant, model) has a trained probe."""
    return bool(probe_versions(data_dir, tenant, fingerprint))


def claim_probe_path(data_dir: str | os.PathLike[str], tenant: str,
                     fingerprint: str) -> tuple[int, Path]:
    """(version, path) of a new probe of (tenant, model): the file is created empty, exclusively
    (it counts as a probe once :func:`write_probe` filled it)."""
    if not usable_fingerprint(fingerprint):
        raise JobFailed(f"the model fingerprint {fingerprint!r} cannot name a probe")
    d = _model_dir(data_dir, tenant, fingerprint)
    d.mkdir(parents=True, exist_ok=True)
    existing = sorted(d.glob("probe-v[0-9][0-9][0-9][0-9].json"))
    version = 1 + (_version(existing[-1]) if existing else 0)
    while True:
        path = d / f"probe-v{version:04d}.json"
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return version, path
        except FileExistsError:
            version += 1


def write_probe(path: Path, doc: dict[str, Any]) -> None:
    """Write a probe document atomically (``format`` added)."""
    from integrations.incident import atomic_write

    data = json.dumps({"format": PROBE_FORMAT, **doc}, allow_nan=False, sort_keys=True)
    atomic_write(path, data.encode("utf-8"))


def latest_probe(data_dir: str | os.PathLike[str], tenant: str, fingerprint: str | None,
                 ) -> tuple[int, Path, dict[str, Any]] | None:
    """(version, path, document) of the newest probe of (tenant, model), or None (cached per
    file; a file that is not a probe document fails the job, saying which)."""
    files = probe_versions(data_dir, tenant, fingerprint)
    if not files:
        return None
    path = files[-1]
    key = (str(path), path.stat().st_mtime)
    with _CACHE_LOCK:
        doc = _CACHE.get(key)
    if doc is None:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise JobFailed(f"probe file {path} cannot be read ({e}); delete it or train a "
                            "new probe (job kind probe)") from e
        if not isinstance(doc, dict) or doc.get("format") != PROBE_FORMAT or \
                not isinstance(doc.get("probe"), dict) or not isinstance(doc.get("site"), str):
            raise JobFailed(f"{path} is not a {PROBE_FORMAT} probe file; delete it or train a "
                            "new probe (job kind probe)")
        with _CACHE_LOCK:
            _CACHE.clear()
            _CACHE[key] = doc
    return _version(path), path, doc
