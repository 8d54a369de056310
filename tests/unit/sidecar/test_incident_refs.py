"""Incident references (``sidecar._incident_refs``): what a job attempt on a remote executor is
given instead of the sidecar's local path — the object's URI under ``store.uri`` with its index
row's digest — fetched and checked before anything reads it. The store is a ``file://`` URI
here (pyarrow's local filesystem: the same code path as ``s3://`` minus the network; the S3
emulator + Ray version is in test_ray_executor.py)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from integrations.errors import IncidentFormatError
from sidecar._config import SidecarConfig
from sidecar._incident_refs import incident_ref, is_ref, open_ref
from sidecar._store import LocalStore
from sidecar.jobs import JobContext


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[SidecarConfig, LocalStore]]:
    """A sidecar config + store whose files live at ``file://<tmp>/bucket``; jobs see this
    config (with a data dir of their own, as a remote worker has)."""
    remote = tmp_path / "bucket"
    remote.mkdir()
    cfg = SidecarConfig.from_dict({"data_dir": str(tmp_path / "sidecar"),
                                   "store": {"uri": remote.as_uri()}})
    with LocalStore.from_config(cfg) as store:
        yield cfg, store


def _ctx(cfg: SidecarConfig, ref: str) -> JobContext:
    return JobContext(job_id="j", incident_id="inc-1", kind="stats", attempt=1, params={},
                      incident_path=ref, config=cfg, tenant="acme")


def test_a_reference_names_the_object_and_its_digest_and_opens_to_the_same_bytes(
        setup: tuple[SidecarConfig, LocalStore], make_incident: Callable[..., bytes]) -> None:
    cfg, store = setup
    data = make_incident("inc-1", n_sites=3)
    store.put("inc-1", data, tenant="acme")
    ref = store.ref("inc-1", tenant="acme")
    assert is_ref(ref) and not is_ref(str(store.path("inc-1", tenant="acme")))
    assert ref == (f"{cfg.store.uri}/incidents/t-acme/inc-1.arrow"
                   f"#sha256={hashlib.sha256(data).hexdigest()}")
    local = open_ref(ref, cfg)
    assert local.read_bytes() == data
    assert local.is_relative_to(Path(cfg.data_dir) / "ref-cache")   # not the store's cache/
    assert len(_ctx(cfg, ref).open_incident().sites()) == 3
    assert open_ref(ref, cfg) == local                 # the checked copy is reused


def test_an_object_altered_after_the_ack_is_refused(
        setup: tuple[SidecarConfig, LocalStore], make_incident: Callable[..., bytes]) -> None:
    cfg, store = setup
    store.put("inc-1", make_incident("inc-1", n_sites=3), tenant="acme")
    ref = store.ref("inc-1", tenant="acme")
    obj = Path(cfg.store.uri.removeprefix("file://")) / "incidents/t-acme/inc-1.arrow"
    obj.write_bytes(make_incident("inc-1", n_sites=2, seed=7))
    with pytest.raises(IncidentFormatError, match="does not hold the acknowledged incident"):
        _ctx(cfg, ref).open_incident()
    obj.unlink()
    with pytest.raises(IncidentFormatError, match="does not exist"):
        open_ref(ref, cfg)


@pytest.mark.parametrize("bad", [
    "s3://elsewhere/incidents/t-acme/inc-1.arrow#sha256=00",      # another store
    "{uri}/incidents/../../etc/passwd#sha256=00",                  # out of the store
    "{uri}/incidents/t-acme/inc-1.arrow#",                         # no digest: never trusted
])
def test_references_outside_the_store_or_without_a_digest_are_refused(
        setup: tuple[SidecarConfig, LocalStore], make_incident: Callable[..., bytes],
        bad: str) -> None:
    cfg, store = setup
    store.put("inc-1", make_incident("inc-1", n_sites=3), tenant="acme")
    with pytest.raises(IncidentFormatError):
        open_ref(bad.format(uri=cfg.store.uri), cfg)


def test_a_pending_row_is_referenced_by_size_and_crc32c() -> None:
    ref = incident_ref("s3://b/p/", "incidents/t-a/i.arrow", sha256="", size_bytes=12,
                       crc32c=99)
    assert ref == "s3://b/p/incidents/t-a/i.arrow#size=12&crc32c=99"


def test_a_local_store_gives_its_path(tmp_path: Path,
                                      make_incident: Callable[..., bytes]) -> None:
    with LocalStore(tmp_path) as store:
        store.put("inc-1", make_incident("inc-1"), tenant="acme")
        assert store.ref("inc-1", tenant="acme") == str(store.path("inc-1", tenant="acme"))


def test_a_worker_starting_leaves_another_workers_download_alone(tmp_path: Path) -> None:
    """Workers beside the sidecar share ``<data_dir>/ref-cache``; a worker restarted after a
    kill builds its cache while another fetches. Building it removes only temp files left by
    a crash (untouched for ``STRAY_TMP_AGE_S``), never a download in flight (which, removed,
    once failed a job as "the object does not exist")."""
    import os
    import time

    from sidecar._incident_cache import STRAY_TMP_AGE_S, LocalCache

    root = tmp_path / "ref-cache"
    (root / "refs").mkdir(parents=True)
    in_flight = root / "refs" / ".abc.1111.tmp"
    crashed = root / "refs" / ".def.2222.tmp"
    for p in (in_flight, crashed):
        p.write_bytes(b"partial")
    old = time.time() - STRAY_TMP_AGE_S - 5
    os.utime(crashed, (old, old))
    LocalCache(root)
    assert in_flight.exists() and not crashed.exists()
