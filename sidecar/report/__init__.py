"""The HTML incident report: one self-contained, offline file per incident (inline CSS and SVG,
no script, no external resource), made of pluggable sections.

Data comes from a sidecar over gRPC (:func:`data_from_sidecar`) or from an incident file plus
results JSON (:func:`data_from_files`). :func:`render_report` renders :func:`default_sections`
(or any list of :class:`Section`); a new analysis kind gets its own sections by reading
``data.result("<kind>")`` and returning HTML built with :func:`table`, :func:`kv_table`,
:func:`heatmap_svg`, :func:`bars_svg`, :func:`note`, :func:`esc` and :func:`fmt`; an
investigation (``forensics investigate``, job kind ``investigate``) renders with
:func:`investigation_sections` (part of the defaults); an episode (an agent loop recorded as one
incident) gets a section listing its model and tool calls in order. :func:`write_index` lists a
folder of reports. CLI: ``forensics report ID -o report.html``.

Example::

    from sidecar import SidecarClient
    from sidecar.report import Section, data_from_sidecar, default_sections, render_report
    with SidecarClient("127.0.0.1:7431") as c:
        data = data_from_sidecar(c, incident_id)
    html = render_report(data, sections=[*default_sections(),
                                         Section("my-kind", "My analysis", my_section)])
"""

from __future__ import annotations

from ._data import ReportData, data_from_files, data_from_sidecar
from ._html import bars_svg, esc, fmt, heatmap_svg, kv_table, note, table
from ._index import read_report_meta, write_index
from ._render import (
    Section,
    default_sections,
    investigation_sections,
    render_report,
    report_meta,
)
from ._sections import SIDE_EFFECT_BUDGET_KL, over_budget

__all__ = [
    "SIDE_EFFECT_BUDGET_KL",
    "ReportData",
    "Section",
    "bars_svg",
    "data_from_files",
    "data_from_sidecar",
    "default_sections",
    "esc",
    "fmt",
    "heatmap_svg",
    "investigation_sections",
    "kv_table",
    "note",
    "over_budget",
    "read_report_meta",
    "render_report",
    "report_meta",
    "table",
    "write_index",
]
