"""Run logs: a JSONL metrics file, TensorBoard event files, and a live progress bar."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class MetricsLog:
    def __init__(self, out_dir: Path, total_steps: int, enabled: bool = True, echo=print,
                 purge_after: int | None = None) -> None:
        self.enabled = enabled
        self.total = total_steps
        self.echo = echo
        self.path = out_dir / "metrics.jsonl"
        self._file = None
        self._tb = None
        self._progress = None
        self._task = None
        if not enabled:
            return
        self._file = self.path.open("a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            # On resume, hide the events a killed run wrote after its checkpoint (TensorBoard's purge_step).
            purge = purge_after + 1 if purge_after is not None else None
            self._tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=purge)
        except ImportError:  # tensorboard is a dependency, but a broken install should not stop training
            self.echo("tensorboard is not importable; writing metrics.jsonl only")
        self.interactive = sys.stdout.isatty()

    def start(self) -> None:
        if not self.enabled or not self.interactive:
            return
        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
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
        loss = "skipped" if record.get("skipped") else f"loss {record['loss']:.4f}"
        info = (f"{loss}  lr {record['lr']:.2e}  {record['tokens_per_s']:,.0f} tok/s  "
                f"mem {record['peak_mem_gib']:.2f} GiB")
        if self._progress is not None:
            self._progress.update(self._task, completed=step, info=info)
        if write:
            self._write(record)
            if self._tb is not None:
                for key in ("loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_gib"):
                    if record[key] is not None:  # a skipped step's non-finite loss is logged as null
                        self._tb.add_scalar(f"train/{key}", record[key], step)
            if self._progress is None:
                self.echo(f"step {step}/{self.total}  {info}")

    def event(self, record: dict) -> None:
        """A line for something that happened to the run (a rollback), not a training step."""
        if self.enabled:
            self._write(record)

    def eval(self, step: int, loss: float) -> None:
        ppl = math.exp(min(loss, 50.0))
        self.metrics(step, {"eval_loss": loss, "eval_ppl": ppl}, f"held-out loss {loss:.4f}, perplexity {ppl:.2f}")

    def metrics(self, step: int, values: dict[str, float], message: str | None = None) -> None:
        """One line of named evaluation metrics; in TensorBoard under eval/NAME (a base model's
        value, named NAME@base, under base/NAME)."""
        if not self.enabled:
            return
        self._write({"step": step, **values})
        if self._tb is not None:
            for name, value in values.items():
                metric, _, side = name.partition("@")
                self._tb.add_scalar(f"{side or 'eval'}/{metric.removeprefix('eval_')}", value, step)
        if message is None:
            return
        msg = f"step {step}: {message}"
        if self._progress is not None:
            self._progress.console.print(msg)
        else:
            self.echo(msg)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()
