"""Pieces of mistral-tune's HTML reports (the run report, the evaluation report): the page, its style,
tables, warnings (the charts are plots.py's). Every string from outside (config values, file names,
metric names, data warnings) goes through `esc`; the pieces here escape what they are given."""

from __future__ import annotations

import html
import math

# Readable from a phone to a wide screen: nothing is wider than the page (long cells wrap, charts and
# images scale down), and the width stays that of a line one reads.
CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.5em 0;max-width:100%}td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:left;vertical-align:top;overflow-wrap:anywhere}th{background:#f2f2f2}
.warn{background:#fff4d6;border-left:4px solid #e0a100;padding:.5em 1em}
img,svg.chart{max-width:100%;height:auto;display:block;margin:.5em 0}.note{color:#555;font-size:.9em}
.summary{display:grid;grid-template-columns:repeat(auto-fill,minmax(12em,1fr));gap:.5em 1.5em;
background:#f6f8fa;border:1px solid #dde;padding:.8em 1em;margin:1em 0}.summary div{line-height:1.3}
.summary b{display:block;font-size:.8em;color:#555;font-weight:normal}
.empty{color:#a33;font-style:italic}details{margin:1em 0}summary{cursor:pointer;font-weight:bold}"""


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


def summary(items: list[tuple[str, object]]) -> str:
    """Label / value pairs in a block at the top of a page (values escaped, numbers formatted)."""
    return "<div class='summary'>" + "".join(f"<div><b>{esc(k)}</b>{fmt(v)}</div>" for k, v in items) + "</div>"
