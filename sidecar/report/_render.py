"""The report as a list of pluggable sections, rendered into one self-contained HTML page.

A :class:`Section` is an id, a title and a function from :class:`ReportData` to an HTML
fragment (``None`` leaves the section out). :func:`default_sections` are the built-in ones;
pass your own list — e.g. the built-ins plus sections for a new analysis kind whose results
arrive in ``data.results["<kind>"]`` — to :func:`render_report`. A section that raises is
shown as an error box; the rest of the report still renders.

Example::

    def spans(data: ReportData) -> str | None:
        r = data.result("investigate")
        return None if r is None else table(["span", "flips"], [...])

    html = render_report(data, sections=[*default_sections(),
                                         Section("input-spans", "Input spans", spans)])
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

from ._data import ReportData
from ._html import esc, note, page

__all__ = ["Section", "default_sections", "investigation_sections", "render_report",
           "report_meta"]

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Section:
    """One part of the report: ``render(data)`` returns HTML (built with the helpers of
    :mod:`sidecar.report`) or ``None`` when it has nothing to show. ``id`` becomes the
    section's HTML id (stable: tests and links use it)."""

    id: str
    title: str
    render: Callable[[ReportData], str | None]


def default_sections() -> list[Section]:
    """The built-in sections, in reading order: summary, incident (manifest), input and
    output, an episode's steps (agent loops, conversations), anomaly heatmaps, root-cause candidates, fix set, before/after the fix, the
    investigation (:func:`investigation_sections`), the failure signature, links."""
    from . import _sections as s
    from . import _sections_episode as ep
    from . import _sections_rca as rca

    return [Section("summary", "Summary", s.summary),
            Section("manifest", "Incident", s.manifest),
            Section("content", "Input and output", s.content),
            Section("episode", "Episode: model and tool calls in order", ep.episode),
            Section("heatmap-site-step", "Anomaly by site and step", s.site_step_heatmap),
            Section("heatmap-layer-position", "Anomaly by layer and position",
                    s.layer_position_heatmap),
            Section("root-causes", "Root-cause candidates", s.root_causes),
            Section("fix-set", "Verified fix set", s.fix_set),
            Section("before-after", "Before and after the fix", s.before_after),
            *investigation_sections(),
            Section("failure-signature", "Failure signature", rca.failure_signature),
            Section("links", "Traces and analyses", s.links)]


def investigation_sections() -> list[Section]:
    """The sections of an investigation (``data.result("investigate")``, DESIGN §14): an
    overview, input spans, causal trace and decision layer, consistency over variants, components, the
    direction fix and its baselines, the final fix."""
    from . import _sections_rca as rca

    return [Section("investigation", "Investigation", rca.overview),
            Section("investigation-spans", "Investigation: input spans", rca.input_spans),
            Section("causal-trace", "Investigation: causal trace and decision layer",
                    rca.causal_trace),
            Section("span-trace", "Investigation: decision layer from the injected span",
                    rca.span_trace),
            Section("decision-consistency", "Investigation: decision layer over variants",
                    rca.decision_consistency),
            Section("components", "Investigation: components", rca.components),
            Section("direction-fix", "Investigation: direction fix and baselines",
                    rca.direction_fix),
            Section("final-fix", "Investigation: the fix", rca.final_fix)]


def _one(section: Section, data: ReportData) -> str:
    try:
        body = section.render(data)
    except Exception as e:   # one broken section never hides the others
        _log.exception("report section %s failed", section.id)
        body = note(f"this section could not be rendered: {type(e).__name__}: {e}",
                    kind="error")
    if body is None:
        return ""
    return f'<section id="{esc(section.id)}"><h2>{esc(section.title)}</h2>{body}</section>'


def report_meta(data: ReportData) -> dict[str, Any]:
    """The facts an index page lists for a report (embedded in the page as JSON)."""
    cf, cca = data.result("cf") or {}, data.result("cca") or {}
    trig = data.manifest.get("trigger") or {}
    fix = cca.get("fix_set") or {}
    return {"incident_id": data.incident_id, "created_at": data.manifest.get("created_at"),
            "model": (data.manifest.get("model") or {}).get("name"),
            "trigger": f"{trig.get('rule')}:{trig.get('reason')}",
            "anomaly_score": cf.get("anomaly_score"), "anomaly_p": cf.get("anomaly_p"),
            "cf_flagged": cf.get("flagged"), "fix_found": cca.get("status") == "found" or None,
            "fix_sites": [iv.get("site") for iv in fix.get("interventions") or []],
            "failure_p": data.facts.get("failure_p"),
            "investigation_fix": (data.result("investigate") or {}).get("fix_found"),
            "trace_id": data.trace_id, "generated_at": data.generated_at}


def render_report(data: ReportData, *, sections: Sequence[Section] | None = None,
                  trace_url: str | None = None) -> str:
    """The report page for ``data`` (``sections``: default :func:`default_sections`;
    ``trace_url``: a template such as ``http://jaeger:16686/trace/{trace_id}`` that turns the
    trace id into a link)."""
    if trace_url:
        data = dataclasses.replace(data, trace_url=trace_url)
    parts = [_one(s, data) for s in (default_sections() if sections is None else sections)]
    trig = data.manifest.get("trigger") or {}
    header = (f'<header><h1 id="incident-id">Incident {esc(data.incident_id)}</h1>'
              f'<div class="sub">{esc(trig.get("rule"))}: {esc(trig.get("reason"))} · model '
              f'{esc((data.manifest.get("model") or {}).get("name"))} · created '
              f'{esc(data.manifest.get("created_at"))}</div></header>')
    footer = (f"Generated {esc(data.generated_at)} from {esc(data.source or 'unknown source')} "
              "by Model Forensics. Every number was measured by running the model (scores "
              "against the benign baseline, fixes verified by deterministic replay). "
              "Self-contained: no script, no external resource.")
    return page(title=f"Incident {data.incident_id}", header=header, body="".join(parts),
                meta=report_meta(data), footer=footer)
