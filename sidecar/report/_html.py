"""Building blocks of the self-contained HTML report: escaping, tables, notes and SVG heatmaps
(inline, no script, no network), plus the page around the sections.

Section authors use these so every section looks the same.

Example::

    kv_table([("score", fmt(4.01, ".2f")), ("p", fmt(0.11, ".3g"))])
    heatmap_svg([[0.3, 5.2], [None, 1.0]], rows=["blocks.0.mlp", "blocks.1.mlp"],
                cols=["0", "1"], svg_id="heat", caption="|z| per site and step")
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["CSS", "bars_svg", "esc", "fmt", "heatmap_svg", "kv_table", "note", "page", "table"]


def esc(value: Any) -> str:
    """``value`` as HTML text (``None`` → an em dash)."""
    return "—" if value is None else html.escape(str(value), quote=True)


def fmt(value: Any, spec: str = ".3g") -> str:
    """A number formatted with ``spec`` (non-numbers → an em dash); HTML-safe."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "—"
    return esc(format(value, spec))


def note(text: str, *, kind: str = "info") -> str:
    """A boxed remark (``kind``: info | warn | error); ``text`` is escaped."""
    return f'<p class="note {esc(kind)}">{esc(text)}</p>'


def kv_table(pairs: Iterable[tuple[str, str]], *, table_id: str | None = None) -> str:
    """A two-column key/value table; values are HTML (escape them with :func:`esc`)."""
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in pairs)
    ident = f' id="{esc(table_id)}"' if table_id else ""
    return f'<table class="kv"{ident}>{rows}</table>'


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], *,
          table_id: str | None = None) -> str:
    """A table with ``headers`` (escaped) and ``rows`` of HTML cells."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    ident = f' id="{esc(table_id)}"' if table_id else ""
    return f'<table class="grid"{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _color(v: float | None, vmax: float) -> str:
    """White (0) to deep red (``vmax`` and beyond); grey for no value."""
    if v is None:
        return "#e6e6e6"
    t = max(0.0, min(1.0, abs(v) / vmax)) if vmax > 0 else 0.0
    r, g, b = 255, int(255 - 205 * t), int(255 - 215 * t)
    return f"#{r:02x}{g:02x}{b:02x}"


def heatmap_svg(values: Sequence[Sequence[float | None]], *, rows: Sequence[str],
                cols: Sequence[str], svg_id: str, caption: str, vmax: float | None = None,
                threshold: float | None = None, cell_h: int = 14, unit: str = "|z|") -> str:
    """An inline SVG heatmap of ``values[row][col]`` (|value| is coloured; None = not scored),
    each cell with a tooltip, row and column labels, a colour legend and — when given — the
    ``threshold`` marked on the legend. ``unit`` names the value in tooltips and the legend."""
    finite = [abs(v) for r in values for v in r if v is not None]
    top = vmax if vmax is not None else max([*finite, threshold or 0.0, 1e-9])
    cw = max(4, min(28, 760 // max(1, len(cols))))
    lw = 8 + 7 * max((len(r) for r in rows), default=4)
    # column labels wider than a cell are written slanted, in a taller band above the cells
    slant = max((len(c) for c in cols), default=0) * 6 > cw
    band = 20 + (int(4.2 * max(len(c) for c in cols)) if slant else 0)
    width = max(lw + cw * len(cols) + (band - 20), lw + 260) + 10   # legend / slanted labels
    height = band + 4 + cell_h * len(rows) + 46
    cells = []
    for i, (name, row) in enumerate(zip(rows, values)):
        y = band + i * cell_h
        cells.append(f'<text x="{lw - 6}" y="{y + cell_h - 3}" class="rl">{esc(name)}</text>')
        for j, v in enumerate(row):
            tip = f"{name} @ {cols[j]}: " + ("not scored" if v is None else f"{unit} {abs(v):.2f}")
            cells.append(f'<rect x="{lw + j * cw}" y="{y}" width="{cw - 1}" height="{cell_h - 1}"'
                         f' fill="{_color(v, top)}" stroke="#e3e6eb" stroke-width="0.5">'
                         f"<title>{esc(tip)}</title></rect>")
    step = max(1, len(cols) // 24)
    labels = "".join(
        (f'<text x="{lw + j * cw + cw / 2:.1f}" y="{band - 6}" class="cl" style="text-anchor:start" '
         f'transform="rotate(-50 {lw + j * cw + cw / 2:.1f} {band - 6})">{esc(c)}</text>')
        if slant else f'<text x="{lw + j * cw + cw / 2:.1f}" y="14" class="cl">{esc(c)}</text>'
        for j, c in enumerate(cols) if j % step == 0)
    legend = _legend(lw, band + 4 + cell_h * len(rows) + 8, top, threshold, unit)
    return (f'<figure><svg id="{esc(svg_id)}" class="heatmap" xmlns="http://www.w3.org/2000/svg"'
            f' width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img"'
            f' aria-label="{esc(caption)}">{labels}{"".join(cells)}{legend}</svg>'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def _legend(x: int, y: int, vmax: float, threshold: float | None, unit: str = "|z|") -> str:
    stops = "".join(f'<stop offset="{t / 4:.2f}" stop-color="{_color(vmax * t / 4, vmax)}"/>'
                    for t in range(5))
    out = (f'<defs><linearGradient id="lg{x}{y}">{stops}</linearGradient></defs>'
           f'<rect x="{x}" y="{y}" width="200" height="10" fill="url(#lg{x}{y})" '
           f'stroke="#999"/><text x="{x}" y="{y + 24}" class="cl">0</text>'
           f'<text x="{x + 200}" y="{y + 24}" class="cl">{vmax:.1f} {esc(unit)}</text>')
    if threshold is not None and 0 < threshold <= vmax:
        tx = x + 200 * threshold / vmax
        out += (f'<line x1="{tx:.1f}" x2="{tx:.1f}" y1="{y - 3}" y2="{y + 13}" stroke="#000"/>'
                f'<text x="{tx:.1f}" y="{y + 36}" class="cl">flag at {threshold:g}</text>')
    return out


def bars_svg(values: Sequence[float | None], *, labels: Sequence[str], svg_id: str,
             caption: str, marked: int | None = None, marked_text: str = "",
             good_at_or_below: float = 0.0) -> str:
    """An inline SVG bar chart of ``values`` (one bar per label, tooltips; None = not
    measured): bars above ``good_at_or_below`` red, the others green, bar ``marked`` outlined
    and shaded, annotated with ``marked_text``; a dashed line at ``good_at_or_below``."""
    finite = [v for v in values if v is not None]
    lo, hi = min([*finite, good_at_or_below, 0.0]), max([*finite, good_at_or_below, 1.0])
    lo = 0.0 if abs(lo) < 1e-3 else lo
    bw, plot_h, x0, y0 = max(8, min(40, 720 // max(1, len(values)))), 120, 40, 16
    scale = plot_h / (hi - lo) if hi > lo else 1.0

    def y(v: float) -> float:
        return y0 + (hi - v) * scale

    parts = [f'<line x1="{x0}" x2="{x0 + bw * len(values)}" y1="{y(good_at_or_below):.1f}" '
             f'y2="{y(good_at_or_below):.1f}" stroke="#555" stroke-dasharray="3,3"/>',
             f'<text x="{x0 - 4}" y="{y(hi) + 4:.1f}" class="rl">{hi:.2g}</text>',
             f'<text x="{x0 - 4}" y="{y(lo) + 4:.1f}" class="rl">{lo:.2g}</text>']
    step = max(1, len(labels) // 24)
    if marked is not None:
        parts.insert(0, f'<rect x="{x0 + marked * bw}" y="{y0}" width="{bw}" '
                        f'height="{plot_h}" fill="#fff3cf"/>')
    for i, (v, name) in enumerate(zip(values, labels)):
        x = x0 + i * bw
        if v is not None:
            top, bottom = sorted((y(v), y(good_at_or_below)))
            color = "#e4572e" if v > good_at_or_below else "#2e9e5b"
            outline = ' stroke="#000" stroke-width="2"' if i == marked else ""
            parts.append(f'<rect x="{x + 1}" y="{top:.1f}" width="{bw - 2}" '
                         f'height="{max(1.0, bottom - top):.1f}" fill="{color}"{outline}>'
                         f"<title>{esc(name)}: {v:.3f}</title></rect>")
        if i % step == 0 or i == marked:
            parts.append(f'<text x="{x + bw / 2:.1f}" y="{y0 + plot_h + 14}" class="cl">'
                         f"{esc(name)}</text>")
        if i == marked:
            parts.append(f'<text x="{x + bw / 2:.1f}" y="{y0 - 4}" class="cl">'
                         f"{esc(marked_text)}</text>")
    width, height = x0 + bw * len(values) + 120, y0 + plot_h + 24
    return (f'<figure><svg id="{esc(svg_id)}" class="heatmap bars" '
            f'xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc(caption)}">'
            f'{"".join(parts)}</svg><figcaption>{esc(caption)}</figcaption></figure>')


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;
background:#f5f6f8}
header{background:#1d2330;color:#fff;padding:18px 28px}
header h1{margin:0 0 6px;font-size:20px;word-break:break-all}
header .sub{color:#b9c0cf;font-size:13px}
main{padding:8px 28px 28px;max-width:1180px}
section{background:#fff;border:1px solid #dde1e8;border-radius:8px;margin:16px 0;padding:14px 18px}
section h2{font-size:16px;margin:0 0 10px}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:10px 14px;min-width:150px}
.card .k{color:#5b6475;font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.card .v{font-size:20px;font-weight:600;word-break:break-all}
.badge{display:inline-block;border-radius:10px;padding:1px 9px;font-size:12px;margin-right:6px}
.bad{background:#fde2e1;color:#9b1c1c}.ok{background:#def7e7;color:#14632f}
.neutral{background:#e7eaf0;color:#39414f}
table{border-collapse:collapse;margin:6px 0}
table.kv th{text-align:left;color:#5b6475;font-weight:500;padding:3px 14px 3px 0;vertical-align:top}
table.kv td{padding:3px 0;word-break:break-all}
table.grid th,table.grid td{border-bottom:1px solid #e6e9ef;padding:4px 10px;text-align:left}
table.grid th{background:#f0f2f6}
pre{background:#f0f2f6;border-radius:6px;padding:8px 10px;white-space:pre-wrap;word-break:break-word}
.note{border-left:4px solid #8ba3c7;background:#f1f5fb;padding:6px 10px}
.note.warn{border-color:#d9a53f;background:#fdf6e7}.note.error{border-color:#c0392b;
background:#fbeaea}
.cols{display:grid;grid-template-columns:1fr 1fr;gap:14px}
svg.heatmap text.rl{font:11px monospace;text-anchor:end;fill:#1d2330}
svg.heatmap text.cl{font:10px monospace;text-anchor:middle;fill:#5b6475}
figure{margin:6px 0}figcaption{color:#5b6475;font-size:12px}
footer{color:#5b6475;font-size:12px;padding:0 28px 24px}
pre.tokens mark{background:#ffd166;border-radius:3px;padding:0 1px}
pre.tokens .sentence{background:#fff3cf}
"""


def page(*, title: str, header: str, body: str, meta: Mapping[str, Any], footer: str) -> str:
    """The whole document: inline CSS, no script, no external resource. ``meta`` is embedded as
    a JSON data block (``#forensics-report-meta``) that an index page reads back."""
    data = json.dumps(dict(meta), sort_keys=True).replace("</", "<\\/")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{CSS}</style>"
            f'<script type="application/json" id="forensics-report-meta">{data}</script>'
            f"</head><body>{header}<main>{body}</main><footer>{footer}</footer></body></html>\n")
