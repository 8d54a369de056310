"""A client killed mid-upload is counted ``cancelled``, not ``bad_framing`` (found by the chaos run).

When a client process dies mid-upload its socket closes without a trailer, and gRPC may hand that
to the handler as an ordinary end of stream — the same as a live client that forgot its trailer
(``bad_framing``, a client bug). What tells them apart is whether the call is still active. gRPC's
ordering of the two events is a race (``benchmarks/chaos.py`` saw 2 of 6 ``kill -9``ed clients
counted ``bad_framing``), so the real servicer of a real sidecar is driven here with a stand-in
for the one thing that races: the call's context.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest

from sidecar._server import Sidecar
from sidecar.api import v1
from tests.integration.conftest import build_incident

Serve = Callable[..., tuple[Sidecar, str]]


class _Aborted(Exception):
    pass


class _Call:
    """The parts of a ``grpc.ServicerContext`` an upload uses; ``active`` = the client is there."""

    def __init__(self, *, active: bool) -> None:
        self.active = active
        self.status: tuple[grpc.StatusCode, str] | None = None
        self.trailing: Any = ()

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def is_active(self) -> bool:
        return self.active

    def time_remaining(self) -> None:
        return None

    def cancel(self) -> None:
        self.active = False

    def set_trailing_metadata(self, metadata: Any) -> None:
        self.trailing = metadata

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.status = (code, details)
        raise _Aborted(details)

    def code(self) -> grpc.StatusCode | None:
        return None if self.status is None else self.status[0]


def _half_upload(incident_id: str) -> list[v1.UploadIncidentRequest]:
    """Header and the first half of the bytes, then the stream ends: no more chunks, no trailer."""
    data = build_incident(incident_id)
    return [v1.UploadIncidentRequest(header=v1.UploadHeader(incident_id=incident_id,
                                                            total_size=len(data))),
            v1.UploadIncidentRequest(chunk=v1.Chunk(data=data[:len(data) // 2]))]


@pytest.mark.parametrize(("active", "code", "reason"), [
    (False, grpc.StatusCode.CANCELLED, "cancelled"),          # the client died mid-upload
    (True, grpc.StatusCode.INVALID_ARGUMENT, "bad_framing"),  # a live client without a trailer
], ids=["client_gone", "client_alive"])
def test_a_stream_ended_by_a_dead_client_is_cancelled_not_bad_framing(
        serve: Serve, active: bool, code: grpc.StatusCode, reason: str) -> None:
    sc, _ = serve()
    call = _Call(active=active)
    with pytest.raises(_Aborted):
        sc.servicer.UploadIncident(iter(_half_upload("inc-1")), call)  # type: ignore[arg-type]
    assert call.status is not None and call.status[0] == code
    assert dict(call.trailing)["forensics-reject-reason"] == reason
    assert sc.stats()["rejected"] == {reason: 1}
    assert not sc.store.index.incident_ids() and not list(sc.store.incidents_dir.iterdir())
