"""FsFiles (incident files on a ``pyarrow.fs`` URI) on a real LocalFileSystem URI
(``file:///...``): the store's file side away from ``data_dir`` — layout, byte-identical reads,
the checked local cache, delete, quarantine, reindexing from the listing — and the ``store``
config section. The S3 path against an S3 API emulator is tests/integration/test_sidecar_s3.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from integrations._crc32c import crc32c
from integrations.errors import ConfigError, IncidentFormatError
from integrations.incident import Incident
from sidecar._config import SidecarConfig
from sidecar._config_store import StoreConfig, parse_store
from sidecar._incident_files_fs import FsFiles, files_for
from sidecar._store import AlreadyExistsError, LocalStore, StoreError


def _tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@pytest.fixture
def remote(tmp_path: Path) -> Path:
    return tmp_path / "bucket"


@pytest.fixture
def open_store(tmp_path: Path, remote: Path) -> Iterator[Callable[[str], LocalStore]]:
    """``open_store(data_dir_name)``: a LocalStore whose files live at ``file://<remote>``."""
    opened: list[LocalStore] = []

    def make(name: str) -> LocalStore:
        files = files_for(StoreConfig(uri=remote.as_uri()), data_dir=tmp_path / name)
        assert isinstance(files, FsFiles)
        store = LocalStore(tmp_path / name, files=files)
        opened.append(store)
        return store

    yield make
    for s in opened:
        s.close()


def test_put_writes_objects_under_the_uri_not_the_data_dir(
        open_store: Callable[[str], LocalStore], remote: Path,
        make_incident: Callable[..., bytes]) -> None:
    store = open_store("data")
    data = make_incident("inc-1", n_sites=3)
    row = store.put("inc-1", data, tenant="Acme Corp").row
    hashed = row.path.split("/")[1]
    assert hashed.startswith("x-") and len(hashed) == 66     # never the tenant name as a path
    assert _tree(remote) == [f"incidents/{hashed}/inc-1.arrow", f"incidents/{hashed}/inc-1.json"]
    assert (remote / row.path).read_bytes() == data
    receipt = json.loads((remote / row.path).with_suffix(".json").read_text())
    assert receipt["tenant"] == "Acme Corp" and receipt["sha256"] == row.sha256
    assert not (store.root / "incidents").exists()            # nothing of the local layout
    assert b"".join(store.read_chunks("inc-1", 1000, tenant="Acme Corp")) == data
    assert store.open("inc-1").sites() == [f"blocks.{i}.resid_post" for i in range(3)]
    assert not list((store.root / "spool").iterdir())          # the upload left no temp file


def test_cached_copy_is_checked_against_the_row(
        open_store: Callable[[str], LocalStore], remote: Path,
        make_incident: Callable[..., bytes]) -> None:
    store = open_store("data")
    data = make_incident("inc-1")
    row = store.put("inc-1", data, tenant="acme").row
    cached = store.path("inc-1", tenant="acme")
    assert cached.parent.parent == store.root / "cache" and cached.read_bytes() == data
    cached.write_bytes(b"stale bytes of a deleted incident")   # a wrong local copy
    assert store.path("inc-1", tenant="acme").read_bytes() == data   # fetched again
    other = make_incident("inc-1", seed=5)                      # the object replaced behind
    (remote / row.path).write_bytes(other)                      # the index's back
    cached.unlink()
    with pytest.raises(IncidentFormatError, match="not the acknowledged one"):
        store.path("inc-1", tenant="acme")


def test_local_copies_stay_within_the_cache_budget(
        tmp_path: Path, remote: Path, make_incident: Callable[..., bytes]) -> None:
    data = {i: make_incident(i) for i in ("inc-1", "inc-2", "inc-3")}
    budget = 2 * max(map(len, data.values()))
    fs, base = StoreConfig(uri=remote.as_uri()).filesystem()
    files = FsFiles(fs, base, data_dir=tmp_path / "data", uri=remote.as_uri(),
                    cache_bytes=budget)
    with LocalStore(tmp_path / "data", files=files) as store:
        for incident_id, blob in data.items():
            store.put(incident_id, blob, tenant="acme")
        held = sorted(p.stem for p in files.cache.root.glob("*/*.arrow"))
        assert held == ["inc-2", "inc-3"] and files.cache.size_bytes <= budget
        assert store.path("inc-1", tenant="acme").read_bytes() == data["inc-1"]   # fetched
        assert sorted(p.stem for p in files.cache.root.glob("*/*.arrow")) == ["inc-1", "inc-3"]
    again = FsFiles(fs, base, data_dir=tmp_path / "data", uri=remote.as_uri(),
                    cache_bytes=len(data["inc-1"]))       # a restart with a smaller budget
    assert [p.stem for p in again.cache.root.glob("*/*.arrow")] == ["inc-1"]


def test_delete_removes_both_objects_and_the_cache(
        open_store: Callable[[str], LocalStore], remote: Path,
        make_incident: Callable[..., bytes]) -> None:
    store = open_store("data")
    store.put("inc-1", make_incident("inc-1"), tenant="acme")
    store.put("inc-2", make_incident("inc-2"), tenant="acme")
    cached = store.path("inc-1", tenant="acme")
    assert store.delete("inc-1", tenant="acme") and not store.delete("inc-1", tenant="acme")
    assert _tree(remote) == ["incidents/t-acme/inc-2.arrow", "incidents/t-acme/inc-2.json"]
    assert not cached.exists() and store.get("inc-1") is None
    with pytest.raises(FileNotFoundError):
        list(store.files.read_chunks("acme", "inc-1", 100))


def test_reindex_from_the_uri_into_a_fresh_index(
        open_store: Callable[[str], LocalStore], remote: Path,
        make_incident: Callable[..., bytes]) -> None:
    first = open_store("a")
    rows = {i: first.put(i, make_incident(i, tenant=t), tenant=t).row
            for i, t in (("inc-1", "acme"), ("inc-2", "Globex Inc"), ("inc-3", ""))}
    (remote / "incidents" / "t-acme" / "orphan.json").write_text("{}")   # receipt, no file
    (remote / "incidents" / "t-acme" / "junk.arrow").write_bytes(b"not arrow")
    crashed = remote / "incidents" / "t-acme" / ".0123.tmp"
    crashed.write_bytes(b"half a PUT")                               # a crash, 2 h ago
    os.utime(crashed, (time.time() - 7200, time.time() - 7200))
    in_flight = remote / "incidents" / "t-acme" / ".0456.tmp"       # another sidecar's write,
    in_flight.write_bytes(b"being written")                          # just now (shared store)
    second = open_store("b")                                    # another data_dir: empty index
    report = second.last_recovery
    assert (report.indexed, report.quarantined, report.tmp_removed) == (3, ["t-acme/junk"], 1)
    assert not crashed.exists() and in_flight.exists()
    for incident_id, row in rows.items():
        again = second.get(incident_id, tenant=row.tenant)
        assert again is not None
        assert (again.sha256, again.received_at, again.path) == \
            (row.sha256, row.received_at, row.path)
    assert (remote / "quarantine" / "t-acme" / "junk.arrow").exists()
    assert not (remote / "incidents" / "t-acme" / "orphan.json").exists()
    first.delete("inc-1", tenant="acme")
    assert second.reindex().removed_rows == 1 and second.get("inc-1", tenant="acme") is None


def test_a_data_dir_of_local_incidents_is_copied_before_switching(
        tmp_path: Path, open_store: Callable[[str], LocalStore], remote: Path,
        make_incident: Callable[..., bytes]) -> None:
    with LocalStore(tmp_path / "data") as local:                # today's layout
        row = local.put("inc-1", make_incident("inc-1"), tenant="acme").row
    with pytest.raises(StoreError, match="holds incidents of the local layout"):
        open_store("data")                                      # would drop the rows
    shutil.copytree(tmp_path / "data" / "incidents", remote / "incidents")   # `aws s3 sync`
    shutil.move(tmp_path / "data" / "incidents", tmp_path / "old-incidents")
    store = open_store("data")
    assert store.last_recovery.removed_rows == 0 and store.last_recovery.kept == 1
    assert store.path("inc-1", tenant="acme").read_bytes() == (remote / row.path).read_bytes()


def test_post_ack_check_quarantines_under_the_uri(
        open_store: Callable[[str], LocalStore], remote: Path,
        make_incident: Callable[..., bytes]) -> None:
    store = open_store("data")
    data = make_incident("inc-1", n_sites=3)
    bad = bytearray(data)
    bad[len(data) - 100] ^= 0x40            # rows ≠ the manifest's digest, structure valid
    inc = store.incoming("inc-1", sha256=False)
    inc.write(bytes(bad))
    inc.finish()
    digest = Incident.from_bytes(data).manifest["integrity"]["sha256"]
    res = store.put_incoming(inc, tenant="acme", crc32c=crc32c(bytes(bad)),
                             content_sha256=digest)
    assert res.created and res.row.integrity == "pending"
    assert store.verifier.wait_idle(30) and store.get("inc-1") is None
    assert _tree(remote) == ["quarantine/t-acme/inc-1.arrow", "quarantine/t-acme/inc-1.reason.json"]
    reason = json.loads((remote / "quarantine/t-acme/inc-1.reason.json").read_text())
    assert reason["reason"] == "content_digest_mismatch"
    good = store.put("inc-2", make_incident("inc-2"), tenant="acme").row   # and a good one
    assert hashlib.sha256((remote / good.path).read_bytes()).hexdigest() == good.sha256


def test_store_section_defaults_and_errors_name_the_key() -> None:
    assert SidecarConfig.from_dict({}).store == StoreConfig() and StoreConfig().is_local
    cfg = SidecarConfig.from_dict({"store": {"uri": "s3://b/p", "s3": {
        "endpoint_override": "127.0.0.1:9000", "scheme": "http"}}}).store
    assert (cfg.uri, cfg.s3.endpoint_override, cfg.s3.scheme, cfg.s3.region) == \
        ("s3://b/p", "127.0.0.1:9000", "http", "")
    for raw, key in (({"url": "x"}, "store.url"), ({"uri": "ftp://h/p"}, "store.uri"),
                     ({"uri": "s3:///p"}, "store.uri"), ({"uri": "relative/p"}, "store.uri"),
                     ({"s3": {"scheme": "ftp"}}, "store.s3.scheme"),
                     ({"s3": {"secret_key": "x"}}, "store.s3.secret_key"),
                     ({"s3": {"region": 3}}, "store.s3.region"),
                     ({"s3": {"bucket": "b"}}, "store.s3.bucket"),
                     ({"uri": "s3://b/p?access_key=x"}, "store.uri")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            parse_store(raw)


def test_same_key_uploads_are_one_at_a_time_other_keys_in_parallel(
        open_store: Callable[[str], LocalStore], remote: Path,
        make_incident: Callable[..., bytes]) -> None:
    store = open_store("data")
    publish = store.files.publish

    def slow_publish(*args: object, **kwargs: object) -> None:   # a slow object store PUT
        time.sleep(0.3)
        publish(*args, **kwargs)  # type: ignore[arg-type]

    store.files.publish = slow_publish  # type: ignore[method-assign]
    rivals = [make_incident("inc-1", seed=s) for s in range(4)]   # same key, different bytes
    barrier = threading.Barrier(4)

    def put_rival(blob: bytes) -> str:
        barrier.wait()
        try:
            return "created" if store.put("inc-1", blob, tenant="acme").created else "same"
        except AlreadyExistsError:
            return "refused"

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(put_rival, rivals))
        assert sorted(outcomes) == ["created", "refused", "refused", "refused"]
        winner = rivals[outcomes.index("created")]
        assert (remote / "incidents/t-acme/inc-1.arrow").read_bytes() == winner
        others = [make_incident(f"inc-{n}") for n in range(2, 6)]
        t0 = time.monotonic()
        list(pool.map(lambda b: store.put(Incident.from_bytes(b).id, b, tenant="acme"), others))
        assert time.monotonic() - t0 < 4 * 0.3      # four slow PUTs overlapped
