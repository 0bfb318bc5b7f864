"""Experiment trackers (`report_to`): TensorBoard, Weights & Biases, MLflow. One class per library.

Each tracker receives, from rank 0 only:
- once, the run's parameters: the config flattened (`lora_r`, `datasets.0.path`), the run's derived
  hyper-parameters (`run.total_steps`, `run.rows_per_step`, ...) and the data report's counts
  (`data.samples`, ...); MLflow and W&B also get the whole config.yaml and data_report.json as files;
- every metrics.jsonl line at its step: the step lines (loss, lr, grad_norm, tokens_per_s,
  peak_mem_gib, gpu_util on CUDA, ...), the held-out loss lines and the evaluation lines (task,
  forgetting and needle metrics, a base model's value as NAME@base), during training and at its end;
- at the end, the final adapter (or model) directory, best/ when an evaluation kept one, and the
  evaluation report folder, as artifacts; then its run is closed as finished, stopped (a stop
  request: the run can resume) or failed (an error ended the run).

Names. W&B and MLflow get each name through `tracker_name`: every run of characters other than ASCII
letters, digits and `_` becomes one `_`, a name starting with a digit gets a `_` in front, and a name
longer than 250 characters is cut, ending in a hash of the whole (`tasks.exact_match@base` ->
`tasks_exact_match_base`, `datasets.0.path` -> `datasets_0_path`). That is W&B's pattern for names
it can sort and filter on (`[_a-zA-Z][_a-zA-Z0-9]*`), which MLflow's rule (letters, digits, `_ - . /
:` and spaces, no path tricks, at most 250 characters) also accepts. TensorBoard keeps its train/,
eval/ and base/ tags.

Failures. What can be checked before a run (`check_trackers`: the package, the MLflow store, W&B's
own checks of the project, group and tags) stops it with a ConfigError, before anything is loaded;
`validate` runs the same checks. A tracker that fails later (it cannot start, a call raises) is
reported in one line, closed as failed where it can be, and dropped; the run, metrics.jsonl and the
other trackers go on.

Resume. trackers.json in the run directory keeps each tracker's run id, so a resumed run continues
the same W&B and MLflow run, and the last step each kind of line (train, held-out loss, evaluation)
has reached it. A killed run may have sent steps after the checkpoint the resumed run starts from;
those steps are not sent again (W&B and MLflow keep the values the killed run sent, which exact
resume reproduces; the timings may differ). TensorBoard instead hides the killed run's later events
(purge_step) and gets the steps again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
from abc import ABC, abstractmethod
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import yaml

from ..errors import ConfigError
from ..fsutil import atomic_write_text

TRACKERS = ("tensorboard", "wandb", "mlflow")
STATE = "trackers.json"
_PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}  # tracker -> module (TensorBoard is a dependency)
FINISHED, STOPPED, FAILED = "finished", "stopped", "failed"  # how a run ends, as each tracker records it
NAME_MAX = 250  # MLflow's longest key
DEFAULT_PROJECT = "mistral-tune"  # the W&B project and the MLflow experiment when none is named


def tracker_name(name: str) -> str:
    """The name W&B and MLflow get for one of ours (the module docstring states the rule)."""
    out = re.sub(r"[^A-Za-z0-9_]+", "_", name)
    if not out or out[0].isdigit():
        out = "_" + out
    if len(out) > NAME_MAX:
        out = out[:NAME_MAX - 9] + "_" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return out


def tracker_names(values: dict) -> dict:
    """`values` under tracker_name's names."""
    return {tracker_name(k): v for k, v in values.items()}


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one short line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    text = text[0] if text else ""
    return f"{type(exc).__name__}: {text[:limit]}" if text else type(exc).__name__


# ---------------------------------------------------------------------- settings, checked before a run


def wandb_settings(cfg) -> dict:
    """wandb.init's project, entity, group and tags: the config's keys, else W&B's environment variables
    (WANDB_PROJECT, WANDB_ENTITY, WANDB_RUN_GROUP, WANDB_TAGS, which wandb reads itself)."""
    return {"project": cfg.wandb_project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
            "entity": cfg.wandb_entity, "group": cfg.wandb_group, "tags": list(cfg.wandb_tags) or None}


def mlflow_settings(cfg) -> tuple[str | None, str, str]:
    """(tracking URI or None for the run's own store, where it was set, experiment name): the config's
    keys, else MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_NAME."""
    if cfg.mlflow_tracking_uri:
        uri, where = cfg.mlflow_tracking_uri, "mlflow_tracking_uri"
    else:
        uri, where = os.environ.get("MLFLOW_TRACKING_URI") or None, "MLFLOW_TRACKING_URI (environment)"
    name = cfg.mlflow_experiment_name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
    return uri, where, name


def check_trackers(cfg) -> list[str]:
    """ConfigError now, before anything is loaded or written, for a tracker whose package is missing or
    whose settings its library would refuse; else one line a tracker saying where its run will go."""
    lines = []
    for name in cfg.report_to:
        if name in _PACKAGES:
            try:
                __import__(_PACKAGES[name])
            except ImportError:
                raise ConfigError(f"report_to: {name} needs the {_PACKAGES[name]} package: pip install "
                                  f"'mistral-tune[{name}]' (or leave {name} out of report_to)") from None
        if name == "wandb":
            lines.append(_check_wandb(cfg))
        elif name == "mlflow":
            lines.append(_check_mlflow(cfg))
    return lines


def _check_wandb(cfg) -> str:
    """W&B's own checks (wandb.Settings) of each key, reported under the key's name."""
    import wandb

    s = wandb_settings(cfg)
    for key, field, value in (("wandb_project", "project", s["project"]), ("wandb_entity", "entity", s["entity"]),
                              ("wandb_group", "run_group", s["group"]), ("wandb_tags", "run_tags", s["tags"])):
        if value is None:
            continue
        try:
            wandb.Settings(**{field: tuple(value) if field == "run_tags" else value})
        except Exception as exc:
            why = str(exc).strip().splitlines()
            why = next((w.strip() for w in why if "error" in w.lower() and "validation error" not in w), why[0])
            raise ConfigError(f"{key}: {value!r}: W&B refuses it ({why})") from None
    mode = os.environ.get("WANDB_MODE", "online")
    where = "kept in output_dir/wandb (WANDB_MODE=offline)" if mode in ("offline", "dryrun") else f"mode {mode}"
    return f"wandb: project {s['project']}" + (f", entity {s['entity']}" if s["entity"] else "") + f", {where}"


def _check_mlflow(cfg) -> str:
    """The store an MLflow run would go to, checked as far as can be without writing to it."""
    uri, where, experiment = mlflow_settings(cfg)
    if uri is None:
        return f"mlflow: experiment {experiment} in output_dir/mlflow.db (artifacts in output_dir/mlartifacts)"
    scheme = urlparse(uri).scheme.lower()
    if scheme in ("", "file") and _file_store_refused():
        path = (urlparse(uri).path if scheme else uri).rstrip("/")
        raise ConfigError(
            f"{where}: {uri} is an MLflow file store, which this MLflow refuses (its file backend is in "
            f"maintenance mode); use a SQLite store, e.g. mlflow_tracking_uri: sqlite:///"
            f"{PurePosixPath(path) if path.strip('./') else 'mlruns'}.db, or leave the key out for "
            "output_dir/mlflow.db, or set MLFLOW_ALLOW_FILE_STORE=true to keep the file store")
    if scheme == "sqlite":
        path = uri[len("sqlite:///"):].split("?")[0] if uri.lower().startswith("sqlite:///") else ""
        if not path or path == ":memory:":
            raise ConfigError(f"{where}: {uri}: name the database file, e.g. sqlite:///mlflow.db (a store in "
                              "memory ends with the run)")
        folder = Path(path).expanduser().parent
        if not folder.is_dir():
            raise ConfigError(f"{where}: {uri}: the folder {folder} does not exist; create it or name another")
    return f"mlflow: experiment {experiment} in {uri}"


def _file_store_refused() -> bool:
    """True where this MLflow refuses its file store (3.x, unless MLFLOW_ALLOW_FILE_STORE is set)."""
    from mlflow import environment_variables

    allowed = getattr(environment_variables, "MLFLOW_ALLOW_FILE_STORE", None)  # absent: the file store works
    return allowed is not None and not allowed.get()


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
    """One library's run: parameters once, then metrics lines, then artifacts, then close.

    `sent` (None: no skipping) is the last step of each kind of line ("train", "heldout", "eval") this
    run has received; on resume, lines of a kind at or before it are not sent again."""

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
        """A directory (an adapter or model, the evaluation report) or a file of the run."""

    @abstractmethod
    def close(self, status: str, signal_name: str | None = None) -> None:
        """End the library's run as FINISHED, STOPPED (by signal_name, resumable) or FAILED."""


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

    def close(self, status: str, signal_name: str | None = None) -> None:
        self.writer.close()


class Wandb(Tracker):
    """A W&B run in output_dir/wandb; WANDB_MODE=offline keeps it there (`wandb sync` uploads it later)."""

    name = "wandb"

    def __init__(self, cfg, out: Path, run_id: str | None, sent: dict | None) -> None:
        import wandb

        try:
            self.run = wandb.init(**wandb_settings(cfg), name=out.name, dir=str(out), id=run_id,
                                  resume="allow" if run_id else None,
                                  settings=wandb.Settings(console="off", silent=True))
        except Exception as exc:  # no login, no network: say how to log locally
            raise RuntimeError(f"could not start a run ({first_line(exc)}); set WANDB_MODE=offline to keep it in "
                               "output_dir, or log in with `wandb login`") from None
        self.out = out
        super().__init__(self.run.id, sent)

    def params(self, params: dict, files: dict[str, str]) -> None:
        self.run.config.update(tracker_names(params), allow_val_change=True)
        for name, text in files.items():  # into the run's files folder, which W&B keeps with the run
            path = Path(self.run.dir) / name
            path.write_text(text)
            self.run.save(str(path), base_path=self.run.dir, policy="now")

    def _send(self, kind: str, step: int, record: dict) -> None:
        self.run.log(tracker_names(numbers(record)), step=step)

    def artifact(self, path: Path) -> None:
        import wandb

        kind = "model" if (path / "config.json").is_file() or (path / "adapter_config.json").is_file() else "report"
        art = wandb.Artifact(re.sub(r"[^\w.-]", "_", f"{self.out.name}-{path.name}"), type=kind)
        path = path.resolve()  # a later `wandb sync` may run from another directory
        if path.is_dir():
            art.add_dir(str(path), policy="immutable")  # referenced, not copied into a staging area
        else:
            art.add_file(str(path), policy="immutable")
        self.run.log_artifact(art)

    def close(self, status: str, signal_name: str | None = None) -> None:
        if status == STOPPED:  # W&B's resumable stop: preempting, and the signal's exit code (128 + number)
            self.run.mark_preempting()
            number = getattr(signal.Signals, signal_name or "", signal.SIGTERM)
            self.run.finish(exit_code=128 + int(number))
        else:
            self.run.finish(exit_code=0 if status == FINISHED else 1)


class Mlflow(Tracker):
    """An MLflow run in the store mlflow_tracking_uri (or MLFLOW_TRACKING_URI) names; by default a
    SQLite store, output_dir/mlflow.db, with artifacts in output_dir/mlartifacts."""

    name = "mlflow"
    PARAM_BATCH = 100  # MLflow takes at most 100 parameters a call
    VALUE_MAX = 6000  # and values of at most 6000 characters (the full text is in the config.yaml artifact)
    STATUS = {FINISHED: "FINISHED", STOPPED: "KILLED", FAILED: "FAILED"}

    def __init__(self, cfg, out: Path, run_id: str | None, sent: dict | None) -> None:
        from mlflow import MlflowClient

        uri, _, experiment = mlflow_settings(cfg)
        out = out.resolve()  # a relative output_dir has no file URI
        self.client = MlflowClient(uri or f"sqlite:///{out / 'mlflow.db'}")
        if run_id is None:
            exp = self.client.get_experiment_by_name(experiment)
            if exp is not None and exp.lifecycle_stage == "deleted":
                raise RuntimeError(f"the experiment {experiment} is deleted in {uri}; restore it "
                                   "(mlflow experiments restore) or name another in mlflow_experiment_name")
            exp_id = exp.experiment_id if exp else self.client.create_experiment(
                experiment, artifact_location=None if uri else (out / "mlartifacts").as_uri())
            run_id = self.client.create_run(exp_id, run_name=out.name).info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
        super().__init__(run_id, sent)

    def params(self, params: dict, files: dict[str, str]) -> None:
        from mlflow.entities import Param

        known = self.client.get_run(self.run_id).data.params  # a resumed run keeps its first values
        new = [Param(k, str(v)[:self.VALUE_MAX]) for k, v in tracker_names(params).items() if k not in known]
        for i in range(0, len(new), self.PARAM_BATCH):
            self.client.log_batch(self.run_id, params=new[i:i + self.PARAM_BATCH])
        for name, text in files.items():
            self.client.log_text(self.run_id, text, name)

    def _send(self, kind: str, step: int, record: dict) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in tracker_names(numbers(record)).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def artifact(self, path: Path) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), path.name)
        else:
            self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str, signal_name: str | None = None) -> None:
        self.client.set_terminated(self.run_id, self.STATUS[status])


class Trackers:
    """The run's trackers, fed by MetricsLog. A tracker that fails is reported once, closed as failed
    where it can be, and dropped; the run and metrics.jsonl go on."""

    def __init__(self, out: Path, items: list[Tracker], echo=print) -> None:
        self.out, self.items, self.echo = out, items, echo

    @classmethod
    def open(cls, cfg, out: Path, resumed_at: int | None, params: dict, files: dict[str, str],
             echo=print) -> Trackers:
        """Start (or, on resume, continue) a run in each tracker of cfg.report_to and give it the parameters."""
        state = {}
        if cfg.resume is not None and (out / STATE).is_file():
            state = json.loads((out / STATE).read_text())
        self = cls(out, [], echo)
        for name in cfg.report_to:
            old = state.get(name, {})
            try:
                if name == "tensorboard":
                    self.items.append(TensorBoard(out, resumed_at))
                elif name == "wandb":
                    self.items.append(Wandb(cfg, out, old.get("run_id"), old.get("sent")))
                else:
                    self.items.append(Mlflow(cfg, out, old.get("run_id"), old.get("sent")))
            except Exception as exc:  # the run goes on without it
                echo(f"report_to: {name} did not start ({first_line(exc)}); the run goes on without it")
        self._save()
        self._each(lambda t: t.params(params, files))
        return self

    def _each(self, call) -> bool:
        changed = False
        for t in list(self.items):
            try:
                changed |= call(t) is not False
            except Exception as exc:
                self.echo(f"report_to: {t.name} failed ({first_line(exc)}); the run goes on without it")
                self.items.remove(t)
                self._end(t, FAILED, None, quiet=True)
        return changed

    def _end(self, t: Tracker, status: str, signal_name: str | None, quiet: bool = False) -> None:
        try:
            t.close(status, signal_name)
        except Exception as exc:
            if not quiet:
                self.echo(f"report_to: {t.name} could not close its run ({first_line(exc)})")

    def _save(self) -> None:
        state = {t.name: t.state() for t in self.items if t.sent is not None}
        if state:
            atomic_write_text(self.out / STATE, json.dumps(state, indent=1) + "\n")

    def log(self, kind: str, step: int, record: dict) -> None:
        if self._each(lambda t: t.log(kind, step, record)):
            self._save()

    def close(self, artifacts: list[Path] = (), status: str = FINISHED, signal_name: str | None = None) -> None:
        """Send the artifacts that exist (final weights, best/, the evaluation report), and end each
        tracker's run as `status`. Once: a second call finds no trackers."""
        for path in artifacts:
            if path is not None and path.exists():
                self._each(lambda t, path=path: t.artifact(path))
        for t in self.items:
            self._end(t, status, signal_name)
        self.items = []


def run_files(cfg, report: dict) -> dict[str, str]:
    """The whole config and data report, for the trackers that keep files."""
    return {"config.yaml": yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False),
            "data_report.json": json.dumps(report, indent=2) + "\n"}


def run_params(cfg, report: dict, hparams: dict) -> dict:
    """The flat parameters every tracker gets: config, derived hyper-parameters (run.*) and the data
    report's counts and warnings (data.*)."""
    return {**flatten(cfg.model_dump(mode="json")), **flatten(hparams, "run"), **flatten(report, "data")}
