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
            f"p = {_f(fix.get('p_value'), '.3g')} vs {perm.get('n_permutations')} random sets; "
            f"{fix.get('forward_passes')} replays vs {fix.get('exhaustive_forward_passes')} "
            "exhaustive",
            f"answer replayed with the fix: {fix.get('greedy_output')!r}"]


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
        f"trace id      {data.trace_id}" + (" (the anomaly score's Prometheus exemplar points "
                                            "to it)" if exemplar == data.trace_id else ""),
        f"report        {report}",
    ]
    console.print(Panel("\n".join(lines), title="What on-call needs", expand=False))
