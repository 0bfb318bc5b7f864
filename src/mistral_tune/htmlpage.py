"""Pieces of mistral-tune's HTML reports (the run report, the evaluation report): the page, tables and
line charts drawn as inline SVG. Every string from outside (config values, file names, metric names,
data warnings) goes through `esc`; the pieces here escape what they are given."""

from __future__ import annotations

import html
import math

CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;
vertical-align:top}th{background:#f2f2f2}.warn{background:#fff4d6;border-left:4px solid #e0a100;padding:.5em 1em}
img{max-width:100%;display:block;margin:.5em 0}.note{color:#555;font-size:.9em}
.charts{display:flex;flex-wrap:wrap;gap:1em}svg{font-size:10px}"""
PALETTE = ("#1f6fb4", "#8c8c8c", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")


def esc(value) -> str:
    """A value as HTML text, quotes included (safe in attributes too)."""
    return html.escape(str(value), quote=True)


def fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and (math.isinf(value) or math.isnan(value)):
        return html.escape(str(value), quote=True)
    return f"{value:,.4g}" if isinstance(value, float) else esc(value)


def page(title: str, parts: list[str]) -> str:
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><link rel='icon' href='data:,'>"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>" + "\n".join(parts) + "</body></html>\n")


def warnings(items: list[str]) -> str:
    if not items:
        return ""
    return "<div class='warn'><strong>Warnings</strong><ul>" + "".join(f"<li>{esc(w)}</li>" for w in items) + \
        "</ul></div>"


def table(head: list[str], rows: list[list]) -> str:
    """Cells are escaped (numbers formatted)."""
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def line_chart(title: str, series: dict[str, list[tuple[float, float | None]]], x_label: str = "step",
               width: int = 520, height: int = 240) -> str:
    """Curves over a shared x as an <svg>: one polyline per run of finite points (a None or non-finite
    value leaves a gap); each point is a vertex, so a curve has as many vertices as it has values."""
    finite = [(x, y) for pts in series.values() for x, y in pts if y is not None and math.isfinite(y)]
    left, right, top, bottom = 66, 12, 24, 34
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img'>",
             f"<title>{esc(title)}</title>",
             f"<text x='{width / 2}' y='15' text-anchor='middle' font-size='12'>{esc(title)}</text>"]
    if not finite:
        parts.append(f"<text x='{width / 2}' y='{height / 2}' text-anchor='middle'>no finite values</text></svg>")
        return "".join(parts)
    x0, x1 = min(x for x, _ in finite), max(x for x, _ in finite)
    y0, y1 = min(y for _, y in finite), max(y for _, y in finite)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        pad = abs(y0) * 0.05 or 1.0
        y0, y1 = y0 - pad, y1 + pad
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return top + (y1 - y) / (y1 - y0) * plot_h

    parts.append(f"<rect x='{left}' y='{top}' width='{plot_w}' height='{plot_h}' fill='none' stroke='#ccc'/>")
    for i in range(5):  # gridlines and tick labels
        y = y0 + (y1 - y0) * i / 4
        parts.append(f"<line x1='{left}' x2='{left + plot_w}' y1='{py(y):.1f}' y2='{py(y):.1f}' stroke='#eee'/>"
                     f"<text x='{left - 4}' y='{py(y) + 3:.1f}' text-anchor='end'>{y:.4g}</text>")
        x = x0 + (x1 - x0) * i / 4
        x = round(x) if x1 - x0 >= 8 else x  # whole steps where there are enough of them
        parts.append(f"<text x='{px(x):.1f}' y='{top + plot_h + 14}' text-anchor='middle'>{x:.4g}</text>")
    parts.append(f"<text x='{left + plot_w / 2}' y='{height - 4}' text-anchor='middle'>{esc(x_label)}</text>")
    for k, (name, points) in enumerate(series.items()):
        color = PALETTE[k % len(PALETTE)]
        runs: list[list[tuple[float, float]]] = [[]]
        for x, y in points:
            if y is None or not math.isfinite(y):
                runs.append([])
            else:
                runs[-1].append((x, y))
        for run in filter(None, runs):
            coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in run)
            parts.append(f"<polyline data-series='{esc(name)}' fill='none' stroke='{color}' stroke-width='1.5' "
                         f"points='{coords}'/>")
            if len(run) == 1:  # a lone point draws no line
                parts.append(f"<circle cx='{px(run[0][0]):.1f}' cy='{py(run[0][1]):.1f}' r='2' fill='{color}'/>")
        if len(series) > 1:
            parts.append(f"<text x='{left + 6}' y='{top + 12 + 12 * k}' fill='{color}'>{esc(name)}</text>")
    parts.append("</svg>")
    return "".join(parts)
