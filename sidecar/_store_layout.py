"""Where the local store keeps an incident on disk: one directory per tenant.

Incident ids are unique per tenant (DESIGN §10), so an incident's key is (tenant, id) and its
files live in its tenant's directory under ``<root>/incidents/``::

    t-acme/inc-1.arrow            the incident (Arrow IPC stream: the source of truth)
    t-acme/inc-1.json             its receipt (tenant, received_at, sha256)
    x-<64 hex>/inc-1.arrow        a tenant whose name is not a plain lowercase name
    no-tenant/inc-1.arrow         the empty tenant (auth off and no ``request.tenant``)
    .inc-1.<uuid>.tmp             an upload being received (renamed into place when stored)

The directory name is collision-free: ``t-<name>`` only for names matching
``[a-z0-9][a-z0-9_-]{0,62}`` (lowercase, so distinct on case-insensitive filesystems too; no
dots, so never ``.`` or ``..``), ``x-`` + the full SHA-256 (hex) of the UTF-8 name for every
other non-empty name, ``no-tenant`` for ``""``. The three forms never share a name, the first
is the identity and the second a cryptographic hash, so two tenants never share a directory,
and no tenant name (``../x``, ``ACME``, ``t-x``) is ever used as a path. A hashed directory's
tenant is read back from the receipts in it.

Example::

    tenant_dir("acme"), tenant_dir("Acme")[:10]    # ('t-acme', 'x-37036cd8')
    stored_path("acme", "inc-1")                    # 'incidents/t-acme/inc-1.arrow'
    incident_file(root / "incidents", "acme", "inc-1").exists()
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

__all__ = ["NO_TENANT_DIR", "incident_file", "is_tenant_dir", "receipt_file", "stored_path",
           "tenant_dir", "tenant_from_dir"]

#: The directory of the empty tenant ("").
NO_TENANT_DIR = "no-tenant"
_PLAIN = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_HASHED = re.compile(r"x-[0-9a-f]{64}")


def tenant_dir(tenant: str) -> str:
    """The directory name of ``tenant`` (collision-free; see the module doc)."""
    if tenant == "":
        return NO_TENANT_DIR
    if _PLAIN.fullmatch(tenant):
        return f"t-{tenant}"
    return "x-" + hashlib.sha256(tenant.encode("utf-8")).hexdigest()


def tenant_from_dir(name: str) -> str | None:
    """The tenant of a plain or empty-tenant directory name; None for a hashed one (its
    receipts say) or a name that is not a tenant directory."""
    if name == NO_TENANT_DIR:
        return ""
    if name.startswith("t-") and _PLAIN.fullmatch(name[2:]):
        return name[2:]
    return None


def is_tenant_dir(name: str) -> bool:
    """Whether ``name`` is a name :func:`tenant_dir` can produce."""
    return tenant_from_dir(name) is not None or _HASHED.fullmatch(name) is not None


def stored_path(tenant: str, incident_id: str) -> str:
    """An incident's file relative to the store root (the index's ``path`` column)."""
    return f"incidents/{tenant_dir(tenant)}/{incident_id}.arrow"


def incident_file(incidents_dir: Path, tenant: str, incident_id: str) -> Path:
    """The Arrow file of (tenant, id) under ``incidents_dir`` (which may not exist)."""
    return incidents_dir / tenant_dir(tenant) / f"{incident_id}.arrow"


def receipt_file(incidents_dir: Path, tenant: str, incident_id: str) -> Path:
    """The receipt beside the Arrow file of (tenant, id)."""
    return incidents_dir / tenant_dir(tenant) / f"{incident_id}.json"
