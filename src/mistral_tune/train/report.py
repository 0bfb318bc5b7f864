"""The run report: output_dir/report.html, one self-contained page built from what the run wrote:
metrics.jsonl, config.yaml, data_report.json, sessions.jsonl (when each start of the run began and
ended, on what device, resumed from which step), and a link to the evaluation report
(eval/report.html) when there is one. A summary first, the curves (plots.py, inline SVG), events and
data; the config folded away. Written at the end of training, and by `mistral-tune report RUN_DIR`
from the files alone (a killed run too)."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import yaml

from .. import plots
from ..errors import OutputError
from ..evaluate.report import REPORT_HTML, REPORT_JSON
from ..fsutil import atomic_write_text, output_kind
from ..htmlpage import esc, page, summary, table, warnings
from .trackers import flatten, numbers

RUN_REPORT = REPORT_HTML  # beside metrics.jsonl; the evaluation report links it as ../report.html
EVAL_REPORT = f"eval/{REPORT_HTML}"  # where evaluations during training write theirs
SESSIONS = "sessions.jsonl"  # a line when the run starts (or resumes) and one when it ends
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


def record_session(run: Path, **fields) -> None:
    """Append a line to RUN/sessions.jsonl: {"start": unix time, "device", "processes", "resumed_from"}
    when the run starts, {"end": unix time, "outcome", "step"} when it ends (a killed run has none)."""
    with (Path(run) / SESSIONS).open("a", encoding="utf-8") as f:
        f.write(json.dumps({("start" if "device" in fields else "end"): time.time(), **fields}) + "\n")


def read_sessions(run: Path) -> list[dict]:
    """The starts of the run, each with its end when one was written (a torn line is left out)."""
    sessions: list[dict] = []
    path = run / SESSIONS
    for line in (path.read_text(encoding="utf-8", errors="replace").splitlines() if path.is_file() else []):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "start" in rec:
            sessions.append(rec)
        elif isinstance(rec, dict) and "end" in rec and sessions and "end" not in sessions[-1]:
            sessions[-1].update(end=rec["end"], outcome=rec.get("outcome"))
    return sessions


def summary_items(run: Path, lines: list[dict], config: dict | None, best: dict | None) -> list[tuple[str, object]]:
    """The figures a reader wants first: how it ended, steps, time, speed, where, the best and last values."""
    train = [r for r in lines if _kind(r) == "train"]
    last = train[-1]["step"] if train else 0
    total = (config or {}).get("max_steps")
    sessions = read_sessions(run)
    latest = run / "metrics.jsonl"
    ended = latest.stat().st_mtime if latest.is_file() else None
    wall = sum(s.get("end", ended if s is sessions[-1] and ended else s["start"]) - s["start"] for s in sessions)
    outcome = (sessions[-1].get("outcome") or "no end recorded (killed, or still running)") if sessions else "–"
    resumed = [s["resumed_from"] for s in sessions if s.get("resumed_from") is not None]
    speeds = [r["tokens_per_s"] for r in train if isinstance(r.get("tokens_per_s"), int | float)]
    items: list[tuple[str, object]] = [
        ("outcome", outcome), ("steps", f"{last} of {total}" if total else last),
        ("wall time", _duration(wall) if sessions else "–"),
        ("resumed", "no" if not resumed else "from step " + ", ".join(map(str, resumed))),
        ("device", ", ".join(dict.fromkeys(f"{s['device']}" + (f" x {s['processes']}" if s.get("processes", 1) > 1
                                                                    else "") for s in sessions)) or "–"),
        ("tokens/s (median)", f"{statistics.median(speeds):,.0f}" if speeds else "–"),
    ]
    if best:
        items.append(("best step", f"{best['step']} ({best['metric']} {plots.tick_label(best['value'])})"))
    # The last training loss and the last value of each evaluation metric (tuned; the base's are in its report).
    losses = [r["loss"] for r in train if isinstance(r.get("loss"), int | float)]
    finals = {"loss": losses[-1]} if losses else {}
    finals |= {k: v for r in lines if _kind(r) == "eval" for k, v in numbers(r).items() if "@" not in k}
    items += [(f"final {k}", plots.tick_label(v)) for k, v in list(finals.items())[:8]]
    return items


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    return (f"{h} h " if h else "") + f"{rest // 60} min {rest % 60} s"


def _best(run: Path, lines: list[dict]) -> dict | None:
    """The evaluation report's best checkpoint, or else the step with the lowest held-out loss."""
    report = _load(run / EVAL_REPORT.replace(REPORT_HTML, REPORT_JSON), json.loads)
    if isinstance(report, dict) and isinstance(report.get("best"), dict):
        return report["best"]
    evals = [r for r in lines if isinstance(r.get("eval_loss"), int | float)]
    if not evals:
        return None
    low = min(evals, key=lambda r: r["eval_loss"])
    return {"step": low["step"], "metric": "eval_loss", "value": low["eval_loss"]}


def render(run: Path, lines: list[dict], unreadable: int, config: dict | None, data: dict | None,
           eval_link: str | None) -> str:
    name = run.name
    parts = [f"<h1>Training run: {esc(name)}</h1>", f"<p class='note'>{esc(run)}; {len(lines)} metrics lines</p>",
             summary(summary_items(run, lines, config, _best(run, lines)))]
    if eval_link:
        parts.append(f"<p><a href='{esc(eval_link)}'>Evaluation report</a></p>")
    notes = [f"metrics.jsonl: {unreadable} line(s) could not be read and are left out"] if unreadable else []
    parts.append(warnings(notes + list((data or {}).get("warnings", []))))
    charts = curves(lines)
    if charts:
        parts.append("<h2>Curves</h2>" + plots.svg(plots.line_panels(charts)))
    events = [r for r in lines if _kind(r) == "event"]
    if events:
        parts.append("<h2>Events</h2>" + table(["step", "event", "details"], [
            [r["step"], r["event"], _json({k: v for k, v in r.items() if k not in ("step", "event")})]
            for r in events]))
    if data is not None:
        parts.append("<h2>Data</h2>" + table(["field", "value"], [
            [k, _json(v) if isinstance(v, dict | list) else v] for k, v in data.items() if k != "warnings"]))
    if config is not None:  # long (every key): folded away
        parts.append("<details><summary>Config (config.yaml)</summary>"
                     + table(["key", "value"], [[k, v] for k, v in flatten(config).items()]) + "</details>")
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
