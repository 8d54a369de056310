"""Chaos probe: tenant isolation — nothing of tenant globex reaches tenant acme.

Tenant globex stores an incident (and runs an analysis on it); tenant acme then names globex's
incident id, analysis id and model fingerprint in every RPC, job option and upload header. The
oracle for each: acme's answer for globex's thing must be *the same* as its answer for a thing
that never existed (status, counted reason and message, with the name substituted), so no RPC,
option or error message can tell acme that globex's incident exists, how large it is or what it
holds. Positive controls (acme's own incident listed and watched) make each probe able to fail.
Incident ids are expected to be per tenant (DESIGN §10): acme uploading an id globex already
uses must succeed and leave globex's incident untouched.

Example::

    rows = probe_tenants(lab, sc)
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

from chaos_lab import Answer, Lab, Row, SidecarProc, answer_of, make_incident, try_upload

GX, NX = "gx-secret-1", "nx-never-1"           # globex's incident; one that never existed
FG, FN = "6e" * 32, "9f" * 32                  # globex's model fingerprint; nobody's


def _answer(call: Callable[[], Any]) -> tuple[Answer, str]:
    """(answer, the response text) of one call (a stream is read to its end)."""
    import grpc

    try:
        out = call()
        if hasattr(out, "__next__"):
            out = list(out)
    except grpc.RpcError as e:
        return answer_of(e), ""
    return Answer("OK"), str(out)


def _same(a: tuple[Answer, str], b: tuple[Answer, str], subs: tuple[tuple[str, str], ...]
          ) -> bool:
    """Whether two answers are identical once the names in ``subs`` (theirs, nobody's) match."""
    def norm(x: tuple[Answer, str], i: int) -> tuple[str, str, str, str]:
        text = (x[0].details, x[1])
        for pair in subs:
            text = (text[0].replace(pair[i], "<NAME>"), text[1].replace(pair[i], "<NAME>"))
        return x[0].code, x[0].reason, *text
    return norm(a, 0) == norm(b, 1)


def _job_outcome(c: Any, incident_id: str, kind: str, params: dict[str, Any]
                 ) -> tuple[Answer, str]:
    """RunAnalysis, then (if accepted) wait for the job: its state, error and result."""
    sub = _answer(lambda: c.run_analysis(incident_id, kind, params_json=json.dumps(params)))
    if sub[0].code != "OK":
        return sub
    analysis_id = sub[1].split('analysis_id: "')[1].split('"')[0]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = c.get_analysis(analysis_id)
        if job.state >= 3:   # DONE or FAILED
            return Answer("OK"), f"state={job.state} error={job.error} result={job.result_json}"
        time.sleep(0.1)
    return Answer("TIMEOUT"), analysis_id


def _rpc_pairs(c: Any, gx_analysis: str) -> dict[str, tuple[Any, Any, tuple[tuple[str, str],
                                                                           ...]]]:
    """Probe name -> (globex's answer, nobody's answer, substitutions)."""
    ids = ((GX, NX),)
    mine = make_incident("ac-x", tenant="acme", floats=64, seed=26)
    fake = gx_analysis[:4] + "0" * (len(gx_analysis) - 4)

    def by_id(fn: Callable[[str], Any]) -> tuple[Any, Any, Any]:
        return _answer(lambda: fn(GX)), _answer(lambda: fn(NX)), ids

    return {
        "GetIncident": by_id(lambda i: c.get(i, full=True)),
        "DownloadIncident": by_id(c.download),
        "DeleteIncident": by_id(c.delete),
        "RunAnalysis": by_id(lambda i: c.run_analysis(i, "stats")),
        "ListAnalyses": by_id(c.list_analyses),
        "GetAnalysis": (_answer(lambda: c.get_analysis(gx_analysis)),
                        _answer(lambda: c.get_analysis(fake)), ((gx_analysis, fake),)),
        "ListIncidents id filter": by_id(lambda i: c.list(filter=f'id = "{i}"')),
        "ListIncidents fingerprint filter": (
            _answer(lambda: c.list(filter=f'model_fingerprint = "{FG}"')),
            _answer(lambda: c.list(filter=f'model_fingerprint = "{FN}"')), ((FG, FN),)),
        "ListIncidents tenant filter": (
            _answer(lambda: c.list(filter='tenant = "globex"')),
            _answer(lambda: c.list(filter='tenant = "nobody"')), (("globex", "nobody"),)),
        "job baseline incident_ids": (
            _job_outcome(c, "ac-own-1", "baseline", {"incident_ids": [GX]}),
            _job_outcome(c, "ac-own-1", "baseline", {"incident_ids": [NX]}), ids),
        "job baseline fingerprint": (
            _job_outcome(c, "ac-own-1", "baseline", {"fingerprint": FG}),
            _job_outcome(c, "ac-own-1", "baseline", {"fingerprint": FN}), ((FG, FN),)),
        "job cca benign_paths (host path)": (
            _answer(lambda: c.run_analysis("ac-own-1", "cca", params_json=json.dumps(
                {"benign_paths": ["/etc/passwd"]}))),
            _answer(lambda: c.run_analysis("ac-own-1", "cca", params_json=json.dumps(
                {"benign_paths": ["/nonexistent/x"]}))), (("/etc/passwd", "/nonexistent/x"),)),
        "Upload header.tenant=globex": (
            (try_upload(c, mine, tenant="globex"), ""),
            (try_upload(c, mine, tenant="nobody"), ""), (("globex", "nobody"),)),
    }


def _watch(lab: Lab, sc: SidecarProc) -> tuple[list[str], bool]:
    """acme watches for 4 s while globex and acme each store one incident: what acme saw."""
    seen: list[str] = []
    with lab.client(sc, "acme") as c:
        def watch() -> None:
            import grpc

            try:
                seen.extend(i.id for i in c.watch(timeout_s=4))
            except grpc.RpcError:
                pass   # DEADLINE_EXCEEDED ends the watch
        t = threading.Thread(target=watch, daemon=True)
        t.start()
        time.sleep(1.0)
        with lab.client(sc, "globex") as g:
            g.upload("gx-secret-2", make_incident("gx-secret-2", tenant="globex", floats=64,
                                                  seed=22, fingerprint=FG).to_bytes())
        c.upload("ac-watch-1", make_incident("ac-watch-1", tenant="acme", floats=64,
                                             seed=23).to_bytes())
        t.join(timeout=10)
    return seen, "ac-watch-1" in seen


def _setup(lab: Lab, sc: SidecarProc) -> tuple[str, Any]:
    """globex's incidents (two sampled benign ones of its own model: enough for a baseline) and
    an analysis; acme's own incident."""
    gx = make_incident(GX, tenant="globex", floats=4096, seed=21, rule="ratio", fingerprint=FG)
    with lab.client(sc, "globex") as g:
        g.upload(GX, gx.to_bytes())
        g.upload("gx-secret-3", make_incident("gx-secret-3", tenant="globex", floats=4096,
                                              seed=27, rule="ratio", fingerprint=FG).to_bytes())
        analysis = g.run_analysis(GX, "stats").analysis_id
    with lab.client(sc, "acme") as c:
        c.upload("ac-own-1", make_incident("ac-own-1", tenant="acme", floats=64,
                                           seed=24).to_bytes())
    return analysis, gx


def probe_tenants(lab: Lab, sc: SidecarProc) -> list[Row]:
    """Every isolation probe (module doc); one row per probe."""
    analysis, gx = _setup(lab, sc)
    rows = []
    with lab.client(sc, "acme") as c:
        for name, (theirs, nobodys, subs) in _rpc_pairs(c, analysis).items():
            rows.append(Row("tenant", f"acme: {name} naming globex's", "the same answer as for "
                            "a name that never existed", f"{theirs[0]} vs {nobodys[0]}"
                            + ("" if _same(theirs, nobodys, subs) else
                               f"; differs: {theirs[0].details or theirs[1][:120]!r} vs "
                               f"{nobodys[0].details or nobodys[1][:120]!r}"),
                            _same(theirs, nobodys, subs)))
        listed = [i.id for i in c.list_all()]
    seen, control = _watch(lab, sc)
    leaked = [i for i in listed + seen if i.startswith("gx-")]
    rows.append(Row("tenant", "acme: ListIncidents + WatchIncidents while globex stores",
                    "only acme's incidents (its own watched incident arrives)",
                    f"globex ids seen {leaked}; own incident watched {control}",
                    not leaked and control and "ac-own-1" in listed))
    rows.append(_squat(lab, sc, gx))
    return rows


def _squat(lab: Lab, sc: SidecarProc, gx: Any) -> Row:
    """acme uploads an incident under globex's id: per-tenant ids make that an ordinary upload."""
    mine = make_incident(GX, tenant="acme", floats=64, seed=25)
    with lab.client(sc, "acme") as c:
        answer = try_upload(c, mine)
    with lab.client(sc, "globex") as g:
        theirs_intact = g.download(GX) == gx.to_bytes()
    return Row("tenant", "acme uploads an incident under an id globex already uses",
               "OK (ids are per tenant, DESIGN §10); globex's incident untouched",
               f"{answer}{' ' + repr(answer.details[:100]) if answer.details else ''}; "
               f"globex's intact {theirs_intact}",
               answer.code == "OK" and theirs_intact)
