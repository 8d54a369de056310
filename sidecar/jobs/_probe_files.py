"""Failure-signature probes in the store, per (tenant, model fingerprint), versioned (no pickle).

``probes/<tenant key>/<fingerprint, ':' -> '-'>/probe-v0001.json`` under the store's root
(:mod:`sidecar._artefacts`: ``<data_dir>`` for the local store — today's files —, ``store.uri``
for a shared one, where the name also carries the training job's id so two sidecars never write
one object). The tenant key is the first 16 hex digits of the tenant's SHA-256 (tenants are free
text; the file says which tenant it is for). A file holds the probe
(``analysis.rca.LinearProbe.to_dict``), the site it reads, how it was measured and where it came
from. The catalog's ``probes`` rows (each with its object's sha256) say which version is newest;
on the local store a version is also claimed with an exclusive create (two trainings never share
one file).

Example::

    version, rel = claim_probe(cfg, "acme", fp, version=next_version, job_id=ctx.job_id)
    sha256 = write_probe(cfg, rel, {"probe": probe.to_dict(), "site": "blocks.2.resid_post"})
    doc = load_probe(cfg, artefact_ref(row, what="probe"))   # checked and validated
    LinearProbe.from_dict(doc["probe"]).score(x)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._artefacts import load_artefact, put_artefact
from ._baselines import usable_fingerprint
from ._kind import JobFailed

if TYPE_CHECKING:
    from .._config import SidecarConfig
    from ._queries import Reader

__all__ = ["PROBE_FORMAT", "claim_probe", "load_probe", "next_probe_version", "tenant_key",
           "write_probe"]

#: The ``format`` of a probe file.
PROBE_FORMAT = "forensics-probe/1"


def tenant_key(tenant: str) -> str:
    """The directory name of a tenant's probes (a hash: tenants are free text)."""
    return hashlib.sha256(tenant.encode("utf-8")).hexdigest()[:16]


def _model_rel(tenant: str, fingerprint: str) -> str:
    return f"probes/{tenant_key(tenant)}/{fingerprint.replace(':', '-')}"


def next_probe_version(reader: Reader, tenant: str, fingerprint: str) -> int:
    """One past the newest version of (tenant, model) in the catalog."""
    rows = reader.read("SELECT max(version) FROM probes WHERE tenant = ? AND fingerprint = ?",
                       [tenant, fingerprint])
    return int(rows[0][0] or 0) + 1 if rows else 1


def claim_probe(config: SidecarConfig, tenant: str, fingerprint: str, *, version: int,
                job_id: str) -> tuple[int, str]:
    """(version, path relative to the store's root) of a new probe of (tenant, model), at
    least ``version`` (the catalog's next). Local store: the file is created empty, exclusively
    (it counts once :func:`write_probe` filled it and its row exists). Shared store: the name
    carries ``job_id``; the catalog's primary key refuses a second row of one version."""
    if not usable_fingerprint(fingerprint):
        raise JobFailed(f"the model fingerprint {fingerprint!r} cannot name a probe")
    rel_dir = _model_rel(tenant, fingerprint)
    if not config.store.is_local:
        job = hashlib.sha256(job_id.encode("utf-8")).hexdigest()[:12]
        return version, f"{rel_dir}/probe-v{version:04d}-{job}.json"
    d = Path(config.data_dir) / rel_dir
    d.mkdir(parents=True, exist_ok=True)
    existing = sorted(d.glob("probe-v[0-9][0-9][0-9][0-9].json"))
    version = max(version, 1 + (int(existing[-1].stem.rsplit("-v", 1)[1]) if existing else 0))
    while True:
        rel = f"{rel_dir}/probe-v{version:04d}.json"
        try:
            os.close(os.open(Path(config.data_dir) / rel,
                             os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return version, rel
        except FileExistsError:
            version += 1


def write_probe(config: SidecarConfig, rel: str, doc: dict[str, Any]) -> str:
    """Store a probe document (``format`` added; durable on return); its sha256."""
    data = json.dumps({"format": PROBE_FORMAT, **doc}, allow_nan=False, sort_keys=True)
    return put_artefact(config, rel, data.encode("utf-8"))


def load_probe(config: SidecarConfig, ref: Mapping[str, Any]) -> dict[str, Any]:
    """The probe document a catalog reference names: checked against the row's sha256, then
    validated (a document that is not a probe fails the job, saying which), once while its file
    is unchanged (:func:`sidecar._artefacts.load_artefact`)."""
    return load_artefact(config, ref, lambda data: _parse_probe(data, ref))


def _parse_probe(data: bytes, ref: Mapping[str, Any]) -> dict[str, Any]:
    from integrations.errors import ArtefactError

    try:
        doc = json.loads(data.decode("utf-8"))
    except ValueError as e:
        raise ArtefactError(f"probe {ref.get('path')} is not JSON ({e}); train a new probe "
                            "(job kind probe)") from e
    if not isinstance(doc, dict) or doc.get("format") != PROBE_FORMAT or \
            not isinstance(doc.get("probe"), dict) or not isinstance(doc.get("site"), str):
        raise ArtefactError(f"{ref.get('path')} is not a {PROBE_FORMAT} probe document; "
                            "train a new probe (job kind probe)")
    return doc
