"""Experiment trackers (`report_to`): TensorBoard, Weights & Biases, MLflow. One class per library.

Each tracker receives, from rank 0 only:
- once, the run's parameters: the config flattened (`lora_r`, `datasets.0.path`), the run's derived
  hyper-parameters (`run.total_steps`, `run.rows_per_step`, ...) and the data report's counts
  (`data.samples`, ...); MLflow and W&B also get the whole config.yaml and data_report.json;
- every metrics.jsonl line, under the same names at the same step numbers: the step lines (loss, lr,
  grad_norm, tokens_per_s, peak_mem_gib, gpu_util on CUDA, ...) and the evaluation lines (eval_loss,
  task metrics, NAME@base); TensorBoard keeps its train/, eval/ and base/ tags;
- at the end, the final adapter (or model) directory as an artifact.

Resume. trackers.json in the run directory keeps each tracker's run id, so a resumed run continues
the same W&B and MLflow run, and the last step each has received. A killed run may have sent steps
after the checkpoint the resumed run starts from; those steps are not sent again (W&B and MLflow
keep the values the killed run sent, which exact resume reproduces; the timings may differ).
TensorBoard instead hides the killed run's later events (purge_step) and gets the steps again.
"""

from __future__ import annotations

import json
import os
import re
from abc import ABC, abstractmethod
from pathlib import Path

import yaml

from ..errors import ConfigError
from ..fsutil import atomic_write_text

TRACKERS = ("tensorboard", "wandb", "mlflow")
STATE = "trackers.json"
_PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}  # tracker -> module (TensorBoard is a dependency)


def check_trackers(report_to: list[str]) -> None:
    """ConfigError now, before anything is written, when a tracker's package is missing."""
    for name in report_to:
        if name not in _PACKAGES:
            continue
        try:
            __import__(_PACKAGES[name])
        except ImportError:
            raise ConfigError(f"report_to: {name} needs the {_PACKAGES[name]} package: "
                              f"pip install 'mistral-tune[{name}]' (or leave {name} out of report_to)") from None


def flatten(value, prefix: str = "") -> dict[str, object]:
    """Nested dicts and lists as one level of dotted keys (`datasets.0.path`); an empty one as itself."""
    if isinstance(value, dict) and value:
        items = value.items()
    elif isinstance(value, list | tuple) and value:
        items = enumerate(value)
    else:
        return {prefix: value}
    out: dict[str, object] = {}
    for key, item in items:
        out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


def numbers(record: dict) -> dict[str, float]:
    """The numeric values of a metrics line, without its step."""
    return {k: v for k, v in record.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}


class Tracker(ABC):
    """One library's run: parameters once, then metrics lines, then the final weights, then close.

    `sent` (None: no skipping) is the last step of each kind of line ("train", "eval") this run has
    received; on resume, lines at or before it are not sent again."""

    name = ""

    def __init__(self, run_id: str | None = None, sent: dict | None = None) -> None:
        self.run_id = run_id
        self.sent = dict(sent or {})

    def log(self, kind: str, step: int, record: dict) -> bool:
        """Send one metrics line; False when this run already has it."""
        if self.sent is not None and step <= self.sent.get(kind, 0):
            return False
        self._send(kind, step, record)
        if self.sent is not None:
            self.sent[kind] = step
        return True

    def state(self) -> dict:
        return {"run_id": self.run_id, "sent": self.sent}

    def params(self, params: dict, files: dict[str, str]) -> None:  # noqa: B027 (optional: not every library keeps them)
        """The flat parameters, and whole files (name -> text) for the libraries that keep them."""

    @abstractmethod
    def _send(self, kind: str, step: int, record: dict) -> None:
        """One metrics line to the library."""

    def artifact(self, path: Path) -> None:  # noqa: B027 (optional: not every library keeps files)
        """The final adapter or model directory."""

    @abstractmethod
    def close(self, failed: bool) -> None:
        """End the library's run, marked failed or finished."""


class TensorBoard(Tracker):
    name = "tensorboard"
    TRAIN = ("loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_gib")

    def __init__(self, out: Path, resumed_at: int | None) -> None:
        super().__init__()
        self.sent = None  # purge_step hides a killed run's later events; the steps come again
        from torch.utils.tensorboard import SummaryWriter

        purge = resumed_at + 1 if resumed_at is not None else None
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=purge)

    def _send(self, kind: str, step: int, record: dict) -> None:
        if kind == "train":
            for key in self.TRAIN:
                if record.get(key) is not None:  # a skipped step's non-finite loss is logged as null
                    self.writer.add_scalar(f"train/{key}", record[key], step)
            return
        for name, value in numbers(record).items():  # a base model's value, NAME@base, under base/NAME
            metric, _, side = name.partition("@")
            self.writer.add_scalar(f"{side or 'eval'}/{metric.removeprefix('eval_')}", value, step)

    def close(self, failed: bool) -> None:
        self.writer.close()


class Wandb(Tracker):
    """A W&B run in output_dir/wandb; WANDB_MODE=offline keeps it there (`wandb sync` uploads it later)."""

    name = "wandb"

    def __init__(self, out: Path, run_id: str | None, sent: dict | None) -> None:
        import wandb

        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "mistral-tune", name=out.name,
                                  dir=str(out), id=run_id, resume="allow" if run_id else None,
                                  settings=wandb.Settings(console="off", silent=True))
        except Exception as exc:  # no login, no network: say how to log locally
            raise ConfigError(f"report_to: wandb: could not start a run ({exc}); set WANDB_MODE=offline to keep "
                              "it in output_dir, or log in with `wandb login`") from None
        self.out = out
        super().__init__(self.run.id, sent)

    def params(self, params: dict, files: dict[str, str]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def _send(self, kind: str, step: int, record: dict) -> None:
        self.run.log(numbers(record), step=step)

    def artifact(self, path: Path) -> None:
        import wandb

        art = wandb.Artifact(re.sub(r"[^\w.-]", "_", f"{self.out.name}-{path.name}"), type="model")
        art.add_dir(str(path), policy="immutable")  # referenced, not copied into a staging area
        self.run.log_artifact(art)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class Mlflow(Tracker):
    """An MLflow run in the store `mlflow_tracking_uri` (or MLFLOW_TRACKING_URI) names; by default a
    SQLite store, output_dir/mlflow.db, with artifacts in output_dir/mlartifacts."""

    name = "mlflow"
    PARAM_BATCH = 100  # MLflow takes at most 100 parameters a call
    VALUE_MAX = 6000  # and values of at most 6000 characters (the full text is in the config.yaml artifact)

    def __init__(self, out: Path, uri: str | None, run_id: str | None, sent: dict | None) -> None:
        from mlflow import MlflowClient

        own = not (uri or os.environ.get("MLFLOW_TRACKING_URI"))
        self.client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}" if own else uri)
        if run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "mistral-tune"
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(
                name, artifact_location=(out / "mlartifacts").as_uri() if own else None)
            run_id = self.client.create_run(exp_id, run_name=out.name).info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
        super().__init__(run_id, sent)

    def params(self, params: dict, files: dict[str, str]) -> None:
        from mlflow.entities import Param

        known = self.client.get_run(self.run_id).data.params  # a resumed run keeps its first values
        new = [Param(re.sub(r"[^\w./ -]", "_", k), str(v)[:self.VALUE_MAX]) for k, v in params.items()]
        new = [p for p in new if p.key not in known]
        for i in range(0, len(new), self.PARAM_BATCH):
            self.client.log_batch(self.run_id, params=new[i:i + self.PARAM_BATCH])
        for name, text in files.items():
            self.client.log_text(self.run_id, text, name)

    def _send(self, kind: str, step: int, record: dict) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in numbers(record).items()])

    def artifact(self, path: Path) -> None:
        self.client.log_artifacts(self.run_id, str(path), path.name)

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class Trackers:
    """The run's trackers, fed by MetricsLog. A tracker that fails is reported once and dropped; the
    run and metrics.jsonl go on."""

    def __init__(self, out: Path, items: list[Tracker], echo=print) -> None:
        self.out, self.items, self.echo = out, items, echo

    @classmethod
    def open(cls, cfg, out: Path, resumed_at: int | None, params: dict, files: dict[str, str],
             echo=print) -> Trackers:
        """Start (or, on resume, continue) a run in each tracker of cfg.report_to and give it the parameters."""
        state = {}
        if cfg.resume is not None and (out / STATE).is_file():
            state = json.loads((out / STATE).read_text())
        items: list[Tracker] = []
        self = cls(out, items, echo)
        try:
            for name in cfg.report_to:
                if name == "tensorboard":
                    try:
                        items.append(TensorBoard(out, resumed_at))
                    except ImportError:  # a dependency, but a broken install should not stop training
                        echo("tensorboard is not importable; writing metrics.jsonl only")
                    continue
                old = state.get(name, {})
                items.append(Wandb(out, old.get("run_id"), old.get("sent")) if name == "wandb" else
                             Mlflow(out, cfg.mlflow_tracking_uri, old.get("run_id"), old.get("sent")))
            self._save()
            self._each(lambda t: t.params(params, files))
        except BaseException:
            self.close(failed=True)
            raise
        return self

    def _each(self, call) -> bool:
        changed = False
        for t in list(self.items):
            try:
                changed |= call(t) is not False
            except Exception as exc:
                self.echo(f"report_to: {t.name} failed ({type(exc).__name__}: {exc}); no more goes to it")
                self.items.remove(t)
        return changed

    def _save(self) -> None:
        state = {t.name: t.state() for t in self.items if t.sent is not None}
        if state:
            atomic_write_text(self.out / STATE, json.dumps(state, indent=1) + "\n")

    def log(self, kind: str, step: int, record: dict) -> None:
        if self._each(lambda t: t.log(kind, step, record)):
            self._save()

    def close(self, final: Path | None = None, failed: bool = False) -> None:
        """Send the final weights (when there are), and end each tracker's run."""
        if final is not None:
            self._each(lambda t: t.artifact(final))
        for t in self.items:
            try:
                t.close(failed)
            except Exception as exc:
                self.echo(f"report_to: {t.name} could not close its run ({type(exc).__name__}: {exc})")
        self.items = []


def run_files(cfg, report: dict) -> dict[str, str]:
    """The whole config and data report, for the trackers that keep files."""
    return {"config.yaml": yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False),
            "data_report.json": json.dumps(report, indent=2) + "\n"}


def run_params(cfg, report: dict, hparams: dict) -> dict:
    """The flat parameters every tracker gets: config, derived hyper-parameters (run.*) and the data
    report's counts and warnings (data.*)."""
    return {**flatten(cfg.model_dump(mode="json")), **flatten(hparams, "run"), **flatten(report, "data")}
