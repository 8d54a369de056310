"""The built-in report sections (see :func:`sidecar.report.default_sections`): each is a function
of :class:`~sidecar.report.ReportData` returning HTML, or None when it has nothing to show.

Example::

    html = fix_set(data)        # the verified fix set with its statistics, or a note why none
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ._data import ReportData
from ._html import esc, fmt, heatmap_svg, kv_table, note, table

__all__ = ["SIDE_EFFECT_BUDGET_KL", "before_after", "content", "fix_set", "interactions",
           "layer_position_heatmap", "links", "manifest", "over_budget", "root_causes",
           "site_step_heatmap", "summary"]


def _card(key: str, value: str, *, card_id: str) -> str:
    return f'<div class="card" id="{esc(card_id)}"><div class="k">{esc(key)}</div>' \
           f'<div class="v">{value}</div></div>'


#: The side-effect budget a deployable fix keeps: mean KL on benign inputs, nats (DESIGN §14; the
#: default ``budget_kl`` of an investigation; refusal-direction ablation keeps 0.1).
SIDE_EFFECT_BUDGET_KL = 0.1


def over_budget(fix: Mapping[str, Any]) -> float | None:
    """How many times the side-effect budget a fix's measured mean benign KL is, when over it
    (else None: within budget, or not measured).

    Example::

        over_budget({"side_effects": {"mean_kl": 6.5}})   # 65.0
    """
    kl = (fix.get("side_effects") or {}).get("mean_kl")
    if isinstance(kl, int | float) and not isinstance(kl, bool) and kl > SIDE_EFFECT_BUDGET_KL:
        return float(kl) / SIDE_EFFECT_BUDGET_KL
    return None


def _badge(text: str, kind: str) -> str:
    return f'<span class="badge {kind}">{esc(text)}</span>'


def _fix_card(cca: Mapping[str, Any]) -> str:
    fix = cca.get("fix_set") or {}
    if not cca:
        return "not searched"
    if cca.get("status") != "found":
        return "none found"
    sites = ", ".join(esc(iv.get("site")) for iv in fix.get("interventions") or [])
    ratio = over_budget(fix)
    cost = f"; {ratio:.0f}× the side-effect budget: not deployable" if ratio else ""
    return f"{sites} <small>(flip rate {fmt(fix.get('flip_rate'), '.2f')}{cost})</small>"


def summary(data: ReportData) -> str:
    """Verdicts and the numbers an on-call engineer reads first."""
    cf, cca = data.result("cf") or {}, data.result("cca") or {}
    trig = data.manifest.get("trigger") or {}
    badges = [_badge(f"flagged: {trig.get('reason')}", "bad")] if trig.get("rule") == "flag" \
        else [_badge(f"captured: {trig.get('rule')}", "neutral")]
    if cf.get("status") == "scored":
        flagged = bool(cf.get("flagged"))
        badges.append(_badge(f"CF score {'at or above' if flagged else 'below'} the flag "
                             f"threshold ({cf.get('threshold')})", "bad" if flagged else "ok"))
    if cca:
        found = cca.get("status") == "found"
        costly = found and over_budget(cca.get("fix_set") or {}) is not None
        badges.append(_badge("fix set verified, over the side-effect budget" if costly else
                             "fix set verified" if found else "no fix set",
                             "neutral" if costly or not found else "ok"))
    inv = data.result("investigate")
    if inv is not None:
        badges.append(_badge("investigation: deployable fix verified" if inv.get("fix_found")
                             else "investigation: no deployable fix", "ok"
                             if inv.get("fix_found") else "neutral"))
    cands = cf.get("root_cause_candidates") or []
    base = cf.get("baseline") or {}
    cards = [
        _card("anomaly score", fmt(cf.get("anomaly_score"), ".2f"), card_id="card-score"),
        _card("p vs baseline", fmt(cf.get("anomaly_p"), ".3g") +
              (f" <small>(n={esc(base.get('sample_count'))})</small>" if base else ""),
              card_id="card-p"),
        _card("first root-cause candidate", esc(cands[0] if cands else None),
              card_id="card-root-cause"),
        _card("fix set", _fix_card(cca), card_id="card-fix"),
        _card("trace id", esc(data.trace_id), card_id="card-trace"),
    ]
    if data.facts.get("failure_p") is not None:
        cards.insert(2, _card("failure p (probe)", fmt(data.facts["failure_p"], ".3f"),
                              card_id="card-failure-p"))
    missing = [] if cf else [note("no finished CF analysis for this incident yet")]
    return f'<p>{"".join(badges)}</p><div class="cards">{"".join(cards)}</div>' + "".join(missing)


def _tenant(stored: object, claimed: object) -> str:
    """The tenant the sidecar stored the incident under (from the uploader's credentials: the
    authoritative one), and what the manifest's request claims when it says something else."""
    if stored in (None, "") or claimed in (None, "", stored):
        return esc(stored or claimed)
    return f"{esc(stored)} <small>(the manifest's request says {esc(claimed)})</small>"


def _short(value: Any, n: int = 23) -> str:
    text = str(value) if value is not None else None
    return esc(text if text is None or len(text) <= n else text[:n] + "…")


def manifest(data: ReportData) -> str:
    """The manifest: model, trigger, request, runtime, generation, capture."""
    m, f = data.manifest, data.facts
    model, trig = m.get("model") or {}, m.get("trigger") or {}
    req, rt = m.get("request") or {}, m.get("runtime") or {}
    captured_by = trig.get("captured_by") or {}
    pairs = [
        ("incident id", esc(data.incident_id)), ("created", esc(m.get("created_at"))),
        ("model", f"{esc(model.get('name'))} <small>rev {_short(model.get('revision'))}</small>"),
        ("weights fingerprint", _short(model.get("fingerprint"), 40)),
        ("trigger", f"{esc(trig.get('rule'))}: {esc(trig.get('reason'))} at step "
                    f"{esc(trig.get('step'))}"),
        ("captured by", f"{esc(captured_by.get('rule'))}"),
        ("request", f"{esc(req.get('id'))} · tenant {_tenant(f.get('tenant'), req.get('tenant'))}"),
        ("traceparent", esc(req.get("traceparent"))),
        ("activations", f"{esc(m.get('activations'))} · {esc(len(m.get('sites') or []))} sites"
                        f" · {esc(m.get('steps'))} forward steps"),
        ("runtime", esc(", ".join(f"{k} {rt.get(k)}" for k in
                                  ("python", "torch", "transformers", "device", "dtype")
                                  if rt.get(k) is not None))),
        ("generation", esc(m.get("generation"))),
        ("content captured", esc(m.get("content_captured"))),
        ("stored", f"{fmt(f.get('size_bytes'), ',')} bytes" +
                   (f" · sha256 {_short(f.get('sha256'), 16)}" if f.get("sha256") else "")),
    ]
    return kv_table(pairs, table_id="manifest-table")


def content(data: ReportData) -> str:
    """The request's input and output text, when content capture kept them."""
    m = data.manifest
    text = m.get("content") or {}
    if not m.get("content_captured"):
        return note("content was not captured (Recorder(capture_content=False), the default): "
                    "the incident holds token ids and activations, not text")
    return (f'<div class="cols"><div><h3>input</h3><pre id="input-text">'
            f'{esc(text.get("input_text"))}</pre></div><div><h3>output</h3>'
            f'<pre id="output-text">{esc(text.get("output_text"))}</pre></div></div>')


def _units(data: ReportData) -> tuple[dict[str, list[list[float]]], list[str]] | None:
    cf = data.result("cf") or {}
    units = (cf.get("units") or {}).get("sites")
    if cf.get("status") != "scored" or not units:
        return None
    order = (cf.get("report") or {}).get("execution_order") or sorted(units)
    return units, [s for s in order if s in units]


def site_step_heatmap(data: ReportData) -> str | None:
    """Max |z| over positions per (site, forward step): where in the computation it happened."""
    found = _units(data)
    if found is None:
        cf = data.result("cf") or {}
        return note((cf.get("units") or {}).get("note") or
                    "no scored CF analysis with unit scores for this incident")
    units, sites = found
    steps = sorted({int(u[0]) for s in sites for u in units[s]})
    grid = []
    for site in sites:
        best: dict[int, float] = {}
        for step, _, z in units[site]:
            best[int(step)] = max(best.get(int(step), 0.0), abs(z))
        grid.append([best.get(st) for st in steps])
    cols = [("prefill" if st == 0 else str(st)) for st in steps]
    thr = (data.result("cf") or {}).get("threshold")
    return heatmap_svg(grid, rows=sites, cols=cols, svg_id="svg-site-step", threshold=thr,
                       caption="max |z| of a site's units (token positions) per forward step "
                               "(0 = prefill, then one column per generated token), sites in "
                               "forward order; hover a cell for its value")


_LAYER = re.compile(r"^blocks\.(\d+)\.(.+)$")


def layer_position_heatmap(data: ReportData) -> str | None:
    """|z| per (layer, absolute position) for the most recorded per-layer site kind."""
    found = _units(data)
    if found is None:
        return None
    units, sites = found
    by_kind: dict[str, dict[int, str]] = {}
    for s in sites:
        m = _LAYER.match(s)
        if m:
            by_kind.setdefault(m.group(2), {})[int(m.group(1))] = s
    if not by_kind:
        return None
    kind, layers = max(by_kind.items(), key=lambda kv: len(kv[1]))
    positions = sorted({int(u[1]) for s in layers.values() for u in units[s]})
    grid = []
    for layer in sorted(layers):
        at = {int(p): abs(z) for _, p, z in units[layers[layer]]}
        grid.append([at.get(p) for p in positions])
    return heatmap_svg(grid, rows=[f"blocks.{i}.{kind}" for i in sorted(layers)],
                       cols=[str(p) for p in positions], svg_id="svg-layer-position",
                       threshold=(data.result("cf") or {}).get("threshold"),
                       caption=f"|z| of blocks.*.{kind} per layer and token position (prompt "
                               "positions, then one per generated token)")


def root_causes(data: ReportData) -> str | None:
    """Flagged sites in forward order (where to look first), then the most anomalous sites."""
    cf = data.result("cf") or {}
    if cf.get("status") != "scored":
        return note(f"CF: {cf.get('status') or 'not run'} — {cf.get('message', '')}".rstrip(
            " —"), kind="warn") if cf else None
    rep = cf.get("report") or {}
    sites = rep.get("sites") or {}

    def row(i: int, site: str) -> list[str]:
        s = sites.get(site) or {}
        w = s.get("worst") or {}
        return [str(i), esc(site), fmt(s.get("score"), ".2f"), fmt(s.get("p")), fmt(s.get("q")),
                "yes" if s.get("flagged") else "", f"{esc(w.get('step'))}:{esc(w.get('position'))}"]

    head = ["#", "site", "score", "p", "q", "flagged", "worst step:position"]
    cands = cf.get("root_cause_candidates") or []
    out = [f"<p>{esc(cf.get('detector'))} detector, baseline v"
           f"{esc((cf.get('baseline') or {}).get('version'))} of "
           f"{esc((cf.get('baseline') or {}).get('sample_count'))} benign incidents; activations "
           f"{esc(cf.get('activations', 'captured'))}. An anomaly written into the residual "
           "stream shows in every later site, so the earliest flagged site is where to look "
           "first.</p>"]
    out.append(table(head, [row(i, s) for i, s in enumerate(cands, 1)], table_id="root-cause-table")
               if cands else note("no site reached the flag threshold"))
    ranked = [s for s, _ in (rep.get("ranked_sites") or [])[:10]]
    out.append("<h3>most anomalous sites</h3>" + table(head, [row(i, s) for i, s in
                                                             enumerate(ranked, 1)]))
    out += [note(n) for n in rep.get("notes") or []]
    return "".join(out)


def _stats(fix: Mapping[str, Any], cca: Mapping[str, Any]) -> str:
    ci = fix.get("flip_rate_ci") or [None, None]
    se = fix.get("side_effects") or {}
    perm = fix.get("permutation") or {}
    fid = cca.get("fidelity") or {}
    return kv_table([
        ("failure", esc(fix.get("failure"))),
        ("metric before → after", f"{fmt(fix.get('metric_before'))} → "
                                  f"{fmt(fix.get('metric_after'))} (≤ 0 = fixed)"),
        ("flip rate", f"{fmt(fix.get('flip_rate'), '.2f')} (Wilson 95 % [{fmt(ci[0], '.2f')}, "
                      f"{fmt(ci[1], '.2f')}]) over {esc(len(fix.get('variants') or []))} "
                      "failing variants"),
        ("side effects", f"mean KL {fmt(se.get('mean_kl'), '.4f')} nats, top-1 agreement "
                         f"{fmt(se.get('top1_agreement'), '.3f')} on "
                         f"{esc(se.get('n_incidents'))} benign incidents"),
        ("p-value", f"{fmt(fix.get('p_value'))} vs {esc(perm.get('n_permutations'))} random "
                    "sets of the same size"),
        ("replays", f"{esc(fix.get('forward_passes'))} for the search vs "
                    f"{esc(fix.get('exhaustive_forward_passes'))} for exhaustive "
                    f"single-candidate patching (+{esc(fix.get('statistics_forward_passes'))} "
                    "for the statistics)"),
        ("replay fidelity", f"exact {esc(fid.get('exact'))}, max |diff| "
                            f"{fmt(fid.get('max_abs_diff'))}"),
        ("search", f"{esc(fix.get('strategy'))}, intervention {esc(fix.get('intervention_kind'))}"
                   f", {esc(fix.get('n_candidates'))} candidates, CF-guided "
                   f"{esc(cca.get('cf_guided'))}"),
    ], table_id="fix-stats")


def interactions(fix: Mapping[str, Any]) -> str:
    """IS-C of a fix set (``fix["interactions"]``): one row per pair of components, or ""."""
    isc = fix.get("interactions")
    if not isc:
        return ""

    def row(p: Mapping[str, Any]) -> list[str]:
        ci = p.get("ci") or [None, None]
        return [esc(p.get("a")), esc(p.get("b")), fmt(p.get("index"), "+.2f"),
                f"[{fmt(ci[0], '+.2f')}, {fmt(ci[1], '+.2f')}]", f"<b>{esc(p.get('label'))}</b>",
                fmt(p.get("needs_both"), ".0%")]

    intro = (f"<h3>interactions between components (IS-C)</h3><p>Pairwise Shapley–Taylor "
             f"index of the failure metric, {esc(isc.get('method'))} over "
             f"{esc(isc.get('coalitions'))} replayed coalitions on each of "
             f"{esc(isc.get('n_inputs'))} failing input(s), normalised by the fix's total "
             f"effect: −1 redundant (either component alone keeps the failure, both together "
             f"remove it), +1 synergistic (the failure needs both), 0 independent; "
             f"{fmt(isc.get('confidence'), '.0%')} bootstrap interval, called when it clears "
             f"±{fmt(isc.get('threshold'), 'g')}. {esc(isc.get('forward_passes'))} replays.</p>")
    return intro + table(["component", "component", "index", "interval", "call",
                          "needs both (inputs)"],
                         [row(p) for p in isc.get("pairs") or []],
                         table_id="interactions-table") + \
        "".join(note(n) for n in isc.get("notes") or [])


def fix_set(data: ReportData) -> str | None:
    """The verified minimal fix set: each intervention's necessity, then the statistics."""
    cca = data.result("cca")
    if cca is None:
        return None
    fix = cca.get("fix_set") or {}
    if cca.get("status") != "found":
        return note(f"no fix set within max_fix_set_size flips the failure: "
                    f"{fix.get('reason', '')}", kind="warn") + _stats(fix, cca)
    nec = {n.get("site"): n for n in fix.get("necessity") or []}
    rows = [[str(i), esc(iv.get("site")), esc(iv.get("kind")),
             fmt((nec.get(iv.get("site")) or {}).get("metric_without")),
             esc((nec.get(iv.get("site")) or {}).get("flips_without")),
             esc((nec.get(iv.get("site")) or {}).get("role"))]
            for i, iv in enumerate(fix.get("interventions") or [], 1)]
    intro = (f"<p>{esc(len(rows))} intervention(s), 1-minimal: {esc(fix.get('one_minimal'))} "
             "(removing any one, replayed, un-flips the failure).</p>")
    ratio = over_budget(fix)
    if ratio:
        intro += note(f"Its side effects on benign incidents are {ratio:.0f}× the "
                      f"{SIDE_EFFECT_BUDGET_KL} nat budget (mean KL): it shows where the failure "
                      "is carried, and is not a mitigation to deploy"
                      + ("; the investigation below searches fixes under the budget."
                         if data.result("investigate") is not None else
                         "; an investigation (job kind investigate, forensics investigate) "
                         "searches fixes under the budget."), kind="warn")
    return intro + table(["#", "site", "intervention", "metric without it",
                          "still flips without it", "role"], rows, table_id="fix-table") + \
        _stats(fix, cca) + interactions(fix)


def before_after(data: ReportData) -> str | None:
    """The answer as served, beside the greedy answer replayed with the fix applied."""
    cca = data.result("cca")
    if cca is None or cca.get("status") != "found":
        return None
    outs = cca.get("outputs") or {}
    fix = cca.get("fix_set") or {}
    before = outs.get("recorded")
    after = outs.get("with_fix", fix.get("greedy_output"))
    check = fix.get("greedy_check")
    verdict = "" if check is None else note(
        "the failure text is gone from the greedy answer with the fix" if check else
        "the greedy answer with the fix still contains the failure text", kind="info"
        if check else "warn")
    return (f'<div class="cols"><div><h3>served (recorded)</h3><pre id="output-before">'
            f'{esc(before) if before is not None else "(content not captured)"}</pre></div>'
            f'<div><h3>replayed with the fix</h3><pre id="output-after">{esc(after)}</pre>'
            f"</div></div>{verdict}")


def links(data: ReportData) -> str:
    """The request's trace (linked when a trace URL template is given) and every analysis."""
    tid = data.trace_id
    trace = esc(tid)
    if tid and data.trace_url:
        trace = f'<a href="{esc(data.trace_url.format(trace_id=tid))}">{esc(tid)}</a>'
    out = kv_table([("request trace id", f'<span id="trace-id">{trace}</span>'),
                    ("sidecar spans", "ingest, index and job.&lt;kind&gt; spans start new "
                                      "traces linked to this one (span links); the anomaly "
                                      "score's Prometheus exemplar carries its trace id"),
                    ("source", esc(data.source))], table_id="links-table")
    if data.jobs:
        out += table(["analysis", "kind", "state", "attempts", "finished", "error"],
                     [[esc(j.get("id")), esc(j.get("kind")), esc(j.get("state")),
                       esc(j.get("attempts")), esc(j.get("finished_at")), esc(j.get("error"))]
                      for j in data.jobs], table_id="jobs-table")
    return out
