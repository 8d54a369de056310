"""The incident store's seam (DESIGN §12): what the servicer and the job runner need of a store
(:class:`IncidentStore`), the outcome of a put and the errors a store raises. The local
implementation is :class:`sidecar._store.LocalStore`.

Incident ids are unique per tenant: every lookup takes ``tenant``; ``tenant=None`` (an admin who
named none) finds an id in any tenant and raises :class:`AmbiguousIncidentError` when several
hold it.

Example::

    def newest(store: IncidentStore, incident_id: str) -> IncidentRow | None:
        return store.get(incident_id, tenant="acme")
"""

from __future__ import annotations

import dataclasses
import queue
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ._store_files import IncomingFile, StoreError
from ._store_index import IncidentRow
from ._store_recovery import ReindexReport

if TYPE_CHECKING:
    from integrations.incident import Incident

    from ._catalog import Catalog
    from ._catalog_backfill import Backfill
    from ._store_verify import ContentVerifier

__all__ = ["AlreadyExistsError", "AmbiguousIncidentError", "IncidentStore", "PutResult"]


class AlreadyExistsError(StoreError):
    """This tenant has an incident with this id and different bytes (sha256 differs)."""


class AmbiguousIncidentError(StoreError):
    """A lookup without a tenant (an admin's) found the id in several tenants."""

    def __init__(self, incident_id: str, tenants: list[str]) -> None:
        super().__init__(
            f"incident id {incident_id!r} is held by {len(tenants)} tenants "
            f"({', '.join(map(repr, tenants))}); ids are unique per tenant — name the tenant "
            "(gRPC metadata 'x-forensics-tenant', `forensics ... --tenant <name>`)")
        self.incident_id, self.tenants = incident_id, tenants


@dataclasses.dataclass(frozen=True)
class PutResult:
    """Outcome of :meth:`IncidentStore.put`."""

    row: IncidentRow
    created: bool
    #: Acknowledged (durable on disk) while the catalog was unreachable: indexed later by
    #: the back-fill (``sidecar._catalog_backfill``), which then enqueues its analyses.
    deferred: bool = False


class IncidentStore(Protocol):
    """What the servicer and the job runner need from a store."""

    index: Catalog
    verifier: ContentVerifier
    #: Incidents acknowledged while the catalog could not index them or enqueue their
    #: analyses: the back-fill does it once the catalog answers (``defer(row, reason=...)``).
    backfill: Backfill

    def put(self, incident_id: str, data: bytes, *, tenant: str | None,
            sha256: str | None = None) -> PutResult: ...

    def incoming(self, incident_id: str, *, sha256: bool = True) -> IncomingFile: ...

    def put_incoming(self, incoming: IncomingFile, *, tenant: str | None, sha256: str = "",
                     crc32c: int | None = None, content_sha256: str = "",
                     digest_verified: bool = False) -> PutResult: ...

    def get(self, incident_id: str, *, tenant: str | None = None) -> IncidentRow | None: ...

    def path(self, incident_id: str, *, tenant: str | None = None) -> Path: ...

    def ref(self, incident_id: str, *, tenant: str | None = None) -> str: ...

    def open(self, incident_id: str, *, tenant: str | None = None) -> Incident: ...

    def read_chunks(self, incident_id: str, chunk_size: int, *,
                    tenant: str | None = None) -> Iterator[bytes]: ...

    def delete(self, incident_id: str, *, tenant: str | None = None) -> bool: ...

    def subscribe(self) -> queue.Queue[IncidentRow | None]: ...

    def unsubscribe(self, q: queue.Queue[IncidentRow | None]) -> None: ...

    def reindex(self) -> ReindexReport: ...

    def close(self) -> None: ...
