"""Incident ids are unique per tenant (issue 14 item 8, DESIGN §10), attacked over real gRPC.

Before, ids were global: a tenant uploading an id another tenant held got ``ALREADY_EXISTS``
(an existence oracle) and could squat ids before their owner used them. Each test below is one
of those attacks, against an in-process sidecar with token auth (127.0.0.1, port 0).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from sidecar._client import SidecarClient
from sidecar._server import Sidecar
from sidecar.api import v1
from tests.integration.conftest import build_incident

TOKENS = {"acme": "acme-token-123", "globex": "globex-token-456", "admin": "admin-token-789"}
Serve = Callable[..., tuple[Sidecar, str]]
#: Each tenant's incident ``inc-x``: the same id, different content (1 vs 3 sites).
ACME_X = build_incident("inc-x", n_sites=1)
GLOBEX_X = build_incident("inc-x", n_sites=3, seed=1)


def _serve(serve: Serve) -> tuple[Sidecar, str]:
    return serve(auth={"tokens": [{"tenant": t, "token": TOKENS[t]} for t in ("acme", "globex")],
                       "admin_tokens": [TOKENS["admin"]]},
                 jobs={"on_ingest": ["stats"]}, modules={"cf": {"enabled": False}})


@contextlib.contextmanager
def _clients(addr: str) -> Iterator[dict[str, SidecarClient]]:
    """acme, globex, admin, and the admin acting on one tenant (``admin@acme``)."""
    cs = {"acme": SidecarClient(addr, token=TOKENS["acme"]),
          "globex": SidecarClient(addr, token=TOKENS["globex"]),
          "admin": SidecarClient(addr, token=TOKENS["admin"]),
          "admin@acme": SidecarClient(addr, token=TOKENS["admin"], tenant="acme"),
          "admin@globex": SidecarClient(addr, token=TOKENS["admin"], tenant="globex")}
    try:
        yield cs
    finally:
        for c in cs.values():
            c.close()


def _error(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _probes(c: SidecarClient, iid: str) -> list[tuple[grpc.StatusCode, str]]:
    """Every incident RPC of ``c`` on ``iid``, as (code, message with the id masked)."""
    calls = (lambda: c.get(iid), lambda: c.download(iid), lambda: c.delete(iid),
             lambda: c.run_analysis(iid, "stats"), lambda: c.list_analyses(iid))
    return [(code, msg.replace(iid, "<id>")) for code, msg in map(_error, calls)]


def test_an_id_another_tenant_holds_can_neither_be_probed_nor_squatted(serve: Serve) -> None:
    sc, addr = _serve(serve)
    with _clients(addr) as c:
        assert c["acme"].upload("inc-x", ACME_X).created
        # the oracle: every RPC answers an id acme holds exactly like an id nobody holds
        held, absent = _probes(c["globex"], "inc-x"), _probes(c["globex"], "inc-nobody")
        assert held == absent and {code for code, _ in held} == {grpc.StatusCode.NOT_FOUND}
        # squatting: globex takes inc-x for itself; acme's incident is untouched
        r = c["globex"].upload("inc-x", GLOBEX_X)             # was ALREADY_EXISTS
        assert r.created and r.size == len(GLOBEX_X)
        assert c["globex"].upload("inc-nobody", build_incident("inc-nobody")).created
        assert not c["globex"].upload("inc-x", GLOBEX_X).created   # idempotent per tenant
        other = build_incident("inc-x", seed=9)
        code, msg = _error(lambda: c["globex"].upload("inc-x", other))
        assert code == grpc.StatusCode.ALREADY_EXISTS          # its own inc-x, other bytes
        assert _sha(ACME_X)[:12] not in msg and "acme" not in msg
        # the owner squats nothing either: acme may take an id globex uses first
        assert c["acme"].upload("inc-nobody", build_incident("inc-nobody", seed=5)).created
        assert c["acme"].download("inc-x") == ACME_X and c["globex"].download("inc-x") == GLOBEX_X
    assert sc.store.index.count_incidents("TRUE", []) == 4


def test_each_tenant_reads_analyses_and_deletes_only_its_own_incident_of_an_id(
        serve: Serve) -> None:
    sc, addr = _serve(serve)
    with _clients(addr) as c:
        acme, globex = c["acme"], c["globex"]
        acme.upload("inc-x", ACME_X)
        globex.upload("inc-x", GLOBEX_X)
        assert (acme.get("inc-x").tenant, acme.get("inc-x").n_sites) == ("acme", 1)
        assert (globex.get("inc-x").tenant, globex.get("inc-x").n_sites) == ("globex", 3)
        assert [(i.id, i.tenant) for i in globex.list().incidents] == [("inc-x", "globex")]
        # each tenant's upload got its own on-ingest job (the same request id in both tenants)
        for c_, n in ((acme, 1), (globex, 3)):
            (job,) = c_.list_analyses("inc-x")
            done = sc.jobs.wait(job.analysis_id, timeout_s=30)
            assert done.state == "done" and done.result is not None
            assert done.result["n_tensors"] == n
        ran = sc.jobs.wait(globex.run_analysis("inc-x", "stats").analysis_id, timeout_s=30)
        assert ran.tenant == "globex" and ran.result is not None and ran.result["n_tensors"] == 3
        assert _error(lambda: acme.get_analysis(ran.id))[0] == grpc.StatusCode.NOT_FOUND
        assert len(acme.list_analyses("inc-x")) == 1 and len(globex.list_analyses("inc-x")) == 2
        globex.delete("inc-x")
        assert _error(lambda: globex.get("inc-x"))[0] == grpc.StatusCode.NOT_FOUND
        assert acme.download("inc-x") == ACME_X and len(acme.list_analyses("inc-x")) == 1
        assert sc.store.index.read("SELECT DISTINCT tenant FROM jobs") == [("acme",)]


def test_a_watch_streams_only_the_watchers_incident_of_a_shared_id(serve: Serve) -> None:
    sc, addr = _serve(serve)
    with _clients(addr) as c:
        stream = c["acme"].stub.WatchIncidents(v1.WatchIncidentsRequest(), timeout=20,
                                               metadata=c["acme"].metadata)
        deadline = time.monotonic() + 10
        while not sc.store._subs and time.monotonic() < deadline:   # subscribed
            time.sleep(0.01)
        c["acme"].upload("inc-x", ACME_X)
        c["globex"].upload("inc-x", GLOBEX_X)     # acme's inc-x exists: must still not leak
        c["acme"].upload("inc-end", build_incident("inc-end"))
        seen = []
        for msg in stream:
            seen.append((msg.incident.id, msg.incident.tenant, msg.incident.n_sites))
            if msg.incident.id == "inc-end":
                break
        stream.cancel()
    assert [s[:2] for s in seen] == [("inc-x", "acme"), ("inc-end", "acme")]
    assert seen[0][2] == 1                       # acme's incident (globex's has 3 sites)


def test_an_admin_must_name_the_tenant_of_an_id_several_tenants_hold(serve: Serve) -> None:
    sc, addr = _serve(serve)
    with _clients(addr) as c:
        c["acme"].upload("inc-x", ACME_X)
        c["globex"].upload("inc-x", GLOBEX_X)
        c["acme"].upload("inc-a", build_incident("inc-a"))
        for code, msg in _probes(c["admin"], "inc-x"):       # never a guess, nothing deleted
            assert code == grpc.StatusCode.FAILED_PRECONDITION
            assert "2 tenants" in msg and "x-forensics-tenant" in msg
        assert sc.stats()["rejected"]["ambiguous_id"] == 5
        assert c["admin"].get("inc-a").tenant == "acme"      # one holder: no need to name it
        assert c["admin@globex"].download("inc-x") == GLOBEX_X
        assert c["admin@acme"].get("inc-x").n_sites == 1
        assert sorted(i.tenant for i in c["admin"].list(filter='id = "inc-x"').incidents) == \
            ["acme", "globex"]
        assert [i.tenant for i in c["admin@acme"].list(filter='id = "inc-x"').incidents] == \
            ["acme"]
        c["admin@globex"].delete("inc-x")
        assert c["admin"].get("inc-x").tenant == "acme"      # unambiguous again
        # an admin upload for a named tenant is that tenant's (whatever the manifest says)
        assert c["admin@globex"].upload("inc-y", build_incident("inc-y", tenant="acme")).created
        assert c["globex"].get("inc-y").tenant == "globex"
        assert _error(lambda: c["acme"].get("inc-y"))[0] == grpc.StatusCode.NOT_FOUND


def test_a_tenant_token_cannot_name_another_tenant(serve: Serve) -> None:
    sc, addr = _serve(serve)
    with SidecarClient(addr, token=TOKENS["acme"], tenant="globex") as sneaky, \
            SidecarClient(addr, token=TOKENS["acme"], tenant="acme") as own:
        own.upload("inc-x", ACME_X)
        for call in (lambda: sneaky.list(), lambda: sneaky.get("inc-x"),
                     lambda: sneaky.upload("inc-z", build_incident("inc-z"))):
            code, msg = _error(call)
            assert code == grpc.StatusCode.PERMISSION_DENIED and "globex" not in msg
        assert [i.id for i in own.list().incidents] == ["inc-x"]
    assert sc.stats()["rejected"]["permission_denied"] == 3


def _both_hold_inc_x(serve: Serve) -> tuple[str, argparse.ArgumentParser]:
    """A sidecar where acme and globex each hold an ``inc-x``; the ``forensics`` CLI parser."""
    from sidecar.cli import register

    _, addr = _serve(serve)
    with _clients(addr) as c:
        c["acme"].upload("inc-x", ACME_X)
        c["globex"].upload("inc-x", GLOBEX_X)
    parser = argparse.ArgumentParser(prog="forensics")
    register(parser.add_subparsers(dest="command"))
    return addr, parser


def test_the_cli_names_the_tenant_with_an_admin_token(serve: Serve,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    addr, parser = _both_hold_inc_x(serve)
    common = ["--address", addr, "--token", TOKENS["admin"]]
    for argv, status in ((["incidents", "show", "inc-x", *common, "--json"], 1),
                         (["incidents", "show", "inc-x", *common, "--json", "--tenant", "globex"],
                          0)):
        capsys.readouterr()
        args = parser.parse_args(argv)
        assert int(args.func(args)) == status
    out = capsys.readouterr()
    assert json.loads(out.out)["tenant"] == "globex"


def test_an_admins_reports_of_two_tenants_same_id_do_not_overwrite(
        serve: Serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """``forensics report inc-x --tenant T`` (no ``-o``) names the file after the tenant's store
    directory, so the second tenant's report is a second file, each of its own incident."""
    addr, parser = _both_hold_inc_x(serve)
    monkeypatch.chdir(tmp_path)
    for tenant in ("acme", "globex"):
        args = parser.parse_args(["report", "inc-x", "--address", addr, "--token",
                                  TOKENS["admin"], "--tenant", tenant])
        assert int(args.func(args)) == 0
    capsys.readouterr()
    files = sorted(p.name for p in tmp_path.glob("*.html"))
    assert files == ["t-acme.inc-x.html", "t-globex.inc-x.html"]
    texts = {n: (tmp_path / n).read_text(encoding="utf-8") for n in files}
    assert texts["t-acme.inc-x.html"] != texts["t-globex.inc-x.html"]
    for tenant, other in (("acme", "globex"), ("globex", "acme")):
        text = texts[f"t-{tenant}.inc-x.html"]
        assert f"tenant {tenant}" in text and f"tenant {other}" not in text
