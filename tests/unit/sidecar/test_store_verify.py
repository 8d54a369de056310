"""Post-ack verification (CRC32C protocol): pending rows, quarantine of corrupt content, resume
after a crash, idempotency across the two protocols — on a real LocalStore (DuckDB + files)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from integrations._crc32c import crc32c
from integrations.incident import Incident
from sidecar._store import AlreadyExistsError, LocalStore, PutResult


def _put_crc(store: LocalStore, incident_id: str, data: bytes, *,
             content_sha256: str | None = None) -> PutResult:
    """What the servicer does for a CRC32C-protocol upload whose transport check passed."""
    inc = store.incoming(incident_id, sha256=False)
    inc.write(data)
    assert inc.finish() == ""           # no sha256 pass on the ack path
    digest = content_sha256 or Incident.from_bytes(data, verify=False).manifest["integrity"][
        "sha256"]
    return store.put_incoming(inc, tenant="acme", crc32c=crc32c(data), content_sha256=digest)


def _corrupt(data: bytes) -> bytes:
    bad = bytearray(data)
    bad[len(data) - 100] ^= 0x40        # inside the last tensor's bytes: rows ≠ manifest digest
    return bytes(bad)


def test_acked_pending_then_verified_with_the_file_sha256(
        store: LocalStore, make_incident: Callable[..., bytes]) -> None:
    data = make_incident("inc-1", n_sites=3)
    store.verifier.close()              # hold the check back to observe the pending state
    res = _put_crc(store, "inc-1", data)
    assert res.created and (res.row.integrity, res.row.sha256) == ("pending", "")
    assert store.index.pending_keys() == [("acme", "inc-1")]
    assert store.verifier.verify("inc-1", tenant="acme") == "verified"
    row = store.get("inc-1")
    assert row is not None and row.integrity == "verified"
    assert row.sha256 == hashlib.sha256(data).hexdigest() and row.crc32c == crc32c(data)
    assert store.verifier.verify("inc-1", tenant="acme") == "verified"
    assert store.index.pending_keys() == []


def test_corrupt_content_with_a_valid_crc_is_quarantined_after_the_ack(
        store: LocalStore, make_incident: Callable[..., bytes]) -> None:
    data = make_incident("inc-1", n_sites=3)
    digest = Incident.from_bytes(data).manifest["integrity"]["sha256"]
    res = _put_crc(store, "inc-1", _corrupt(data), content_sha256=digest)
    assert res.created                  # the structure is valid: acknowledged
    assert store.verifier.wait_idle(30)
    assert store.get("inc-1") is None and not list(store.incidents_dir.glob("*/inc-1*"))
    reason = json.loads((store.quarantine_dir / "t-acme" / "inc-1.reason.json").read_text())
    assert reason["reason"] == "content_digest_mismatch" and "integrity check" in reason["detail"]
    assert (store.quarantine_dir / "t-acme" / "inc-1.arrow").read_bytes() == _corrupt(data)


def test_pending_rows_are_checked_again_after_a_restart(
        tmp_path: Path, make_incident: Callable[..., bytes]) -> None:
    store = LocalStore(tmp_path)
    store.verifier.close()              # the process dies before the check ran
    _put_crc(store, "inc-ok", make_incident("inc-ok"))
    good = make_incident("inc-bad")
    _put_crc(store, "inc-bad", _corrupt(good),
             content_sha256=Incident.from_bytes(good).manifest["integrity"]["sha256"])
    store.close()
    with LocalStore(tmp_path) as again:   # resume() queues both
        assert again.verifier.wait_idle(30)
        row = again.get("inc-ok")
        assert row is not None and row.integrity == "verified"
        assert again.get("inc-bad") is None
        assert (again.quarantine_dir / "t-acme" / "inc-bad.arrow").exists()


def test_idempotency_across_protocols(store: LocalStore,
                                      make_incident: Callable[..., bytes]) -> None:
    data = make_incident("inc-1")
    assert _put_crc(store, "inc-1", data).created
    assert not store.put("inc-1", data, tenant="acme").created       # sha256-protocol retry
    assert not _put_crc(store, "inc-1", data).created
    other = make_incident("inc-1", seed=3)
    with pytest.raises(AlreadyExistsError):
        _put_crc(store, "inc-1", other)
    with pytest.raises(AlreadyExistsError):
        store.put("inc-1", other, tenant="acme")


def test_reindex_keeps_the_receipt_of_a_row_stored_pending(
        tmp_path: Path, make_incident: Callable[..., bytes]) -> None:
    with LocalStore(tmp_path) as store:
        store.verifier.close()
        _put_crc(store, "inc-1", make_incident("inc-1", tenant="other-in-manifest"))
        received = store.get("inc-1").received_at   # type: ignore[union-attr]
        report = store.reindex()
        assert report.indexed == 1
        row = store.get("inc-1")
        assert row is not None and (row.tenant, row.received_at) == ("acme", received)
        assert row.integrity == "verified"          # reindex re-validates every row
