"""Rendering of analysis results for ``forensics incidents show``: CF top sites and the CCA fix
set with its statistics (rich tables), from ``GetAnalysis`` / ``ListAnalyses`` result JSON.

Example::

    render_analyses(console, analyses)     # newest done cf and cca of one incident
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

__all__ = ["latest_done", "render_analyses", "render_cca", "render_cf"]


def _f(x: Any, fmt: str = ".3g") -> str:
    return "—" if x is None else format(float(x), fmt)


def latest_done(analyses: Sequence[Any], kind: str) -> dict[str, Any] | None:
    """The result of the newest finished analysis of ``kind`` (analyses come newest first)."""
    from .api import v1

    for a in analyses:
        if a.kind == kind and a.state == v1.JOB_STATE_DONE and a.result_json:
            return dict(json.loads(a.result_json))
    return None


def render_cf(console: Any, r: dict[str, Any], *, top: int = 10) -> None:
    """CF: the incident score and the most anomalous sites (or why there is no score)."""
    from rich.table import Table

    if r.get("status") != "scored":
        console.print(f"[bold]Compression Forensics[/bold] ({r.get('detector')}): "
                      f"{r.get('status')} — {r.get('message', '')}")
        return
    rep = r.get("report") or {}
    base = r.get("baseline") or {}
    verdict = "[red]FLAGGED[/red]" if r.get("flagged") else "not flagged"
    console.print(f"[bold]Compression Forensics[/bold] ({r.get('detector')}, baseline "
                  f"v{base.get('version')} of {base.get('sample_count')} benign incidents): "
                  f"score {_f(r.get('anomaly_score'), '.2f')} (p {_f(rep.get('p'))} vs the "
                  f"baseline), {verdict} at >= {_f(r.get('threshold'), 'g')}")
    table = Table(title=f"top {top} sites (robust z vs benign; p empirical, q BH)")
    shown = (rep.get("ranked_sites") or [])[:top]
    for col in ("rank", "site", "score", "p", "q", "flagged", "worst step:pos"):
        table.add_column(col, overflow="fold",   # site names are printed whole
                         min_width=max((len(s) for s, _ in shown), default=4)
                         if col == "site" else None)
    sites = rep.get("sites") or {}
    for i, (site, _) in enumerate(shown, start=1):
        s = sites.get(site) or {}
        w = s.get("worst") or {}
        table.add_row(str(i), site, _f(s.get("score"), ".2f"), _f(s.get("p")), _f(s.get("q")),
                      "yes" if s.get("flagged") else "", f"{w.get('step')}:{w.get('position')}")
    console.print(table)
    cands = rep.get("root_cause_candidates") or (
        [rep["first_flagged"]] if rep.get("first_flagged") else [])
    if cands:
        more = f" (+{len(cands) - 3} more)" if len(cands) > 3 else ""
        console.print("  root-cause candidates (flagged sites, earliest in the forward pass "
                      f"first): {', '.join(cands[:3])}{more}")
    for note in rep.get("notes") or []:
        console.print(f"  note: {note}")


def render_cca(console: Any, r: dict[str, Any]) -> None:
    """CCA: the verified fix set, each element's necessity, and the statistics (site names are
    escaped: ``[neuron=17]`` is not rich markup)."""
    from rich.markup import escape
    from rich.table import Table

    fix = r.get("fix_set") or {}
    fid = r.get("fidelity") or {}
    head = (f"[bold]Causal fix set[/bold] ({fix.get('strategy')}, {fix.get('intervention_kind')}"
            f", failure: {fix.get('failure')}; replay exact={fid.get('exact')})")
    if r.get("status") != "found":
        console.print(f"{head}: none found — {fix.get('reason', '')}")
        return
    console.print(f"{head}: {len(fix.get('interventions') or [])} intervention(s), "
                  f"1-minimal={fix.get('one_minimal')}")
    table = Table(title="interventions (necessity = metric without it, verified by replay)")
    for col in ("#", "site", "kind", "metric without", "Δ", "flips without"):
        table.add_column(col, overflow="fold")
    nec = {n.get("site"): n for n in fix.get("necessity") or []}
    for i, iv in enumerate(fix.get("interventions") or [], start=1):
        n = nec.get(iv.get("site")) or {}
        table.add_row(str(i), escape(str(iv.get("site"))), str(iv.get("kind")),
                      _f(n.get("metric_without")), _f(n.get("delta")),
                      str(n.get("flips_without", "—")))
    console.print(table)
    ci = fix.get("flip_rate_ci")
    if fix.get("flip_rate") is not None and ci:
        console.print(f"  flip rate {_f(fix['flip_rate'], '.2f')} (Wilson 95 % "
                      f"[{_f(ci[0], '.2f')}, {_f(ci[1], '.2f')}]) over "
                      f"{len(fix.get('variants') or [])} failing variants")
    se = fix.get("side_effects")
    if se:
        console.print(f"  side effects on {se.get('n_incidents')} benign incidents: mean KL "
                      f"{_f(se.get('mean_kl'), '.4f')} nats, top-1 agreement "
                      f"{_f(se.get('top1_agreement'), '.3f')}")
        from .report import SIDE_EFFECT_BUDGET_KL, over_budget

        ratio = over_budget(fix)
        if ratio:
            console.print(f"  [bold]not deployable[/bold]: {ratio:.0f}x the "
                          f"{SIDE_EFFECT_BUDGET_KL}-nat side-effect budget (it shows where the "
                          "failure is carried; `forensics investigate` searches fixes under "
                          "the budget)")
    if fix.get("p_value") is not None:
        console.print(f"  permutation p = {_f(fix['p_value'])} vs random same-size sets")
    console.print(f"  {fix.get('forward_passes')} replays vs "
                  f"{fix.get('exhaustive_forward_passes')} for exhaustive single-candidate "
                  "patching")
    _render_interactions(console, fix.get("interactions"))


def _render_interactions(console: Any, isc: dict[str, Any] | None) -> None:
    """IS-C of a fix set: one row per pair of components (when measured)."""
    from rich.markup import escape
    from rich.table import Table

    if not isc:
        return
    table = Table(title=f"interactions (IS-C: pairwise Shapley–Taylor, {isc.get('method')}, "
                        f"{isc.get('n_inputs')} input(s); -1 redundant, +1 synergistic)")
    pairs = isc.get("pairs") or []
    wide = max((len(str(p.get(k))) for p in pairs for k in ("a", "b")), default=4)
    for col in ("component", "component", "index", "interval", "call", "needs both"):
        table.add_column(col, overflow="fold",   # site names are printed whole
                         min_width=wide if col == "component" else None)
    for p in pairs:
        ci = p.get("ci") or [None, None]
        table.add_row(escape(str(p.get("a"))), escape(str(p.get("b"))),
                      _f(p.get("index"), "+.2f"),
                      escape(f"[{_f(ci[0], '+.2f')}, {_f(ci[1], '+.2f')}]"), str(p.get("label")),
                      _f(p.get("needs_both"), ".0%"))
    console.print(table)


def render_analyses(console: Any, analyses: Sequence[Any]) -> None:
    """The newest finished CF and CCA results of an incident, if any."""
    cf = latest_done(analyses, "cf")
    if cf is not None:
        render_cf(console, cf)
    cca = latest_done(analyses, "cca")
    if cca is not None:
        render_cca(console, cca)
