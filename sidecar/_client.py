"""A small synchronous client of ``forensics.v1.IncidentService`` (used by the CLI and tests).

The middleware's durable, retrying uploader is ``integrations.exporters.SidecarExporter``; this
client is for operators and tools: list, show, download, delete, analyses, and a plain upload.

Example::

    with SidecarClient("127.0.0.1:7431", token="s3cret-token") as c:
        page = c.list(filter='trigger_rule = "flag"', page_size=20)
        data = c.download(page.incidents[0].id)
"""

from __future__ import annotations

import builtins
import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from integrations.exporters._upload_stream import AUTO, UploadStream

from .api import v1

__all__ = ["SidecarClient", "upload_requests"]


def upload_requests(incident_id: str, data: bytes, *, chunk_size: int = v1.MAX_CHUNK_BYTES,
                    tenant: str = "", traceparent: str = "", sha256: str | None = None,
                    content_sha256: str | None = AUTO, crc32c: int | None = None,
                    ) -> Iterator[v1.UploadIncidentRequest]:
    """The UploadIncident message stream for ``data``: header, ≤ ``chunk_size`` chunks,
    trailer. The CRC32C protocol when ``data`` is an incident with a content digest
    (``content_sha256`` overrides it; ``None`` = the sha256 protocol of older clients);
    ``sha256`` / ``crc32c`` override the trailer's values (default: the real ones)."""
    if sha256 is not None and content_sha256 == AUTO:
        content_sha256 = None   # a trailer sha256 was asked for: the sha256 protocol
    return iter(UploadStream(incident_id, data, chunk_size=chunk_size, tenant=tenant,
                             traceparent=traceparent, content_sha256=content_sha256,
                             trailer_sha256=sha256, trailer_crc32c=crc32c))


class SidecarClient:
    """Blocking client; ``token`` is sent as ``authorization: Bearer <token>``; ``tenant``
    (admin tokens; ids are unique per tenant) as ``x-forensics-tenant``: every call acts on
    that tenant's incidents.

    TLS: pass ``root_certificates`` (PEM bytes of the CA), plus ``private_key`` and
    ``certificate_chain`` for mTLS.
    """

    def __init__(self, address: str, *, token: str | None = None, timeout_s: float = 30.0,
                 root_certificates: bytes | None = None, private_key: bytes | None = None,
                 certificate_chain: bytes | None = None,
                 options: Sequence[tuple[str, Any]] = (), tenant: str | None = None) -> None:
        self.address = address
        opts = [("grpc.max_receive_message_length",
                 max(v1.MAX_CHUNK_BYTES, v1.MAX_RESPONSE_BYTES) + 64 * 1024), *options]
        if root_certificates is not None:
            creds = grpc.ssl_channel_credentials(root_certificates, private_key,
                                                 certificate_chain)
            self.channel = grpc.secure_channel(address, creds, options=opts)
        else:
            self.channel = grpc.insecure_channel(address, options=opts)
        self.stub = v1.IncidentServiceStub(self.channel)
        self.timeout_s = timeout_s
        self.metadata: tuple[tuple[str, str], ...] = \
            (("authorization", f"Bearer {token}"),) if token else ()
        if tenant is not None:
            self.metadata += (("x-forensics-tenant", tenant),)

    def _kw(self, timeout_s: float | None = None) -> dict[str, Any]:
        return {"timeout": self.timeout_s if timeout_s is None else timeout_s,
                "metadata": self.metadata}

    def upload(self, incident_id: str, data: bytes, **kwargs: Any) -> v1.UploadIncidentResponse:
        """Upload one incident's bytes (kwargs: see :func:`upload_requests`)."""
        return self.stub.UploadIncident(upload_requests(incident_id, data, **kwargs), **self._kw())

    def get(self, incident_id: str, *, full: bool = False) -> v1.Incident:
        view = v1.INCIDENT_VIEW_FULL if full else v1.INCIDENT_VIEW_BASIC
        return self.stub.GetIncident(v1.GetIncidentRequest(incident_id=incident_id, view=view),
                                     **self._kw())

    def list(self, *, filter: str = "", order_by: str = "", page_size: int = 0,
             page_token: str = "", full: bool = False) -> v1.ListIncidentsResponse:
        view = v1.INCIDENT_VIEW_FULL if full else v1.INCIDENT_VIEW_BASIC
        return self.stub.ListIncidents(v1.ListIncidentsRequest(
            filter=filter, order_by=order_by, page_size=page_size, page_token=page_token,
            view=view), **self._kw())

    def list_all(self, *, filter: str = "", order_by: str = "",
                 page_size: int = 100) -> Iterator[v1.Incident]:
        """Every matching incident, following page tokens."""
        token = ""
        while True:
            page = self.list(filter=filter, order_by=order_by, page_size=page_size,
                             page_token=token)
            yield from page.incidents
            token = page.next_page_token
            if not token:
                return

    def download(self, incident_id: str, *, to: str | Path | None = None) -> bytes:
        """The incident's bytes (verified against the sha256 the server announces); written to
        ``to`` as well when given."""
        header: v1.DownloadHeader | None = None
        parts: list[bytes] = []
        for msg in self.stub.DownloadIncident(
                v1.DownloadIncidentRequest(incident_id=incident_id), **self._kw()):
            if msg.WhichOneof("part") == "header":
                header = msg.header
            else:
                parts.append(msg.chunk.data)
        data = b"".join(parts)
        if header is None or len(data) != header.total_size or \
                hashlib.sha256(data).hexdigest() != header.sha256:
            from integrations.errors import SidecarError

            raise SidecarError(f"download of {incident_id} is incomplete or corrupted; retry")
        if to is not None:
            from integrations.incident import atomic_write

            atomic_write(Path(to), data)
        return data

    def delete(self, incident_id: str) -> None:
        self.stub.DeleteIncident(v1.DeleteIncidentRequest(incident_id=incident_id), **self._kw())

    def run_analysis(self, incident_id: str, kind: str, *, params_json: str = "",
                     request_id: str = "") -> v1.Analysis:
        return self.stub.RunAnalysis(v1.RunAnalysisRequest(
            incident_id=incident_id, kind=kind, params_json=params_json,
            request_id=request_id), **self._kw())

    def get_analysis(self, analysis_id: str) -> v1.Analysis:
        return self.stub.GetAnalysis(v1.GetAnalysisRequest(analysis_id=analysis_id),
                                     **self._kw())

    def list_analyses(self, incident_id: str) -> builtins.list[v1.Analysis]:
        resp = self.stub.ListAnalyses(v1.ListAnalysesRequest(incident_id=incident_id),
                                      **self._kw())
        return list(resp.analyses)

    def watch(self, *, filter: str = "", timeout_s: float | None = None) -> Iterator[v1.Incident]:
        """New incidents as they are stored (until cancelled or ``timeout_s``)."""
        for msg in self.stub.WatchIncidents(v1.WatchIncidentsRequest(filter=filter),
                                            timeout=timeout_s, metadata=self.metadata):
            yield msg.incident

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> SidecarClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
