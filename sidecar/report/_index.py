"""An index page for a folder of incident reports: one row per report, newest first, read
back from the JSON facts each report embeds (``#forensics-report-meta``).

Example::

    write_index("forensics-data/reports")     # -> forensics-data/reports/index.html
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from pathlib import Path
from typing import Any

from ._html import esc, fmt, page, table

__all__ = ["read_report_meta", "write_index"]

_META = re.compile(r'<script type="application/json" id="forensics-report-meta">(.*?)</script>',
                   re.S)


def read_report_meta(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The facts a report embeds, or None for any other HTML file."""
    try:
        found = _META.search(Path(path).read_text(encoding="utf-8", errors="replace"))
        return None if found is None else dict(json.loads(found.group(1).replace("<\\/", "</")))
    except (OSError, ValueError):
        return None


def write_index(directory: str | os.PathLike[str], *, name: str = "index.html") -> Path:
    """Write ``directory/index.html`` listing every report in ``directory``; returns its path."""
    from integrations.incident import atomic_write

    root = Path(directory)
    rows: list[tuple[str, list[str]]] = []
    for f in sorted(root.glob("*.html")):
        meta = read_report_meta(f) if f.name != name else None
        if meta is None:
            continue
        fix = ", ".join(esc(s) for s in meta.get("fix_sites") or []) or (
            "none found" if meta.get("fix_found") is False else "—")
        rows.append((str(meta.get("created_at") or ""), [
            f'<a href="{esc(f.name)}">{esc(meta.get("incident_id"))}</a>',
            esc(meta.get("created_at")), esc(meta.get("model")), esc(meta.get("trigger")),
            fmt(meta.get("anomaly_score"), ".2f"), fmt(meta.get("anomaly_p"), ".3g"), fix,
            esc(meta.get("trace_id"))]))
    rows.sort(key=lambda r: r[0], reverse=True)
    body = ('<section id="incident-index"><h2>Incidents</h2>' + table(
        ["incident", "created", "model", "trigger", "anomaly score", "p", "fix set", "trace id"],
        [r for _, r in rows], table_id="index-table") + "</section>")
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    html = page(title="Model Forensics incidents", body=body, meta={"index": len(rows)},
                header=f'<header><h1>Model Forensics — {len(rows)} incident report(s)</h1>'
                       f'<div class="sub">{esc(str(root))}</div></header>',
                footer=f"Generated {esc(now)} from the reports in this folder.")
    out = root / name
    atomic_write(out, html.encode("utf-8"))
    return out
