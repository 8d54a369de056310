"""What the demo prints at the end: the on-call view of the flagged incident, from the same
data the HTML report is made of, plus the anomaly score's Prometheus exemplar read from a real
``/metrics`` scrape.

Example::

    print_summary(console, data, answer=answer, report=path, exemplar=trace_id)
"""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["print_summary", "score_exemplar"]


def score_exemplar(metrics_url: str, score: float) -> str | None:
    """The trace id the sidecar's ``forensics_anomaly_score`` histogram carries as exemplar
    for an observation of ``score`` (OpenMetrics scrape), or None."""
    req = urllib.request.Request(metrics_url, headers={"Accept": "application/openmetrics-text"})
    with urllib.request.urlopen(req, timeout=10) as r:
        body = r.read().decode()
    for tid, value in re.findall(r'forensics_anomaly_score_bucket\{[^}]*\} \S+ # '
                                 r'\{trace_id="([0-9a-f]{32})"\} (\S+)', body):
        if abs(float(value) - score) < 1e-9:
            return tid
    return None


def _f(x: Any, spec: str) -> str:
    return "—" if not isinstance(x, int | float) or isinstance(x, bool) else format(x, spec)


def _fix_lines(cca: dict[str, Any]) -> list[str]:
    fix = cca.get("fix_set") or {}
    if cca.get("status") != "found":
        return [f"no fix set within max_fix_set_size: {fix.get('reason', '')}"]
    ci = fix.get("flip_rate_ci") or [None, None]
    se = fix.get("side_effects") or {}
    perm = fix.get("permutation") or {}
    sites = ", ".join(f"{iv.get('kind')}({iv.get('site')})" for iv in fix["interventions"])
    return [f"{sites}  (1-minimal: {fix.get('one_minimal')}, verified by replay)",
            f"flip rate {_f(fix.get('flip_rate'), '.2f')} (Wilson 95 % [{_f(ci[0], '.2f')}, "
            f"{_f(ci[1], '.2f')}]) over {len(fix.get('variants') or [])} failing variants",
            f"side effects on {se.get('n_incidents')} benign incidents: mean KL "
            f"{_f(se.get('mean_kl'), '.3f')} nats, top-1 agreement "
            f"{_f(se.get('top1_agreement'), '.3f')}",
            *([_verdict(se)] if _verdict(se) else []),
            f"p = {_f(fix.get('p_value'), '.3g')} vs {perm.get('n_permutations')} random sets; "
            f"{fix.get('forward_passes')} replays vs {fix.get('exhaustive_forward_passes')} "
            "exhaustive",
            f"answer replayed with the fix: {fix.get('greedy_output')!r}"]


def _verdict(se: dict[str, Any]) -> str:
    """Whether measured side effects keep the budget a deployable fix keeps (DESIGN §14)."""
    from sidecar.report import SIDE_EFFECT_BUDGET_KL, over_budget

    if not isinstance(se.get("mean_kl"), int | float):
        return ""
    ratio = over_budget({"side_effects": se})
    return (f"NOT deployable: {ratio:.0f}x the {SIDE_EFFECT_BUDGET_KL}-nat side-effect budget"
            if ratio else f"within the {SIDE_EFFECT_BUDGET_KL}-nat side-effect budget")


def _span_line(inv: dict[str, Any]) -> list[str]:
    """The decision layer from the span's side (when measured)."""
    st, sc = inv.get("span_trace") or {}, inv.get("span_consistency") or {}
    if not st:
        return []
    ci = sc.get("ci") or [None, None]
    return [f"from the span layer {st.get('decision_layer')} (removing the injected text no "
            f"longer removes most of the failure); consensus {sc.get('reference')}: "
            f"{sc.get('consistent')} of {sc.get('evaluated')} variants within "
            f"±{sc.get('tolerance')} (Wilson 95 % [{_f(ci[0], '.2f')}, {_f(ci[1], '.2f')}])"]


def _investigation_lines(inv: dict[str, Any]) -> list[str]:
    """The investigation's answers: span, decision layer over variants, components, the fix."""
    sp, tr, c = inv.get("input_spans") or {}, inv.get("trace") or {}, inv.get("consistency") or {}
    comps = inv.get("components") or {}
    fx = inv.get("fix") or {}
    ci = c.get("ci") or [None, None]
    lines = [f"input span    {sp.get('text')!r} (its removal alone removes the failure, by replay)",
             f"decision      layer {tr.get('decision_layer')} (this incident); consensus "
             f"{c.get('reference')}: {c.get('consistent')} of {c.get('evaluated')} failing "
             f"variants within ±{c.get('tolerance')} (Wilson 95 % [{_f(ci[0], '.2f')}, "
             f"{_f(ci[1], '.2f')}])",
             *_span_line(inv),
             "components    " + (", ".join(f"{iv.get('kind')}({iv.get('site')})" for iv in
                                           comps.get("interventions") or []) or "none verified")
             + " (patched from the benign twin: an explanation, not a fix)"]
    if not inv.get("fix_found"):
        notes = "; ".join((inv.get("directions") or {}).get("notes") or [])
        return [*lines, "fix           none within the side-effect budget" +
                (f": {notes}" if notes else "")]
    se = fx.get("side_effects") or {}
    fci = fx.get("flip_rate_ci") or [None, None]
    ivs = fx.get("interventions") or []
    chosen = ((inv.get("directions") or {}).get("chosen") or {}).get("label")
    what = (f"{ivs[0].get('kind')} at {len(ivs)} sites" if ivs else "no intervention") + \
        (f" ({chosen})" if chosen else "")
    return [*lines, f"fix           {what}",
            f"              flip rate {_f(fx.get('flip_rate'), '.2f')} (Wilson 95 % "
            f"[{_f(fci[0], '.2f')}, {_f(fci[1], '.2f')}], in-sample) on the incident and variants",
            f"              benign: mean KL {_f(se.get('mean_kl'), '.3g')} nats, top-1 "
            f"{_f(se.get('top1_agreement'), '.3f')} on {se.get('n_incidents')} incidents — "
            + _verdict(se),
            f"              answer with the fix: {fx.get('greedy_output')!r}",
            f"              <data_dir>/{inv.get('fix_file')}: FixSet.load, with fix.apply(model)"]


def print_summary(console: Any, data: Any, *, answer: str, report: Path,
                  exemplar: str | None) -> None:
    """Print the incident, its score and p, root-cause candidates, the fix set with its
    statistics, the trace id (and the exemplar that points to it) and the report path."""
    from rich.panel import Panel

    cf, cca = data.result("cf") or {}, data.result("cca") or {}
    base = cf.get("baseline") or {}
    trig = data.manifest.get("trigger") or {}
    cands = cf.get("root_cause_candidates") or []
    lines = [
        f"incident      {data.incident_id}",
        f"request       {(data.manifest.get('request') or {}).get('id')}: answered {answer!r}; "
        f"flagged {trig.get('reason')!r} by the output guardrail",
        f"activations   {data.manifest.get('activations')} (captured live by the "
        f"{(trig.get('captured_by') or {}).get('rule')}), {len(data.manifest.get('sites') or [])}"
        f" sites x {data.manifest.get('steps')} forward steps",
        f"anomaly       score {_f(cf.get('anomaly_score'), '.2f')} (robust z), p "
        f"{_f(cf.get('anomaly_p'), '.3g')} vs a {cf.get('detector')} baseline of "
        f"{base.get('sample_count')} benign requests; flagged by CF: {cf.get('flagged')}",
        "root causes   " + (", ".join(cands[:4]) + (f" (+{len(cands) - 4} more)"
                                                     if len(cands) > 4 else "")
                            if cands else "no site above the threshold"),
        *(("fix set       " if i == 0 else "              ") + line
          for i, line in enumerate(_fix_lines(cca))),
        *(_investigation_lines(data.result("investigate") or {})
          if data.result("investigate") else []),
        f"trace id      {data.trace_id}" + (" (the anomaly score's Prometheus exemplar points "
                                            "to it)" if exemplar == data.trace_id else ""),
        f"report        {report}",
    ]
    console.print(Panel("\n".join(lines), title="What on-call needs", expand=False))
