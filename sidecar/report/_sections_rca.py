"""The report sections of an investigation (job kind ``investigate`` / ``forensics
investigate``: ``data.result("investigate")``, DESIGN §14): the input spans in the prompt, the
causal trace (heatmap and tail curve with the decision layer), the decision layer over failing
variants, the components, the direction fix beside its baselines, and the final fix; and the
failure-signature probe's score of the incident (``data.result("probe_score")``). Each returns
None when there is no such result, and a note when its step did not run.

Example::

    html = render_report(data, sections=[*default_sections()])   # these are included
    causal_trace(data)                                             # one section's HTML
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._data import ReportData
from ._html import bars_svg, esc, fmt, heatmap_svg, kv_table, note, table
from ._sections import interactions

__all__ = ["causal_trace", "components", "decision_consistency", "direction_fix",
           "failure_signature", "final_fix", "input_spans", "overview", "span_trace"]


def _inv(data: ReportData) -> Mapping[str, Any] | None:
    return data.result("investigate")


def _missing(r: Mapping[str, Any], step: str, what: str) -> str:
    """Why a step has no result: its note from the investigation, else "not run"."""
    said = [n for n in r.get("notes") or [] if n.lower().startswith(step)]
    return note(said[0] if said else f"{what} was not run in this investigation", kind="warn"
                if said else "info")


def _side(se: Mapping[str, Any] | None) -> str:
    if not se:
        return "—"
    return (f"mean KL {fmt(se.get('mean_kl'), '.3g')} nats, top-1 agreement "
            f"{fmt(se.get('top1_agreement'), '.4f')} on {esc(se.get('n_incidents'))} benign "
            "incidents")


def _card(key: str, value: str, card_id: str) -> str:
    return (f'<div class="card" id="{esc(card_id)}"><div class="k">{esc(key)}</div>'
            f'<div class="v">{value}</div></div>')


def overview(data: ReportData) -> str | None:
    """The investigation's answers at a glance: span, decision layer, consistency, fix."""
    r = _inv(data)
    if r is None:
        return None
    sp, tr = r.get("input_spans") or {}, r.get("trace") or {}
    c, fx = r.get("consistency") or {}, r.get("fix") or {}
    se = fx.get("side_effects") or {}
    fix = (f"flips: {esc(fx.get('flip'))} <small>(benign KL {fmt(se.get('mean_kl'), '.2g')} "
           "nats)</small>") if r.get("fix_found") else "none within budget"
    st, sc = r.get("span_trace") or {}, r.get("span_consistency") or {}
    layer = esc(tr.get("decision_layer"))
    rate = c.get("rate")
    consistent = fmt(rate, ".0%") if rate is not None else "—"
    if st:   # the span's side first (DESIGN §14's decision layer), the tail's read-out beside
        layer = (f"{esc(st.get('decision_layer'))} <small>(from the span; read out of it "
                 f"from layer {layer})</small>")
        if sc.get("rate") is not None:
            consistent = (f"{fmt(sc['rate'], '.0%')} <small>(from the span; tail: "
                          f"{consistent})</small>")
    cards = [_card("minimal input span", esc(sp.get("text")), "card-span"),
             _card("decision layer", layer, "card-decision-layer"),
             _card("consistent over variants", consistent, "card-consistency"),
             _card("deployable fix", fix, "card-investigation-fix")]
    took = sum(v for v in (r.get("seconds") or {}).values() if isinstance(v, int | float))
    return (f'<p>{esc(r.get("failure"))} · {fmt(took, ".1f")} s of replays and searches'
            f'</p><div class="cards">{"".join(cards)}</div>' +
            "".join(note(n, kind="warn") for n in r.get("notes") or []))


def input_spans(data: ReportData) -> str | None:
    """The prompt with the minimal spans whose removal removes the failure highlighted."""
    r = _inv(data)
    if r is None:
        return None
    tokens = r.get("prompt_tokens") or []
    sp = r.get("input_spans")
    out = r.get("output") or {}
    if sp is None:
        return _missing(r, "input spans", "input attribution") + \
            f'<pre class="tokens" id="prompt-tokens">{esc("".join(tokens))}</pre>'
    marked = {i for s in sp.get("spans") or [] for i in range(s["start"], s["end"])}
    sentence = {i for s in sp.get("sentences") or [] for i in range(s["start"], s["end"])}
    html = "".join(f"<mark>{esc(t)}</mark>" if i in marked else
                   f'<span class="sentence">{esc(t)}</span>' if i in sentence else esc(t)
                   for i, t in enumerate(tokens))
    return (f'<p>Removing the highlighted {esc(sp.get("level"))}s (1-minimal: '
            f'{esc(sp.get("one_minimal"))}; the shaded sentence holds them) makes the failure '
            "go away, checked by running the model on the shortened prompt.</p>"
            f'<pre class="tokens" id="prompt-tokens">{html}</pre>' + kv_table([
                ("minimal spans", esc(sp.get("text"))),
                ("verified by replay", esc(sp.get("verified"))),
                ("output (replayed)", f'<code>{esc(out.get("replayed"))}</code>'),
                ("output without the spans", f'<code id="output-without-spans">'
                                             f'{esc(sp.get("output_without"))}</code>'),
                ("runs", esc(sp.get("runs")))], table_id="spans-table"))


def causal_trace(data: ReportData) -> str | None:
    """Restoring the benign twin's residual stream per (layer, position), and the tail curve
    with the decision layer marked."""
    r = _inv(data)
    if r is None:
        return None
    tr = r.get("trace")
    if tr is None:
        return _missing(r, "causal trace", "the causal trace")
    layers, decision = tr.get("layers") or [], tr.get("decision_layer")
    labels = [f"{p}:{t.strip()}" for p, t in zip(tr.get("positions") or [],
                                                  tr.get("position_labels") or [])]
    out = []
    if tr.get("heatmap"):
        out.append(heatmap_svg(
            tr["heatmap"], rows=[f"layer {L}" for L in layers], cols=labels,
            svg_id="svg-causal-trace", vmax=1.0, unit="failure kept",
            caption="the failure metric when the twin's residual stream (blocks.L.resid_post) "
                    "is restored at one layer and position (1 = still failing as recorded, "
                    "0 = the twin's level); positions after the inserted span, then one per "
                    "generated token"))
    out.append(bars_svg(
        tr.get("tail_curve") or [], labels=[str(L) for L in layers], svg_id="svg-tail-curve",
        marked=layers.index(decision) if decision in layers else None,
        marked_text="decision layer",
        caption="restoring every position after the span at one layer (1 = still failing, "
                "0 = the twin's level); decision layer: "
                + str(tr.get("rule") or "the earliest from which every later restoration "
                      "removes the failure")))
    share = tr.get("decision_share")
    out.append(kv_table([
        ("decision layer", f'<b id="decision-layer">{esc(decision)}</b>'
                           + (f" (removes {fmt(share, '.0%')} of the failure)"
                              if share is not None else "")),
        ("earliest layer from which every later restoration removes it",
         esc(tr.get("flip_layer"))),
        ("decision step", esc(tr.get("decision_step"))),
        ("metric failing → twin", f"{fmt(tr.get('metric_failing'))} → "
                                  f"{fmt(tr.get('metric_twin'))}"),
        ("replays", esc(tr.get("runs")))], table_id="trace-table"))
    return "".join(out) + "".join(note(n) for n in tr.get("notes") or [])


def span_trace(data: ReportData) -> str | None:
    """Removing the injected span from the residual stream at each layer, and the decision
    layer from the span's side (DESIGN §14's wording)."""
    r = _inv(data)
    if r is None:
        return None
    st = r.get("span_trace")
    if st is None:
        return _missing(r, "span trace", "the decision layer from the span")
    layers, decision = st.get("layers") or [], st.get("decision_layer")
    span = st.get("span") or ["?", "?"]
    return bars_svg(
        st.get("curve") or [], labels=[str(L) for L in layers], svg_id="svg-span-curve",
        marked=layers.index(decision) if decision in layers else None,
        marked_text="decision layer",
        caption=f"the injected span (prompt positions {span[0]}–{span[1]}) replaced by the "
                "benign mean residual at one layer (1 = still failing, 0 = the twin's level); "
                f"decision layer: {st.get('rule')}") + kv_table([
        ("decision layer from the span", f'<b id="span-decision-layer">{esc(decision)}</b>'),
        ("earliest layer from which removing the span no longer flips the failure",
         esc(st.get("settled_layer"))),
        ("metric failing → twin", f"{fmt(st.get('metric_failing'))} → "
                                  f"{fmt(st.get('metric_twin'))}"),
        ("replays", esc(st.get("runs")))], table_id="span-trace-table") + \
        "".join(note(n) for n in st.get("notes") or [])


def decision_consistency(data: ReportData) -> str | None:
    """The decision layer of each failing variant against the consensus: from the span's side
    (when measured) and from the tail."""
    r = _inv(data)
    if r is None:
        return None
    c = r.get("consistency")
    if c is None:
        return _missing(r, "decision layer", "the consistency over variants")
    out = []
    if r.get("span_consistency"):
        out.append("<h3>From the span (removing it no longer removes the failure)</h3>" +
                   _consistency(r["span_consistency"], "span-consistency-table"))
        out.append("<h3>From the tail (where the failure is read out of the span)</h3>")
    return "".join(out) + _consistency(c, "consistency-table")


def _consistency(c: dict[str, Any], table_id: str) -> str:
    rate = c.get("rate")
    rows = [[esc(v), esc(layer), "yes" if layer is not None and c.get("reference") is not None
             and abs(layer - c["reference"]) <= c.get("tolerance", 1) else "no"]
            for v, layer in (c.get("layers") or {}).items()]
    rows += [[esc(v), "skipped", esc(why)] for v, why in (c.get("skipped") or {}).items()]
    ci = c.get("ci") or []
    head = (f"<p>Consistent in {esc(c.get('consistent'))} of {esc(c.get('evaluated'))} failing "
            f"variants ({fmt(rate, '.0%') if rate is not None else 'no variant evaluated'}"
            + (f", Wilson 95 % [{fmt(ci[0], '.2f')}, {fmt(ci[1], '.2f')}]" if len(ci) == 2
               else "") +
            f") within ±{esc(c.get('tolerance'))} layer of layer {esc(c.get('reference'))}"
            + (f" ({esc(c.get('reference_from'))})" if c.get("reference_from") else "") +
            f"; exactly equal in {esc(c.get('exact'))}. The seed's target is ≥ 90 %."
            + (f" Rule: {esc(c.get('rule'))}." if c.get("rule") else "") + "</p>")
    return head + (table(["variant", "decision layer", "consistent"], rows,
                         table_id=table_id) if rows else
                   note("no failing variants were given (--variants DIR, params.variants)"))


def components(data: ReportData) -> str | None:
    """The heads and MLPs at the traced positions that carry the failure (CCA, patched from
    the twin, under the side-effect budget)."""
    r = _inv(data)
    if r is None:
        return None
    fx = r.get("components")
    if fx is None:
        return _missing(r, "components", "the component search")
    rows = [[esc(iv.get("site")), esc(iv.get("kind"))] for iv in fx.get("interventions") or []]
    body = table(["site", "intervention"], rows, table_id="components-table") if rows else \
        note(f"no component set flips the failure: {fx.get('reason')}", kind="warn")
    return body + kv_table([
        ("flips the failure", esc(fx.get("flip"))),
        ("metric before → after", f"{fmt(fx.get('metric_before'))} → "
                                  f"{fmt(fx.get('metric_after'))} (≤ 0 = fixed)"),
        ("1-minimal", esc(fx.get("one_minimal"))),
        ("side effects", _side(fx.get("side_effects"))),
        ("replays", f"{esc(fx.get('forward_passes'))} vs {esc(fx.get('exhaustive_forward_passes'))}"
                    " for exhaustive single-candidate patching")]) + \
        "".join(note(n) for n in fx.get("notes") or []) + interactions(fx)


def _cand_row(kind: str, c: Mapping[str, Any], chosen: bool) -> list[str]:
    gate = c.get("gate_fires_on_benign")
    return [esc(kind) + (" <b>(chosen)</b>" if chosen else ""), esc(c.get("label")),
            fmt(c.get("flip_rate"), ".2f"), fmt(c.get("mean_kl"), ".3g"),
            fmt(c.get("top1_agreement"), ".4f"), fmt(gate, ".2f") if gate is not None else "—",
            "yes" if c.get("within_budget") else "no"]


def direction_fix(data: ReportData) -> str | None:
    """Gated removal of contrast directions: every candidate and the baselines, cross-fitted."""
    r = _inv(data)
    if r is None:
        return None
    d = r.get("directions")
    if d is None:
        return _missing(r, "directions", "the direction search")
    chosen = d.get("chosen") or {}
    rows = [_cand_row("candidate", c, c.get("label") == chosen.get("label"))
            for c in d.get("candidates") or []]
    rows += [_cand_row("baseline", c, False) for c in d.get("baselines") or []]
    intro = (f"<p>Budget: mean KL ≤ {fmt(d.get('budget_kl'), 'g')} nats and top-1 agreement ≥ "
             f"{fmt(d.get('min_top1'), 'g')} on benign prompts. Every number is cross-fitted "
             "(fitted on one half of the incidents, measured on the other).</p>")
    verdict = note(f"chosen: {chosen.get('label')}", kind="info") if chosen else \
        note("no candidate stayed within the side-effect budget", kind="warn")
    return intro + verdict + table(
        ["kind", "fix", "flip rate", "benign KL (nats)", "top-1 agreement",
         "gate fires on benign", "within budget"], rows, table_id="directions-table") + \
        "".join(note(n) for n in d.get("notes") or [])


def final_fix(data: ReportData) -> str | None:
    """The fix as deployed, re-verified by replay: flip, metric, greedy output, side effects."""
    r = _inv(data)
    if r is None:
        return None
    fx = r.get("fix")
    if fx is None:
        return note("no deployable fix: " + ("; ".join(
            (r.get("directions") or {}).get("notes") or []) or "the direction step found none "
            "within the budget, or did not run"), kind="warn")
    ci = fx.get("flip_rate_ci") or [None, None]
    where = r.get("fix_file")
    use = ("from analysis.cca import FixSet\nfix = FixSet.load(" + repr(where or "fix.json") +
           ")\nwith fix.apply(model):\n    model.generate(...)")
    return kv_table([
        ("flips the failure", f'<b id="fix-flip">{esc(fx.get("flip"))}</b>'),
        ("metric before → after", f"{fmt(fx.get('metric_before'))} → "
                                  f"{fmt(fx.get('metric_after'))} (≤ 0 = fixed)"),
        ("greedy output with the fix", f'<code id="fix-output">'
                                       f'{esc(fx.get("greedy_output"))}</code>'),
        ("output without it", f"<code>{esc((r.get('output') or {}).get('replayed'))}</code>"),
        ("flip rate", f"{fmt(fx.get('flip_rate'), '.2f')} (Wilson 95 % [{fmt(ci[0], '.2f')}, "
                      f"{fmt(ci[1], '.2f')}], in-sample)"),
        ("side effects", _side(fx.get("side_effects"))),
        ("interventions", esc("; ".join(
            f"{iv.get('kind')} {iv.get('site')}" + (f" ({iv['direction']})" if
                                                   iv.get("direction") else "") +
            (", gated" if iv.get("gated") else "") for iv in fx.get("interventions") or []))),
        ("fix file", esc(where))], table_id="final-fix-table") + \
        "".join(note(n) for n in fx.get("notes") or []) + \
        f'<h3>apply it</h3><pre id="fix-usage">{esc(use)}</pre>'


def failure_signature(data: ReportData) -> str | None:
    """The failure-signature probe's score of this incident (job kind ``probe_score``)."""
    r = data.result("probe_score")
    if r is None:
        return None
    if r.get("status") != "scored":
        return note(f"probe: {r.get('status')} — {r.get('message', '')}".rstrip(" —"))
    pr = r.get("probe") or {}
    ci = pr.get("auroc_ci") or [None, None]
    return kv_table([
        ("probability of failure", f'<b id="failure-p">{fmt(r.get("failure_p"), ".3f")}</b>'),
        ("serving flag", esc(r.get("serving_flag"))),
        ("probe", f"v{esc(pr.get('version'))} reading {esc(pr.get('site'))} at the last "
                  f"prompt position ({esc(r.get('features'))} activations)"),
        ("probe quality (out of fold)",
         f"AUROC {fmt(pr.get('auroc'), '.3f')} (bootstrap 95 % [{fmt(ci[0], '.3f')}, "
         f"{fmt(ci[1], '.3f')}]), TPR at 1 % FPR {fmt(pr.get('tpr_at_1pct_fpr'), '.2f')}"),
        ("1 % FPR threshold", fmt(pr.get("threshold_at_1pct_fpr"), ".3f"))],
        table_id="failure-signature-table")
