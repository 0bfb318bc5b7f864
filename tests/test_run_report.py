"""The run report (output_dir/report.html): curves point for point, escaping, the `report` command."""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _runs import config, make_assets
from mistral_tune.cli import main
from mistral_tune.fsutil import mark_output
from mistral_tune.train.loop import train
from mistral_tune.train.report import write_run_report


class Page(HTMLParser):
    """The tags, the text, and the charts' curves (title -> series -> vertices) of a report."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: set[str] = set()
        self.text: list[str] = []
        self.attrs: list[str] = []
        self.curves: dict[str, dict[str, int]] = {}
        self._title: str | None = None
        self._in_title = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.attrs += [v for _, v in attrs if v]
        if tag == "svg":
            self._title = None
        self._in_title = tag == "title"
        if tag == "polyline":
            a = dict(attrs)
            series = self.curves.setdefault(self._title, {})
            series[a["data-series"]] = series.get(a["data-series"], 0) + len(a["points"].split())

    def handle_endtag(self, tag):
        self._in_title = False

    def handle_data(self, data):
        if self._in_title and self._title is None and "svg" in self.tags:
            self._title = data
        self.text.append(data)


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


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=histories())
def test_each_curve_has_a_vertex_for_each_metrics_line_with_a_value(tmp_path, lines):
    page = Page(write_run_report(_make_run(tmp_path, lines)).read_text())
    got = {series: n for chart in page.curves.values() for series, n in chart.items()}
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "eval_loss", "tasks.f1@base"):
        want = sum(rec.get(key) is not None and math.isfinite(rec[key]) for rec in lines)
        assert got.get(key, 0) == want, key


hostile = st.lists(st.sampled_from(["<", ">", "&", "'", '"', "/", "=", " ", "a", "\u00e9", "\U0001f600",
                                     "<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "</td></table>",
                                     "' onload='x", "&amp;", "]]>", "<!--"]),
                   min_size=1, max_size=12).map("".join).filter(str.strip)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
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
                         "li", "strong", "table", "thead", "tbody", "tr", "th", "td", "svg", "text", "rect", "line",
                         "polyline", "circle"}
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
    assert page.curves["training loss"] == {"loss": 3}
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
    page = Page((tmp_path / "out" / "report.html").read_text())
    assert page.curves["training loss"] == {"loss": 4}
    assert page.curves["eval_loss"] == {"eval_loss": sum("eval_loss" in rec for rec in lines)}
