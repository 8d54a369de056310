"""Analysis artefacts (detector baselines, failure-signature probes) in the incident store.

A baseline (``.npz``) or probe (``.json``) lives where the incidents live (``store``; DESIGN
§12), under the same relative layout as before the store seam existed::

    <root>/baselines/<scope dir>/<fingerprint>/<detector>-v0001.npz
    <root>/probes/<tenant key>/<fingerprint>/probe-v0001.json

``<root>`` is ``data_dir`` for the default local store (byte-for-byte today's files) and
``store.uri`` (``s3://bucket/prefix``, ``file:///mnt/shared``, ...) for a shared one, where
every sidecar and every Ray worker reaches it. The catalog row (``baselines`` / ``probes``) is
the source of truth: it is written only after :func:`put_artefact` returned (the object is
durable), it carries the object's path relative to ``<root>`` and its sha256, and
:func:`artefact_path` checks that digest before anything parses the bytes (which are then
still untrusted: :func:`load_artefact` hands them to the caller's parser — npz without pickle,
JSON validated — and keeps the newest parsed one per kind while its file is unchanged). An artefact reference is
the plain dict :func:`artefact_ref` makes from a row — the runner resolves it in the job's
tenant (``prepare``), so a job never names another tenant's artefact.

On a shared store a reader fetches the object through :func:`sidecar._incident_refs.open_ref`
into the same bounded local cache as incident references (``<data_dir>/ref-cache``, or the temp
dir on a worker without the data dir) — so ``cf`` and ``probe_score`` run on any executor. The
kinds that *write* artefacts (``baseline``, ``probe``) still run on the sidecar: they claim a
version from the catalog and write with the sidecar's credentials (workers need read access
only). Rows written before digests existed have none: on the local store they are read as
before (the file is trusted), a shared store refuses them (rebuild, see README).

Example::

    sha = put_artefact(cfg, "baselines/tenant-acme/f00d/norm-v0001.npz", data)
    ref = artefact_ref({"path": "baselines/...", "sha256": sha, "version": 1}, what="baseline")
    data = read_artefact(cfg, ref)               # checked bytes (ArtefactError otherwise)
    path = artefact_path(cfg, ref)               # a checked local file (cached copy if remote)
"""

from __future__ import annotations

import hashlib
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from integrations.errors import ArtefactError, IncidentFormatError

if TYPE_CHECKING:
    from ._config import SidecarConfig

__all__ = ["ARTEFACT_DIRS", "artefact_path", "artefact_ref", "load_artefact", "put_artefact",
           "read_artefact"]

#: The top-level directories artefacts live in (a reference outside them is refused).
ARTEFACT_DIRS = ("baselines", "probes")
#: sha256 of local artefact files by (path, inode, mtime, size): hashed once while unchanged.
_VERIFIED: dict[tuple[str, int, int, int], str] = {}
_VERIFIED_LOCK = threading.Lock()
#: The newest parsed artefact of each kind (``what``), with the file state it was parsed from.
_PARSED: dict[str, tuple[tuple[str, int, int, int, str], Any]] = {}
T = TypeVar("T")


def _check_rel(rel: str, what: str) -> str:
    parts = rel.split("/")
    if parts[0] not in ARTEFACT_DIRS or len(parts) < 2 or \
            any(p in ("", ".", "..") or "\\" in p for p in parts):
        raise ArtefactError(f"{what} path {rel!r} is not an artefact of the store (expected "
                            f"{' or '.join(d + '/...' for d in ARTEFACT_DIRS)})")
    return rel


def put_artefact(config: SidecarConfig, rel: str, data: bytes) -> str:
    """Store ``data`` as the artefact ``rel`` (durable on return) and give its sha256 (for the
    catalog row). Local store: ``<data_dir>/<rel>``, written atomically (temp file, fsync,
    rename). Shared store: one object under ``store.uri`` (:func:`put_file`);
    :class:`~sidecar._store_files.StoreUnavailableError` when the store cannot take it."""
    _check_rel(rel, "artefact")
    if config.store.is_local:
        from integrations.incident import atomic_write

        target = Path(config.data_dir) / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, data)
        return hashlib.sha256(data).hexdigest()
    from ._incident_files_fs import put_file
    from ._store_files import StoreUnavailableError

    fs, base = config.store.filesystem()
    key = f"{base}/{rel}"
    try:
        fs.create_dir(key.rsplit("/", 1)[0], recursive=True)
        with tempfile.TemporaryDirectory(prefix="forensics-artefact-") as tmp:
            src = Path(tmp) / "artefact"
            src.write_bytes(data)
            put_file(fs, src, key)
    except (OSError, ValueError) as e:   # pyarrow's errors are OSError subclasses
        raise StoreUnavailableError(
            f"the store ({config.store.uri}) could not take {rel}: {e}; check that it is "
            "reachable (store.uri, store.s3) and the sidecar's credentials") from e
    return hashlib.sha256(data).hexdigest()


def artefact_ref(row: Mapping[str, Any], *, what: str) -> dict[str, Any]:
    """The reference a job gets for a catalog row: its ``path``, ``sha256`` (``""`` for rows
    written before digests), ``version`` and ``what`` it is (``baseline`` | ``probe``)."""
    return {"what": what, "path": str(row["path"]), "sha256": str(row.get("sha256") or ""),
            "version": int(row["version"])}


def artefact_path(config: SidecarConfig, ref: Mapping[str, Any]) -> Path:
    """A local file holding the referenced artefact, checked against the row's sha256 (module
    doc): on the local store the file itself (its digest computed once per (inode, mtime,
    size), like :meth:`~sidecar._incident_cache.LocalCache.digests`), on a shared store the
    checked copy in the bounded reference cache.

    Raises :class:`~integrations.errors.ArtefactError` when the object is missing, differs from
    the digest, lies outside the artefact layout, or (shared store) its row has no digest;
    ``StoreUnavailableError`` when the store cannot be reached (the attempt runs again)."""
    what = str(ref.get("what") or "artefact")
    rel = _check_rel(str(ref.get("path") or ""), what)
    want = str(ref.get("sha256") or "")
    if config.store.is_local:
        return _checked_local(Path(config.data_dir) / rel, want, what)
    if not want:
        raise ArtefactError(f"the catalog row of {what} {rel} carries no sha256 (written before "
                            "store.uri was set): it cannot be checked on a shared store; copy "
                            "it with `forensics baseline to-store` or build it again")
    from ._incident_refs import incident_ref, open_ref

    location = incident_ref(config.store.uri, rel, sha256=want, size_bytes=0, crc32c=None)
    try:
        return open_ref(location, config, what=what)
    except IncidentFormatError as e:
        raise ArtefactError(f"{e}; build the {what} again") from e


def read_artefact(config: SidecarConfig, ref: Mapping[str, Any]) -> bytes:
    """The bytes of the referenced artefact, checked (:func:`artefact_path`)."""
    return artefact_path(config, ref).read_bytes()


def load_artefact(config: SidecarConfig, ref: Mapping[str, Any],
                  parse: Callable[[bytes], T]) -> T:
    """``parse`` of the referenced artefact's checked bytes, parsed once while its file is
    unchanged (the newest of each ``what`` is kept per process: one model's baseline and probe
    is the common case). ``parse`` validates untrusted bytes (raising ``ArtefactError``)."""
    path = artefact_path(config, ref)
    st = path.stat()
    what = str(ref.get("what") or "artefact")
    stamp = (str(path), st.st_ino, st.st_mtime_ns, st.st_size, str(ref.get("sha256") or ""))
    with _VERIFIED_LOCK:
        hit = _PARSED.get(what)
    if hit is not None and hit[0] == stamp:
        return cast(T, hit[1])
    parsed = parse(path.read_bytes())
    with _VERIFIED_LOCK:
        _PARSED[what] = (stamp, parsed)
    return parsed


def _checked_local(path: Path, want: str, what: str) -> Path:
    """``path`` when its sha256 is ``want`` (any file for a row from before digests)."""
    try:
        st = path.stat()
        if not want:
            return path
        stamp = (str(path), st.st_ino, st.st_mtime_ns, st.st_size)
        with _VERIFIED_LOCK:
            known = _VERIFIED.get(stamp)
        if known is None:
            from ._store_verify import file_sha256

            known = file_sha256(path)
            with _VERIFIED_LOCK:
                if len(_VERIFIED) > 1024:
                    _VERIFIED.clear()
                _VERIFIED[stamp] = known
    except OSError as e:
        raise ArtefactError(f"the {what} file {path} its catalog row names cannot be read "
                            f"({e}); build it again") from e
    if known != want:
        raise ArtefactError(f"the {what} file {path} differs from the sha256 its catalog row "
                            "carries (altered after it was written); build it again")
    return path
