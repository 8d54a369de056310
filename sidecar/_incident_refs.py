"""Incident references a job attempt can open on any machine (DESIGN §12).

The store makes them (:meth:`sidecar._store.LocalStore.ref`); ``JobContext.open_path`` opens
them. A fetch that fails on the network raises ``StoreUnavailableError`` (the runner retries the
attempt); a missing or altered object is an ``IncidentFormatError`` (the job fails).

On the sidecar's own thread pool a job opens a local file (the store's path or its checked
cache copy). A job that runs on a remote executor (a Ray worker on another node) cannot: it gets
a *reference* instead — the object's URI under ``store.uri`` with the digest the index holds for
it in the fragment — and :func:`open_ref` fetches the object through the same ``store`` config
(credentials from the worker's own environment), into a bounded local cache, and checks the
digest before anything reads it. A reference outside ``store.uri`` is refused: a job opens only
its sidecar's store.

Example::

    ref = incident_ref("s3://b/prod", "incidents/t-acme/inc-1.arrow", sha256="ab12...",
                       size_bytes=4096, crc32c=None)
    # 's3://b/prod/incidents/t-acme/inc-1.arrow#sha256=ab12...'
    path = open_ref(ref, config)         # a local, verified copy
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
import urllib.parse
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from integrations.errors import IncidentFormatError

from ._store_files import StoreUnavailableError

if TYPE_CHECKING:
    from ._config import SidecarConfig
    from ._incident_cache import LocalCache

__all__ = ["incident_ref", "is_ref", "open_ref"]

_BLOCK = 8 * 1024 * 1024
_caches: dict[Path, LocalCache] = {}
_caches_lock = threading.Lock()


def incident_ref(uri: str, stored: str, *, sha256: str, size_bytes: int,
                 crc32c: int | None) -> str:
    """The reference of the object ``stored`` (a path relative to ``uri``, as in the index row)
    with its digest: the sha256 when known, else (a row whose content check is pending) its size
    and CRC32C."""
    digest = {"sha256": sha256} if sha256 else {"size": str(size_bytes),
                                                 **({} if crc32c is None else
                                                    {"crc32c": str(crc32c)})}
    return f"{uri.rstrip('/')}/{stored.lstrip('/')}#{urllib.parse.urlencode(digest)}"


def is_ref(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a reference (a URI with a digest) rather than a local file."""
    text = os.fspath(path)
    return "://" in text and "#" in text


def open_ref(ref: str, config: SidecarConfig, *, what: str = "incident") -> Path:
    """A local copy of the referenced object, fetched through ``config.store`` (reused while it
    still matches) and checked against the reference's digest. ``what`` names the object in
    errors (``"incident"``; ``"baseline"`` / ``"probe"``: :mod:`sidecar._artefacts`).

    Raises :class:`~integrations.errors.IncidentFormatError` for a reference outside
    ``store.uri``, a missing object, or bytes that do not match the digest."""
    base_uri = config.store.uri.rstrip("/")
    location, _, fragment = ref.partition("#")
    if config.store.is_local or not location.startswith(base_uri + "/"):
        raise IncidentFormatError(f"{what} reference {location!r} is not in this sidecar's "
                                  f"incident store ({base_uri or 'a local data_dir'})")
    rel = location[len(base_uri) + 1:]
    if not rel or any(part in ("", ".", "..") for part in rel.split("/")):
        raise IncidentFormatError(f"{what} reference {location!r} is not a stored {what}")
    want = dict(urllib.parse.parse_qsl(fragment))
    cache = _cache(config)
    target = cache.path("refs", hashlib.sha256(ref.encode("utf-8")).hexdigest()[:32])
    if target.exists() and _matches(cache, target, want):
        cache.touch(target)
        return target
    fs, base = config.store.filesystem()
    _fetch(fs, f"{base}/{rel}", target, location, what)
    cache.admit(target)
    if not _matches(cache, target, want):
        cache.drop(target)
        raise IncidentFormatError(f"the object {location} does not hold the acknowledged {what} "
                                  "(its digest differs from the index row's)")
    return target


def _cache(config: SidecarConfig) -> LocalCache:
    """One bounded cache per process: ``<data_dir>/ref-cache`` when this machine has the data
    dir (a worker beside the sidecar; never the sidecar's own ``cache/``, which another
    :class:`LocalCache` budgets and evicts), else the temp dir (a remote worker)."""
    from ._incident_cache import LocalCache

    data_dir = Path(config.data_dir)
    root = (data_dir / "ref-cache" if data_dir.is_dir() and os.access(data_dir, os.W_OK)
            else Path(tempfile.gettempdir()) / "forensics-job-cache")
    with _caches_lock:
        if root not in _caches:
            _caches[root] = LocalCache(root)
        return _caches[root]


def _matches(cache: LocalCache, path: Path, want: dict[str, str]) -> bool:
    sha, crc = cache.digests(path)
    if "sha256" in want:
        return sha == want["sha256"]
    if "size" not in want:
        return False        # a reference without a digest is never trusted
    return path.stat().st_size == int(want["size"]) and (
        "crc32c" not in want or crc == int(want["crc32c"]))


def _fetch(fs: object, key: str, target: Path, location: str, what: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        try:
            src = fs.open_input_stream(key)   # type: ignore[attr-defined]
        except FileNotFoundError as e:   # the source only: a local error is not "missing"
            raise IncidentFormatError(f"the {what} object {location} does not exist (deleted "
                                      "after the job was queued?)") from e
        with src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, _BLOCK)
        os.replace(tmp, target)
    except OSError as e:     # the store unreachable from this worker: the attempt runs again
        raise StoreUnavailableError(f"could not fetch {location} ({e}); check that this worker "
                                    "reaches store.uri with the AWS credentials in its "
                                    "environment") from e
    finally:
        tmp.unlink(missing_ok=True)
