"""The charts of mistral-tune's HTML reports (the run report, the evaluation report), drawn with
matplotlib: one look for both pages. A base model is always grey and the tuned one blue; tick labels
are round numbers; legends sit outside the plotting area, so they cover neither curves nor labels.

Figures come back as matplotlib Figures; `svg` turns one into inline SVG for a self-contained page
(text stays text, so the page can be searched and read at any zoom) and `png` into a file."""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

BASE, TUNED = "#8c8c8c", "#1f6fb4"
COLORS = {"base": BASE, "tuned": TUNED}
OTHERS = ("#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf")  # further series, after tuned and base


def pyplot():
    """matplotlib.pyplot on the Agg backend, imported on first use (it is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "mistral-tune", "font.size": 8,
                                "axes.titlesize": 9, "axes.spines.top": False, "axes.spines.right": False})
    import matplotlib.pyplot as plt

    return plt


def series_color(name: str, k: int) -> str:
    """A base series (`base`, `NAME@base`) grey; the others by their place k among the non-base ones:
    the first blue, then the palette."""
    if name == "base" or name.endswith("@base"):
        return BASE
    return TUNED if k == 0 else OTHERS[(k - 1) % len(OTHERS)]


def tick_label(value: float, _pos=None) -> str:
    """A tick as a reader writes it: at most 3 significant digits, no float noise (0.00075, not 0.0007519)."""
    if value == 0 or not math.isfinite(value):
        return "0" if value == 0 else str(value)
    text = f"{value:.3g}"
    if "e" in text:  # 1e-05, 2.5e+06: mantissa and a plain exponent
        mantissa, exp = text.split("e")
        text = f"{mantissa}e{int(exp)}"
    return text


def round_ticks(ax, x: bool = True, x_integer: bool = False) -> None:
    """At most 5 ticks on round values (1, 2, 2.5, 5 x 10^n) with short labels, on y and (x) on x."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    if ax.get_yscale() != "log":  # a log axis keeps its powers of ten
        ax.yaxis.set_major_locator(MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]))
        ax.yaxis.set_major_formatter(FuncFormatter(tick_label))
    if x:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10], integer=x_integer))
        ax.xaxis.set_major_formatter(FuncFormatter(tick_label))
    ax.tick_params(labelsize=7)


def legend_below(ax, handles=None) -> None:
    """The legend under the axes, outside the plotting area (never over a curve, a bar or its label)."""
    handles, labels = ax.get_legend_handles_labels() if handles is None else (handles, [h.get_label() for h in
                                                                                        handles])
    if len(handles) > 1:
        ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncols=min(3, len(handles)),
                  fontsize=7, frameon=False)


def line_panels(charts: list[tuple[str, dict[str, list[tuple[float, float | None]]]]], x_label: str = "step",
                cols: int = 2):
    """One panel per chart, `cols` a row; a curve per series with a vertex per finite value (None and
    non-finite values leave gaps; a lone point is drawn as a dot)."""
    plt = pyplot()
    rows = max(1, math.ceil(len(charts) / cols))
    # Fixed margins (inches) instead of tight_layout, which draws the figure once more (a run report is
    # written at the end of every run): room for tick labels left, title above, x label and legend below.
    left, right, top, bottom, gap_x, gap_y, panel_w, panel_h = 0.65, 0.15, 0.3, 0.8, 0.75, 1.1, 4.4, 1.8
    width = left + right + cols * panel_w + (cols - 1) * gap_x
    height = top + bottom + rows * panel_h + (rows - 1) * gap_y
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False)
    fig.subplots_adjust(left=left / width, right=1 - right / width, top=1 - top / height, bottom=bottom / height,
                        wspace=gap_x / panel_w, hspace=gap_y / panel_h)
    for ax in axes.flat[len(charts):]:
        ax.axis("off")
    for ax, (title, series) in zip(axes.flat, charts, strict=False):
        drawn = False
        tuned = [n for n in series if not (n == "base" or n.endswith("@base"))]  # colour by place among these
        for name, points in series.items():
            xs = [x for x, _ in points]
            ys = [y if y is not None and math.isfinite(y) else math.nan for _, y in points]
            if not any(math.isfinite(y) for y in ys):
                continue
            k = tuned.index(name) if name in tuned else 0
            ax.plot(xs, ys, color=series_color(name, k), lw=1.5, marker="o" if _lonely(ys) else None, ms=3,
                    label=name, gid=f"series-{name}")  # the SVG element's id: a page's reader finds the curve
            drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel(x_label, fontsize=7)
        round_ticks(ax, x_integer=x_label == "step")
        ax.grid(alpha=0.25)
        legend_below(ax)
    return fig


def _lonely(ys: list[float]) -> bool:
    """Whether a value has no finite neighbour (a line through it would not show)."""
    return any(math.isfinite(y) and not any(math.isfinite(v) for v in ys[max(i - 1, 0):i] + ys[i + 1:i + 2])
               for i, y in enumerate(ys))


def svg(fig) -> str:
    """The figure as an <svg> element to put in a page: scales to its container's width."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    pyplot().close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg"):]  # no XML declaration or DOCTYPE inside HTML
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
    # Width and height from the viewBox only: the page's CSS sizes it (max-width 100%).
    return re.sub(r'<svg([^>]*?) width="[^"]*" height="[^"]*"', r'<svg\1 class="chart"', text, count=1)


def png(fig, path: Path, dpi: int = 100) -> Path:
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return path


def bars(title: str, metrics: dict[str, dict[str, float | None]]):
    """Base vs tuned for each metric. Shares (every value in [0, 1], the largest at least 0.05) share
    one panel on a 0-1 axis; any other metric (loss, perplexity, a KL of 0.0004 that would be invisible
    there) gets a panel of its own on its own scale. At most four panels a row; None when no metric
    has a tuned value."""
    metrics = {m: v for m, v in metrics.items() if v.get("tuned") is not None}
    if not metrics:
        return None
    plt = pyplot()

    def share(v: dict) -> bool:
        values = [x for x in v.values() if x is not None]
        return all(0 <= x <= 1 for x in values) and max(values) >= 0.05

    unit = {m: v for m, v in metrics.items() if share(v)}
    panels = ([("", unit)] if unit else []) + [(m, {m: v}) for m, v in metrics.items() if m not in unit]
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    widths = [max(2.4, 0.75 * len(group) + 1.3) for _, group in panels[:cols]]
    fig, axes = plt.subplots(rows, cols, figsize=(sum(widths) + 0.4, 3.1 * rows), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    handles = {}
    for ax, (panel, group) in zip(axes.flat, panels, strict=False):
        names = list(group)
        sides = [s for s in ("base", "tuned") if any(group[m].get(s) is not None for m in names)]
        width = 0.8 / len(sides)
        top = max(abs(group[m].get(s) or 0.0) for m in names for s in sides) or 1.0
        for k, side in enumerate(sides):
            xs = [i + (k - (len(sides) - 1) / 2) * width for i in range(len(names))]
            values = [group[m].get(side) for m in names]
            handles[side] = ax.bar(xs, [v or 0.0 for v in values], width, label=side, color=COLORS[side])
            for x, v in zip(xs, values, strict=True):
                ax.annotate("n/a" if v is None else tick_label(v), (x, v or 0.0), ha="center", va="bottom",
                            fontsize=7, xytext=(0, 1), textcoords="offset points")
        ax.set_xticks(range(len(names)), names, rotation=30 if len(names) > 3 else 0,
                      ha="right" if len(names) > 3 else "center")
        if panel:
            ax.set_title(panel)
            ax.set_ylim(min(0.0, ax.get_ylim()[0]), top * 1.18)  # room for the value labels
        else:
            ax.set_ylim(0, 1.15)
        round_ticks(ax, x=False)  # x: the metrics' names
    fig.suptitle(f"{title}: base vs tuned", fontsize=10)
    # One legend for the figure, above the panels and right of the title's centre: it covers nothing.
    fig.legend(list(handles.values()), list(handles), loc="upper right", ncols=2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return fig


def heatmap(spec: dict):
    """{"grids": {side: rows of values in [0, 1]}, "x", "y", labels, "title"}: one panel a side."""
    plt = pyplot()
    grids = spec["grids"]
    fig, axes = plt.subplots(1, len(grids), figsize=(3.4 * len(grids) + 0.8, 0.45 * len(spec["y"]) + 1.8),
                             squeeze=False)
    for ax, (side, grid) in zip(axes[0], grids.items(), strict=True):
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(spec["x"])), spec["x"], fontsize=8)
        ax.set_yticks(range(len(spec["y"])), spec["y"], fontsize=8)
        ax.set_xlabel(spec.get("x_label", ""), fontsize=8)
        ax.set_ylabel(spec.get("y_label", ""), fontsize=8)
        ax.set_title(side, fontsize=9, color=COLORS.get(side, "black"))
        for r, row in enumerate(grid):
            for c, v in enumerate(row):
                ax.text(c, r, f"{v:.0%}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8)
    fig.suptitle(spec["title"], fontsize=10, y=1.04)  # above the panels' own titles
    return fig


def lines(spec: dict):
    """{"x", "series": {side: values}, "log_y", labels, "title"}: curves over a shared x."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for k, (side, values) in enumerate(spec["series"].items()):
        ax.plot(spec["x"][:len(values)], values, label=side, color=COLORS.get(side, series_color(side, k)))
    if spec.get("log_y"):
        ax.set_yscale("log")
    ax.set_xlabel(spec.get("x_label", ""))
    ax.set_ylabel(spec.get("y_label", ""))
    ax.set_title(spec["title"], fontsize=10)
    round_ticks(ax)
    ax.grid(alpha=0.25)
    legend_below(ax)
    fig.tight_layout()
    return fig
