"""Store failures on the ack path as refusals: typed, counted by reason, and never revealing the
sidecar's paths to a tenant (the chaos run's disk-full finding)."""

from __future__ import annotations

import errno
from pathlib import Path

import grpc
import pytest

from sidecar._ingest import unavailable
from sidecar._store_files import IncomingFile, StoreError


def _store_error(os_error: OSError) -> StoreError:
    try:
        try:
            raise os_error
        except OSError as e:
            raise StoreError(f"cannot store incident inc-1: {e}; check /srv/forensics") from e
    except StoreError as err:
        return err


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_is_its_own_reason_and_names_no_path(code: int) -> None:
    rej = unavailable(_store_error(OSError(code, "No space left", "/srv/forensics/x.tmp")))
    assert (rej.code, rej.reason) == (grpc.StatusCode.UNAVAILABLE, "disk_full")
    assert "/srv" not in rej.message and "retry" in rej.message


def test_other_store_failures_are_internal_and_name_no_path() -> None:
    rej = unavailable(_store_error(OSError(errno.EIO, "I/O error", "/srv/forensics/x.tmp")))
    assert (rej.code, rej.reason) == (grpc.StatusCode.UNAVAILABLE, "internal")
    assert "/srv" not in rej.message and "forensics" not in rej.message.split("(")[0]


def test_the_writer_threads_enospc_reaches_the_refusal(tmp_path: Path) -> None:
    """IncomingFile reports the writer thread's error without chaining it: the refusal still
    recognises a full disk from what the StoreError says."""
    inc = IncomingFile(tmp_path, "inc-1")
    inc._error = OSError(errno.ENOSPC, "No space left on device")   # what the writer saw
    with pytest.raises(StoreError) as e:
        inc.finish()
    assert unavailable(e.value).reason == "disk_full"
