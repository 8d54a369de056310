"""Incident files: memory-mapped zero-copy reads, safe in-place writes, atomic durable writes,
and the one directory fsync (its error policy)."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest
import torch

from integrations.incident import (
    Incident,
    IncidentBuilder,
    IncidentFormatError,
    fsync_dir,
    new_manifest,
)


def _incident() -> bytes:
    b = IncidentBuilder(manifest=new_manifest(id="inc-file"))
    g = torch.Generator().manual_seed(1)
    b.add(kind="activation", site="blocks.0.resid_post", module_path="model.layers.0", step=0,
          tensor=torch.randn(1, 64, 256, generator=g))  # [batch, pos, d_model]
    b.add(kind="activation", site="blocks.0.mask", step=0, tensor=torch.tensor([True] * 3))
    b.add(kind="activation", site="blocks.1.resid_post", module_path="model.layers.1", step=0,
          tensor=torch.randn(1, 64, 256, generator=g))  # misaligned after the 3-byte bool row
    b.add(kind="logits", site="logits", step=0, tensor=torch.randn(1, 97).to(torch.bfloat16))
    return b.to_bytes()


def _mappings_of(path: Path) -> list[tuple[int, int]]:
    spans = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip() == str(path.resolve()):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                spans.append((lo, hi))
    return spans


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_open_is_memory_mapped_and_zero_copy(tmp_path: Path) -> None:
    path = tmp_path / "inc-file.arrow"
    path.write_bytes(_incident())
    inc = Incident.open(path)
    t = inc.tensor("blocks.0.resid_post")
    spans = _mappings_of(path)
    assert spans, "the incident file is not memory-mapped"
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    assert any(lo <= start and end <= hi for lo, hi in spans), "tensor is not a view of the file"
    assert torch.equal(t, Incident.from_bytes(path.read_bytes()).tensor("blocks.0.resid_post"))


def test_misaligned_rows_are_copied_correctly(tmp_path: Path) -> None:
    data = _incident()
    path = tmp_path / "inc-file.arrow"
    path.write_bytes(data)
    ref = Incident.from_bytes(data)
    inc = Incident.open(path)
    for name in ("blocks.1.resid_post", "logits"):
        t = inc.tensor(name)
        assert t.data_ptr() % t.element_size() == 0
        assert torch.equal(t.view(torch.uint8) if t.dtype == torch.bfloat16 else t,
                           ref.tensor(name).view(torch.uint8)
                           if t.dtype == torch.bfloat16 else ref.tensor(name))


def test_in_place_write_never_reaches_the_file(tmp_path: Path) -> None:
    path = tmp_path / "inc-file.arrow"
    path.write_bytes(_incident())
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    inc = Incident.open(path)
    original = inc.tensor("blocks.0.resid_post", copy=True)
    t = inc.tensor("blocks.0.resid_post")
    t.mul_(2.0)  # writes the private copy-on-write page: no crash, file untouched
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert torch.equal(Incident.open(path).tensor("blocks.0.resid_post"), original)
    with pytest.raises(IncidentFormatError, match="modified in memory"):
        inc.to_bytes()
    with pytest.raises(IncidentFormatError, match="modified in memory"):
        inc.write(tmp_path / "copy.arrow")
    assert not (tmp_path / "copy.arrow").exists()


def test_from_bytes_hands_out_copies_and_never_mutates_the_input() -> None:
    data = _incident()
    snapshot = bytes(data)
    inc = Incident.from_bytes(data)
    t = inc.tensor("blocks.0.resid_post")
    t.add_(1.0)
    assert data == snapshot
    assert inc.to_bytes() == snapshot
    assert not torch.equal(inc.tensor("blocks.0.resid_post"), t)


def test_write_is_atomic_and_leaves_no_temp_file(tmp_path: Path) -> None:
    inc = Incident.from_bytes(_incident())
    target = tmp_path / f"{inc.id}.arrow"
    inc.write(target)
    assert os.listdir(tmp_path) == [target.name]
    assert target.read_bytes() == inc.to_bytes()
    reopened = Incident.open(target)
    reopened.write(target)  # rewriting the file we have mapped is safe (new inode)
    assert Incident.open(target).digest == inc.digest
    assert os.listdir(tmp_path) == [target.name]


def test_failed_write_keeps_old_file_and_removes_temp(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "inc.arrow"
    target.write_bytes(b"old content")
    inc = Incident.from_bytes(_incident())

    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        inc.write(target)
    assert os.listdir(tmp_path) == ["inc.arrow"]
    assert target.read_bytes() == b"old content"


def _failing_fsync(code: int):  # type: ignore[no-untyped-def]
    def fsync(fd: int) -> None:
        raise OSError(code, os.strerror(code))
    return fsync


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOTSUP, errno.EBADF])
def test_fsync_dir_tolerates_filesystems_that_cannot_sync_a_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    fsync_dir(tmp_path)  # a real directory fsync
    monkeypatch.setattr(os, "fsync", _failing_fsync(code))
    fsync_dir(tmp_path)  # "not supported here" is tolerated


def test_fsync_dir_raises_io_errors_and_missing_directories(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError):
        fsync_dir(tmp_path / "missing")
    monkeypatch.setattr(os, "fsync", _failing_fsync(errno.EIO))
    with pytest.raises(OSError, match="Input/output error"):
        fsync_dir(tmp_path)
    with pytest.raises(OSError, match="Input/output error"):  # and so does atomic_write's
        Incident.from_bytes(_incident()).write(tmp_path / "inc.arrow")


def test_open_rejects_empty_and_truncated_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.arrow"
    empty.write_bytes(b"")
    with pytest.raises(IncidentFormatError, match="empty"):
        Incident.open(empty)
    cut = tmp_path / "cut.arrow"
    cut.write_bytes(_incident()[:-1])
    with pytest.raises(IncidentFormatError):
        Incident.open(cut)
    with pytest.raises(FileNotFoundError):
        Incident.open(tmp_path / "missing.arrow")
