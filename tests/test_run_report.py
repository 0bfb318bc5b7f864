"""The run report (output_dir/report.html): curves point for point, escaping, the `report` command."""

from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _runs import config, make_assets
from mistral_tune import plots
from mistral_tune.cli import main
from mistral_tune.fsutil import mark_output
from mistral_tune.train.loop import train
from mistral_tune.train.report import curves, read_metrics, record_session, write_run_report


class Page(HTMLParser):
    """The tags, the text and the attribute values of a report."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: set[str] = set()
        self.text: list[str] = []
        self.attrs: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.attrs += [v for _, v in attrs if v]

    def handle_data(self, data):
        self.text.append(data)


def _drawn(lines: list[dict]) -> dict[str, dict[str, int]]:
    """chart title -> series -> the finite points its curve is drawn through (matplotlib's own data)."""
    fig = plots.line_panels(curves(lines))
    out = {ax.get_title(): {line.get_label(): int(np.isfinite(line.get_ydata().astype(float)).sum())
                            for line in ax.get_lines()} for ax in fig.axes if ax.get_title()}
    plots.pyplot().close(fig)
    return out


def _make_run(root: Path, lines: list[dict], config_extra: dict | None = None, data: dict | None = None) -> Path:
    run = root / "run"
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(rec) + "\n" for rec in lines))
    (run / "config.yaml").write_text(yaml.safe_dump({"max_steps": 10, **(config_extra or {})}))
    (run / "data_report.json").write_text(json.dumps(data or {"samples": 3, "warnings": []}))
    mark_output(run, "run")
    return run


values = st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False, width=32))


@st.composite
def histories(draw):
    """metrics.jsonl lines: step lines (loss may be null: a skipped step), evaluation lines, events."""
    lines = []
    for step in range(1, draw(st.integers(1, 30)) + 1):
        lines.append({"step": step, "loss": draw(values), "lr": draw(st.floats(0, 1)),
                      "grad_norm": draw(values), "tokens_per_s": draw(st.floats(0, 1e6))})
        if draw(st.booleans()):
            lines.append({"step": step, "eval_loss": draw(st.floats(0, 20)), "tasks.f1@base": draw(st.floats(0, 1))})
        if draw(st.integers(0, 9)) == 0:
            lines.append({"step": step, "event": "rollback", "lr_scale": 0.5})
    return lines


@settings(max_examples=10, deadline=None)
@given(lines=histories())
def test_each_curve_has_a_vertex_for_each_metrics_line_with_a_value(lines):
    got = {series: n for chart in _drawn(lines).values() for series, n in chart.items()}
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "eval_loss", "tasks.f1@base"):
        want = sum(rec.get(key) is not None and math.isfinite(rec[key]) for rec in lines)
        assert got.get(key, 0) == want, key


hostile = st.lists(st.sampled_from(["<", ">", "&", "'", '"', "/", "=", " ", "a", "\u00e9", "\U0001f600",
                                     "<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "</td></table>",
                                     "' onload='x", "&amp;", "]]>", "<!--"]),
                   min_size=1, max_size=12).map("".join).filter(str.strip)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=hostile, warning=hostile, file_name=hostile, event=hostile, metric=hostile)
def test_every_user_string_is_escaped(tmp_path, value, warning, file_name, event, metric):
    lines = [{"step": 1, "loss": 1.0, "lr": 0.1, "grad_norm": 1.0, "tokens_per_s": 5.0},
             {"step": 1, metric: 0.5},
             {"step": 1, "event": "warning", "message": event}]
    run = _make_run(tmp_path, lines, {"base_model": value, "datasets": [{"path": file_name}]},
                    {"samples": 1, "per_file": {file_name: 1}, "warnings": [warning]})
    text = write_run_report(run).read_text()
    page = Page(text)
    # The page has only the tags the report writes, whatever the strings held ...
    assert page.tags <= {"html", "head", "meta", "link", "title", "style", "body", "h1", "h2", "p", "a", "div", "ul",
                         "li", "strong", "b", "table", "thead", "tbody", "tr", "th", "td", "details", "summary",
                         "svg", "defs", "g", "path", "clippath", "use", "text", "rect"}
    assert not any(a.startswith("javascript") for a in page.attrs)
    # ... and shows each of them as text.
    shown = "".join(page.text)
    for s in (value, warning, file_name, metric):
        assert s in shown
    assert json.dumps({"message": event}, ensure_ascii=False) in shown


def test_a_killed_runs_report_from_the_command(tmp_path, capsys):
    run = _make_run(tmp_path, [{"step": s, "loss": 1.0 / s, "lr": 0.1, "grad_norm": 1.0, "tokens_per_s": 9.0}
                               for s in range(1, 4)])
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "loss": 0.2')  # torn by the kill
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == f"run report: {run / 'report.html'}"
    page = Page((run / "report.html").read_text())
    assert _drawn(read_metrics(run / "metrics.jsonl")[0])["training loss"] == {"loss": 3}
    assert "metrics.jsonl: 1 line(s) could not be read and are left out" in "".join(page.text)
    assert not (run / "eval").exists() and "Evaluation report" not in "".join(page.text)


def test_the_command_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a training run of mistral-tune" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_training_writes_the_report(tmp_path):
    model, data = make_assets(tmp_path)
    train(config(model, data, tmp_path / "out", max_steps=4, val_set_size=8, report_to=[]), echo=lambda *a: None)
    assert not (tmp_path / "out" / "tensorboard").exists()  # report_to: [] -> metrics.jsonl only
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    drawn = _drawn(read_metrics(tmp_path / "out" / "metrics.jsonl")[0])
    assert drawn["training loss"] == {"loss": 4}
    assert drawn["eval_loss"] == {"eval_loss": sum("eval_loss" in rec for rec in lines)}
    text = "".join(Page((tmp_path / "out" / "report.html").read_text()).text)
    assert "outcome" in text and "complete" in text and "steps4 of 4" in text and "resumedno" in text


def test_the_summary_comes_first_and_the_config_is_folded_away(tmp_path):
    lines = [{"step": s, "loss": 2.0 / s, "lr": 0.0007519 * s, "grad_norm": 1.0, "tokens_per_s": 1000.0 + s}
             for s in range(1, 9)] + [{"step": 4, "eval_loss": 1.5}, {"step": 8, "eval_loss": 1.7}]
    run = _make_run(tmp_path, lines, {"datasets": [{"path": f"d{i}.jsonl"} for i in range(150)]})
    record_session(run, device="NVIDIA H100 80GB HBM3", processes=1, resumed_from=None)
    record_session(run, outcome="stopped by SIGTERM", step=4)
    record_session(run, device="NVIDIA H100 80GB HBM3", processes=1, resumed_from=4)  # then killed: no end line
    text = write_run_report(run).read_text()
    block = text[text.index("<div class='summary'>"):]
    items = dict(re.findall(r"<div><b>(.*?)</b>(.*?)</div>", block[:block.index("</div></div>")]))
    assert items["steps"] == "8 of 10" and items["resumed"] == "from step 4"
    assert items["outcome"].startswith("no end recorded") and items["device"] == "NVIDIA H100 80GB HBM3"
    assert items["best step"] == "4 (eval_loss 1.5)" and items["final loss"] == "0.25"
    assert items["tokens/s (median)"] == "1,004" and items["wall time"].endswith(" s")
    assert text.index("class='summary'") < text.index("<svg") < text.index("<details><summary>Config")
    assert text.count("datasets.") == 150 and text.index("datasets.0.path") > text.index("<details>")


def test_base_is_grey_and_tuned_blue_whichever_comes_first_and_ticks_are_round():
    lines = [{"step": s, "loss": 1.0, "lr": 0.0007519 * s / 3, "grad_norm": 1.0, "tokens_per_s": 1.0}
             for s in range(1, 4)]
    lines += [{"step": 2, "tasks.f1@base": 0.2, "tasks.f1": 0.3}, {"step": 3, "tasks.f1": 0.4}]  # base first
    fig = plots.line_panels(curves(lines))
    fig.canvas.draw()
    f1 = next(ax for ax in fig.axes if ax.get_title() == "tasks.f1")
    assert {line.get_label(): line.get_color() for line in f1.get_lines()} == {
        "tasks.f1@base": plots.BASE, "tasks.f1": plots.TUNED}
    lr = next(ax for ax in fig.axes if ax.get_title() == "learning rate")
    labels = [t.get_text() for t in lr.get_yticklabels() if t.get_text()]
    assert labels and all(len(re.sub(r"^0\.0*|\.|e-?\d+$", "", t).lstrip("0")) <= 2 for t in labels), labels
    plots.pyplot().close(fig)
    assert [plots.tick_label(v) for v in (0.0007519, 0.0002, 3e-05, 1234.5, 0.0)] == [
        "0.000752", "0.0002", "3e-5", "1.23e3", "0"]
