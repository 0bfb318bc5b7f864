"""Run logs: a JSONL metrics file, the experiment trackers (trackers.py), and a live progress bar.

A step line is written every `logging_steps` steps. Its `loss` is the mean over the steps since
the previous line, weighted by trained tokens (the window's summed token loss over its trained
tokens), `grad_norm` the mean of those steps' norms, `trained_tokens` their sum and `window_steps`
their number; `lr`, the throughput and the memory are the last step's. A skipped step gets a line of
its own, with its own values, and stays out of the window.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .trackers import FAILED, FINISHED, Trackers


class MetricsLog:
    def __init__(self, out_dir: Path, total_steps: int, enabled: bool = True, echo=print,
                 trackers: Trackers | None = None) -> None:
        self.enabled = enabled
        self.total = total_steps
        self.echo = echo
        self.path = out_dir / "metrics.jsonl"
        self._file = None
        self.trackers = trackers or Trackers(out_dir, [], echo)
        self._progress = None
        self._task = None
        self._window = _empty_window()
        self._started = time.monotonic()
        self._clock: tuple[float, int] | None = None  # (time, step) at this process's first step
        if not enabled:
            return
        self._file = self.path.open("a", encoding="utf-8")
        self.interactive = sys.stdout.isatty()

    def start(self) -> None:
        if not self.enabled or not self.interactive:
            return
        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        )
        self._task = self._progress.add_task("train", total=self.total, info="")
        self._progress.start()

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def train_step(self, record: dict, write: bool) -> None:
        if not self.enabled:
            return
        step = record["step"]
        if self._clock is None:
            self._clock = (time.monotonic(), step)
        skipped = bool(record.get("skipped"))
        if not skipped:  # running means: a window of one step holds exactly that step's values
            w = self._window
            w["tokens"] += record["trained_tokens"]
            w["steps"] += 1
            w["loss"] += (record["loss"] - w["loss"]) * (record["trained_tokens"] / max(w["tokens"], 1))
            w["grad_norm"] += (record["grad_norm"] - w["grad_norm"]) / w["steps"]
        if self._progress is not None:
            self._progress.update(self._task, completed=step, info=_info(record))
        if not write:
            return
        if not skipped:
            w = self._window
            record = {**record, "loss": w["loss"], "grad_norm": w["grad_norm"], "trained_tokens": w["tokens"],
                      "window_steps": w["steps"]}
            self._window = _empty_window()
        self._write(record)
        self.trackers.log("train", step, record)
        if self._progress is None:
            self.echo(f"step {step}/{self.total}  {_info(record)}  {self._times(step)}")

    def _times(self, step: int) -> str:
        """Time since the start, and the time left at the pace since this process's first step (which
        carries the compilation)."""
        t0, first = self._clock
        now = time.monotonic()
        eta = _clock((now - t0) / (step - first) * (self.total - step)) if step > first else "?"
        return f"elapsed {_clock(now - self._started)}  eta {eta}"

    def window_state(self) -> dict:
        """The steps since the last written line (a checkpoint keeps them, so a resumed run's next line
        averages the same steps)."""
        return dict(self._window)

    def load_window_state(self, state: dict | None) -> None:
        self._window = {**_empty_window(), **(state or {})}

    def event(self, record: dict) -> None:
        """A line for something that happened to the run (a rollback), not a training step."""
        if self.enabled:
            self._write(record)

    def eval(self, step: int, loss: float) -> None:
        ppl = math.exp(min(loss, 50.0))
        self.metrics(step, {"eval_loss": loss, "eval_ppl": ppl}, f"held-out loss {loss:.4f}, perplexity {ppl:.2f}",
                     kind="heldout")

    def metrics(self, step: int, values: dict[str, float], message: str | None = None, kind: str = "eval") -> None:
        """One line of named evaluation metrics (a base model's value named NAME@base). kind: the trackers'
        name for this kind of line (the held-out loss and the eval: section's metrics share their steps)."""
        if not self.enabled:
            return
        self._write({"step": step, **values})
        self.trackers.log(kind, step, values)
        if message is None:
            return
        msg = f"step {step}: {message}"
        if self._progress is not None:
            self._progress.console.print(msg)
        else:
            self.echo(msg)

    def close(self) -> None:
        """The file and the progress bar; after an error, the trackers too (else finish ends them)."""
        if self._progress is not None:
            self._progress.stop()
        if self._file is not None:
            self._file.close()
        if sys.exc_info()[0] is not None:
            self.trackers.close(status=FAILED)

    def finish(self, artifacts: list[Path] = (), status: str = FINISHED, signal_name: str | None = None) -> None:
        """The trackers get the run's artifacts (those that exist) and end their runs as `status`."""
        self.trackers.close(artifacts, status, signal_name)


def _info(record: dict) -> str:
    loss = "skipped" if record.get("skipped") else f"loss {record['loss']:.4f}  grad norm {record['grad_norm']:.3g}"
    return (f"{loss}  lr {record['lr']:.2e}  {record['tokens_per_s']:,.0f} tok/s  "
            f"mem {record['peak_mem_gib']:.2f} GiB")


def _empty_window() -> dict:
    return {"loss": 0.0, "tokens": 0, "grad_norm": 0.0, "steps": 0}


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"
