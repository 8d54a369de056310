"""DiskSpool: atomic ordered entries, byte bound, pick-up after a restart."""

from __future__ import annotations

import errno
import os

import pytest

from integrations.errors import ExportError
from integrations.exporters import _spool
from integrations.exporters._spool import DiskSpool, SpoolFullError


def test_entries_come_back_in_put_order_with_exact_bytes(tmp_path):
    spool = DiskSpool(tmp_path / "spool", max_bytes=10_000)
    payloads = {f"inc-{i}": bytes([i]) * (10 + i) for i in range(20)}
    for iid, data in payloads.items():
        spool.put(iid, data)
    entries = spool.entries()
    assert [e.incident_id for e in entries] == list(payloads)
    assert [e.read() for e in entries] == list(payloads.values())
    assert [e.ordinal for e in entries] == sorted({e.ordinal for e in entries})  # strictly up
    assert spool.nbytes == sum(len(d) for d in payloads.values())
    assert len(spool) == 20


def test_byte_bound_rejects_without_leaving_anything(tmp_path):
    spool = DiskSpool(tmp_path, max_bytes=100)
    spool.put("a", b"x" * 60)
    with pytest.raises(SpoolFullError, match="spool_max_bytes=100") as ei:
        spool.put("b", b"y" * 41)
    assert isinstance(ei.value, ExportError)
    assert [e.incident_id for e in spool.entries()] == ["a"]
    assert spool.nbytes == 60
    assert sorted(os.listdir(tmp_path)) == [spool.entries()[0].path.name]
    spool.put("c", b"z" * 40)  # exactly at the bound is fine
    assert spool.nbytes == 100


def test_a_failed_directory_fsync_leaves_nothing_behind(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    spool = DiskSpool(tmp_path, max_bytes=100)

    def fsync_dir(path: object) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(_spool, "fsync_dir", fsync_dir)
    with pytest.raises(OSError, match="I/O error"):
        spool.put("a", b"x" * 10)
    assert os.listdir(tmp_path) == []  # not durable: never sent later (it is counted as dropped)
    assert spool.nbytes == 0


def test_remove_frees_bytes_and_tolerates_a_concurrent_remove(tmp_path):
    spool = DiskSpool(tmp_path, max_bytes=100)
    e = spool.put("a", b"x" * 60)
    other = DiskSpool(tmp_path, max_bytes=100)  # a second process sharing the directory
    other.remove(other.entries()[0])
    spool.remove(e)  # already gone: no error, bytes freed
    assert spool.nbytes == 0 and len(spool) == 0
    spool.put("b", b"y" * 100)


def test_reopen_picks_up_entries_removes_temp_files_and_keeps_order(tmp_path):
    first = DiskSpool(tmp_path, max_bytes=1 << 20)
    for i in range(3):
        first.put(f"old-{i}", b"o" * 10)
    (tmp_path / ".tmp-00000000000000000001-1-torn.arrow").write_bytes(b"half")
    (tmp_path / "unrelated.txt").write_text("ignored")
    again = DiskSpool(tmp_path, max_bytes=1 << 20)
    assert not (tmp_path / ".tmp-00000000000000000001-1-torn.arrow").exists()
    assert again.nbytes == 30
    again.put("new", b"n")
    assert [e.incident_id for e in again.entries()] == ["old-0", "old-1", "old-2", "new"]


def test_ordinals_stay_increasing_even_if_the_clock_is_behind(tmp_path):
    spool = DiskSpool(tmp_path, max_bytes=1 << 20)
    future = 9 * 10**19  # an entry from a "future" clock, still 20 digits
    (tmp_path / f"{future:020d}-1-late.arrow").write_bytes(b"l")
    spool = DiskSpool(tmp_path, max_bytes=1 << 20)
    e = spool.put("after", b"a")
    assert e.ordinal == future + 1
    assert [x.incident_id for x in spool.entries()] == ["late", "after"]


def test_unsafe_ids_give_safe_file_names(tmp_path):
    spool = DiskSpool(tmp_path, max_bytes=1 << 20)
    e = spool.put("../../etc/passwd:x", b"d")
    assert e.path.parent == tmp_path
    assert "/" not in e.path.name[len(str(tmp_path)):]
    assert spool.entries()[0].read() == b"d"


def test_invalid_bound():
    with pytest.raises(ValueError, match="max_bytes"):
        DiskSpool("/nonexistent-never-created", max_bytes=0)


def test_entries_are_private_like_incident_files(tmp_path):
    from integrations.incident import atomic_write

    old = os.umask(0o022)   # the usual umask: a plain open() would give 0644
    try:
        entry = DiskSpool(tmp_path / "spool", max_bytes=1000).put("inc-1", b"secret")
        atomic_write(tmp_path / "inc-1.arrow", b"secret")
    finally:
        os.umask(old)
    assert entry.path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "inc-1.arrow").stat().st_mode & 0o777 == 0o600
