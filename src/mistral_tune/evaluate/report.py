"""The evaluation report: eval_report.json, report.html and its PNG plots, written as one folder
that appears complete or not at all.

Figures an evaluation asks for (Result.figures):
- {"kind": "heatmap", "grids": {side: rows of values in [0, 1]}, "x", "y", labels}: one panel a side;
- {"kind": "lines", "x", "series": {side: values}, "log_y"}: curves over a shared x.
Every report also has bars (base vs tuned for each metric) and, when there is a history of
evaluations during training, curves of each metric over the training steps.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import plots
from ..fsutil import check_target, output_kind, replace_dir
from ..htmlpage import esc, fmt, page, warnings

REPORT_JSON = "eval_report.json"
REPORT_HTML = "report.html"


def _curves(history: list[dict]):
    """One panel per metric over the training steps, the base beside it where known; None when no
    metric has two points."""
    names = sorted({k for rec in history for k in rec if k != "step" and not k.endswith("@base")})
    names = [n for n in names if sum(n in rec for rec in history) >= 2]
    if not names:
        return None
    history = sorted(history, key=lambda rec: rec["step"])
    charts = [(name, {side: [(rec["step"], rec[side]) for rec in history if rec.get(side) is not None]
                      for side in (name, name + "@base") if any(rec.get(side) is not None for rec in history)})
              for name in names]
    return plots.line_panels(charts, cols=min(3, len(charts)))


def _table(evaluation: dict) -> str:
    rows = []
    for metric, sides in evaluation["metrics"].items():
        base, tuned = sides.get("base"), sides.get("tuned")
        change = fmt(tuned - base) if base is not None and tuned is not None else "–"
        rows.append(f"<tr><td>{esc(metric)}</td><td>{fmt(base)}</td><td>{fmt(tuned)}</td>"
                    f"<td>{change}</td></tr>")
    return ("<table><thead><tr><th>metric</th><th>base</th><th>tuned</th><th>change</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _examples(evaluation: dict) -> str:
    if not evaluation.get("examples"):
        return ""
    cols = [c for c in ("prompt", "reference", "base", "tuned") if any(c in e for e in evaluation["examples"])]
    head = "".join(f"<th>{c}</th>" for c in cols)
    body = "".join("<tr>" + "".join(_cell(e.get(c)) for c in cols) + "</tr>" for e in evaluation["examples"])
    return (f"<details><summary>examples</summary><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>"
            "</table></details>")


def _cell(text) -> str:
    """An answer's cell; an empty (or whitespace) answer says so instead of showing a blank cell."""
    if text is None or not str(text).strip():
        return f"<td><span class='empty'>{'(none)' if text is None else '(empty)'}</span></td>"
    return f"<td>{esc(text)}</td>"


def render_html(report: dict, images: dict[str, list[str]], run_report: str | None = None) -> str:
    """run_report: the href of the training run's report.html, when this report lies in a run."""
    meta = report["model"]
    parts = [f"<h1>Evaluation: {esc(meta['name'])}</h1>",
             f"<p class='note'>model {esc(meta['source'])}; base: {esc(meta['base'] or 'none')}"
             + (f"; step {report['step']}" if report.get("step") is not None else "")
             + f"; written {esc(report['created'])}</p>"]
    if run_report:
        parts.append(f"<p><a href='{esc(run_report)}'>The training run's report</a></p>")
    parts.append(warnings(report["warnings"]))
    if report.get("best"):
        b = report["best"]
        parts.append(f"<p>Best: step {b['step']}, {esc(b['metric'])} = {fmt(b['value'])}"
                     + (f" ({esc(b['dir'])})" if b.get("dir") else "") + "</p>")
    if images.get("curves"):
        parts.append("<h2>Over training</h2>")
        parts += [f"<img src='{esc(src)}' alt='metrics over training steps'>" for src in images["curves"]]
    for ev in report["evaluations"]:
        parts.append(f"<h2>{esc(ev['name'])}</h2>")
        parts += [f"<p class='note'>{esc(n)}</p>" for n in ev["notes"]]
        parts.append(_table(ev))
        parts += [f"<img src='{esc(src)}' alt='{esc(ev['name'])}'>" for src in images.get(ev["name"], [])]
        parts.append(_examples(ev))
    return page(f"Evaluation: {meta['name']}", parts)


def write_report(out: Path, report: dict, history: list[dict]) -> Path:
    """Write the report folder `out` (replacing an earlier report there, and nothing else)."""
    out = check_target(out, "report", overwrite=True)  # an earlier report of ours is replaced; nothing else

    def write(tmp: Path) -> None:
        (tmp / "plots").mkdir()
        images: dict[str, list[str]] = {}
        if (fig := _curves(history)) is not None:
            images["curves"] = [plots.png(fig, tmp / "plots" / "curves.png").relative_to(tmp).as_posix()]
        for ev in report["evaluations"]:
            srcs = []
            if (fig := plots.bars(ev["name"], ev["metrics"])) is not None:
                srcs.append(plots.png(fig, tmp / "plots" / f"{ev['name']}_bars.png").relative_to(tmp).as_posix())
            for spec in ev["figures"]:
                fig = (plots.heatmap if spec["kind"] == "heatmap" else plots.lines)(spec)
                srcs.append(plots.png(fig, tmp / "plots" / f"{ev['name']}_{spec['id']}.png").relative_to(tmp)
                            .as_posix())
            images[ev["name"]] = srcs
        (tmp / REPORT_JSON).write_text(json.dumps({**report, "history": history}, indent=1) + "\n")
        run_report = f"../{REPORT_HTML}" if output_kind(out.parent) == "run" else None
        (tmp / REPORT_HTML).write_text(render_html(report, images, run_report), encoding="utf-8")

    return replace_dir(out, write, "report")
