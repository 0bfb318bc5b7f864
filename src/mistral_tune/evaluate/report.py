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
import math
from pathlib import Path

from ..fsutil import check_target, output_kind, replace_dir
from ..htmlpage import esc, fmt, page, warnings

REPORT_JSON = "eval_report.json"
REPORT_HTML = "report.html"
COLORS = {"base": "#8c8c8c", "tuned": "#1f6fb4"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bars(plt, evaluation: dict, path: Path) -> bool:
    """Base vs tuned: the metrics between 0 and 1 (shares, F1, accuracy) grouped in one panel, any
    other metric (loss, perplexity, BLEU) in a panel of its own, at most four panels a row."""
    metrics = {m: v for m, v in evaluation["metrics"].items() if v.get("tuned") is not None}
    if not metrics:
        return False
    unit = {m: v for m, v in metrics.items() if all(x is None or 0 <= x <= 1 for x in v.values())}
    panels = ([("", unit)] if unit else []) + [(m, {m: v}) for m, v in metrics.items() if m not in unit]
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    widths = [max(2.4, 0.7 * len(group) + 1.2) for _, group in panels[:cols]]
    fig, axes = plt.subplots(rows, cols, figsize=(sum(widths) + 0.4, 2.9 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (title, group) in zip(axes.flat, panels, strict=False):
        names = list(group)
        sides = [s for s in ("base", "tuned") if any(group[m].get(s) is not None for m in names)]
        width = 0.8 / len(sides)
        for k, side in enumerate(sides):
            xs = [i + (k - (len(sides) - 1) / 2) * width for i in range(len(names))]
            values = [group[m].get(side) or 0.0 for m in names]
            ax.bar(xs, values, width, label=side, color=COLORS[side])
            for x, v in zip(xs, values, strict=True):
                ax.annotate(f"{v:.3g}", (x, v), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(names)), names, fontsize=8, rotation=30 if len(names) > 3 else 0, ha="right"
                      if len(names) > 3 else "center")
        if title:
            ax.set_title(title, fontsize=9)
        else:
            ax.set_ylim(0, 1.12)
        ax.tick_params(axis="y", labelsize=7)
        ax.legend(fontsize=7)
    fig.suptitle(f"{evaluation['name']}: base vs tuned", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _heatmap(plt, fig_spec: dict, path: Path) -> None:
    grids = fig_spec["grids"]
    fig, axes = plt.subplots(1, len(grids), figsize=(3.4 * len(grids) + 0.8, 0.45 * len(fig_spec["y"]) + 1.8),
                             squeeze=False)
    for ax, (side, grid) in zip(axes[0], grids.items(), strict=True):
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(fig_spec["x"])), fig_spec["x"], fontsize=8)
        ax.set_yticks(range(len(fig_spec["y"])), fig_spec["y"], fontsize=8)
        ax.set_xlabel(fig_spec.get("x_label", ""), fontsize=8)
        ax.set_ylabel(fig_spec.get("y_label", ""), fontsize=8)
        ax.set_title(side, fontsize=9)
        for r, row in enumerate(grid):
            for c, v in enumerate(row):
                ax.text(c, r, f"{v:.0%}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8)
    fig.suptitle(fig_spec["title"], fontsize=10, y=1.04)  # above the panels' own titles
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _lines(plt, fig_spec: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for side, values in fig_spec["series"].items():
        ax.plot(fig_spec["x"][:len(values)], values, label=side, color=COLORS.get(side))
    if fig_spec.get("log_y"):
        ax.set_yscale("log")
    ax.set_xlabel(fig_spec.get("x_label", ""))
    ax.set_ylabel(fig_spec.get("y_label", ""))
    ax.set_title(fig_spec["title"], fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _curves(plt, history: list[dict], path: Path) -> bool:
    """One panel per metric over the training steps; the base as a dashed line where known."""
    names = sorted({k for rec in history for k in rec if k != "step" and not k.endswith("@base")})
    names = [n for n in names if sum(n in rec for rec in history) >= 2]
    if not names:
        return False
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names, strict=False):
        points = [(rec["step"], rec[name]) for rec in history if rec.get(name) is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, color=COLORS["tuned"])
        base = [rec[name + "@base"] for rec in history if rec.get(name + "@base") is not None]
        if base:
            ax.axhline(base[-1], ls="--", color=COLORS["base"], label="base")
            ax.legend(fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("step", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


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
    body = "".join("<tr>" + "".join(f"<td>{esc(str(e.get(c, '')))}</td>" for c in cols) + "</tr>"
                   for e in evaluation["examples"])
    return (f"<details><summary>examples</summary><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>"
            "</table></details>")


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
    plt = _plt()

    def write(tmp: Path) -> None:
        plots = tmp / "plots"
        plots.mkdir()
        images: dict[str, list[str]] = {}
        if _curves(plt, history, plots / "curves.png"):
            images["curves"] = ["plots/curves.png"]
        for ev in report["evaluations"]:
            srcs = []
            if _bars(plt, ev, plots / f"{ev['name']}_bars.png"):
                srcs.append(f"plots/{ev['name']}_bars.png")
            for spec in ev["figures"]:
                name = f"plots/{ev['name']}_{spec['id']}.png"
                (_heatmap if spec["kind"] == "heatmap" else _lines)(plt, spec, tmp / name)
                srcs.append(name)
            images[ev["name"]] = srcs
        (tmp / REPORT_JSON).write_text(json.dumps({**report, "history": history}, indent=1) + "\n")
        run_report = f"../{REPORT_HTML}" if output_kind(out.parent) == "run" else None
        (tmp / REPORT_HTML).write_text(render_html(report, images, run_report), encoding="utf-8")

    return replace_dir(out, write, "report")
