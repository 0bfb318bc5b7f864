"""The run report: output_dir/report.html, one self-contained page (curves drawn as inline SVG) built
from what the run wrote: metrics.jsonl, config.yaml, data_report.json, and a link to the evaluation
report (eval/report.html) when there is one. Written at the end of training, and by
`mistral-tune report RUN_DIR` from the files alone (a killed run too)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ..errors import OutputError
from ..evaluate.report import REPORT_HTML
from ..fsutil import atomic_write_text, output_kind
from ..htmlpage import esc, line_chart, page, table, warnings
from .trackers import flatten, numbers

RUN_REPORT = REPORT_HTML  # beside metrics.jsonl; the evaluation report links it as ../report.html
EVAL_REPORT = f"eval/{REPORT_HTML}"  # where evaluations during training write theirs
TRAIN_CURVES = {"loss": "training loss", "lr": "learning rate", "grad_norm": "gradient norm",
                "tokens_per_s": "tokens/s"}


def read_metrics(path: Path) -> tuple[list[dict], int]:
    """The lines of metrics.jsonl, and how many could not be read (a killed run's torn last line)."""
    lines, bad = [], 0
    text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            lines.append(rec)
        elif line.strip():
            bad += 1
    return lines, bad


def _kind(rec: dict) -> str:
    """A step line (it has the learning rate), an event (rollback, warning), or an evaluation line."""
    return "event" if "event" in rec else "train" if "lr" in rec else "eval"


def curves(lines: list[dict]) -> list[tuple[str, dict[str, list]]]:
    """(title, {series: [(step, value)]}) for each chart: the training curves over the step lines, then
    each evaluation metric over the lines that have it (a base model's NAME@base beside NAME)."""
    train = [r for r in lines if _kind(r) == "train"]
    charts = [(title, {key: [(r["step"], r.get(key)) for r in train]})
              for key, title in TRAIN_CURVES.items() if any(r.get(key) is not None for r in train)]
    evals = [r for r in lines if _kind(r) == "eval"]
    names = dict.fromkeys(k.partition("@")[0] for r in evals for k in numbers(r))
    for name in names:
        sides = dict.fromkeys(k for r in evals for k in numbers(r) if k.partition("@")[0] == name)
        charts.append((name, {side: [(r["step"], r[side]) for r in evals if side in r] for side in sides}))
    return charts


def render(run: Path, lines: list[dict], unreadable: int, config: dict | None, data: dict | None,
           eval_link: str | None) -> str:
    name = run.name
    train = [r for r in lines if _kind(r) == "train"]
    last = train[-1]["step"] if train else 0
    total = (config or {}).get("max_steps")
    parts = [f"<h1>Training run: {esc(name)}</h1>",
             f"<p class='note'>{esc(run)}; {len(lines)} metrics lines, last step {last}"
             + (f" of {esc(total)}" if total else "") + "</p>"]
    if eval_link:
        parts.append(f"<p><a href='{esc(eval_link)}'>Evaluation report</a></p>")
    notes = [f"metrics.jsonl: {unreadable} line(s) could not be read and are left out"] if unreadable else []
    parts.append(warnings(notes + list((data or {}).get("warnings", []))))
    charts = curves(lines)
    if charts:
        parts.append("<h2>Curves</h2><div class='charts'>"
                     + "".join(line_chart(title, series) for title, series in charts) + "</div>")
    events = [r for r in lines if _kind(r) == "event"]
    if events:
        parts.append("<h2>Events</h2>" + table(["step", "event", "details"], [
            [r["step"], r["event"], _json({k: v for k, v in r.items() if k not in ("step", "event")})]
            for r in events]))
    if data is not None:
        parts.append("<h2>Data</h2>" + table(["field", "value"], [
            [k, _json(v) if isinstance(v, dict | list) else v] for k, v in data.items() if k != "warnings"]))
    if config is not None:
        parts.append("<h2>Config</h2>" + table(["key", "value"], [[k, v] for k, v in flatten(config).items()]))
    return page(f"Training run: {name}", parts)


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def _load(path: Path, parse):
    try:
        return parse(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        raise OutputError(f"{path}: cannot be read ({exc})") from None


def write_run_report(run: str | Path) -> Path:
    """Write (or rewrite) RUN/report.html from the run's files; RUN must be a training run of ours."""
    run = Path(run).expanduser()
    if not run.is_dir() or output_kind(run) != "run":
        raise OutputError(f"{run}: not a training run of mistral-tune (it has no metrics.jsonl and config.yaml "
                          "written by a run); give a run's output_dir")
    target = run / RUN_REPORT
    if target.exists() and not target.is_file():
        raise OutputError(f"{target}: is not a file; mistral-tune writes the run report there. Move it away")
    lines, unreadable = read_metrics(run / "metrics.jsonl")
    config = _load(run / "config.yaml", yaml.safe_load)
    data = _load(run / "data_report.json", json.loads)
    eval_link = EVAL_REPORT if (run / EVAL_REPORT).is_file() else None
    text = render(run.resolve(), lines, unreadable, config if isinstance(config, dict) else None,
                  data if isinstance(data, dict) else None, eval_link)
    atomic_write_text(target, text)
    return target
