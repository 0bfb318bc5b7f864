"""Running the evaluations an `eval:` section asks for: from the training loop (every eval_steps
and at the end, with the best adapter kept and early stopping) and from `mistral-tune eval`."""

from __future__ import annotations

import copy
import datetime
import json
import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from ..errors import ConfigError, DataError
from ..fsutil import replace_dir, run_folder
from .base import Evaluation, ModelPair, Result, example_ids, read_examples
from .report import REPORT_HTML, write_report

BEST_DIR = "best"
BEST_INFO = "best.json"


def lower_is_better(metric: str) -> bool:
    """Losses, perplexities and divergences go down as a model improves; every other metric up."""
    last = metric.rsplit(".", 1)[-1]
    return metric == "loss" or last in ("loss", "nll", "ppl", "kl", "ppl_increase", "ppl_second_half")


def build_evaluations(eval_cfg, tokenizer, model_config, sequence_len: int) -> list[Evaluation]:
    """The evaluations of an eval: section, their data read and tokenized (errors name the key)."""
    from .forgetting import ForgettingEval
    from .loss import LossEval
    from .needle import NeedleEval, PositionPplEval
    from .tasks import TaskEval

    evals: list[Evaluation] = []
    if eval_cfg.tasks is not None:
        t = eval_cfg.tasks
        examples = read_examples(t.dataset, "eval.tasks.dataset", t.max_samples)
        chats = []
        for origin, ex in examples:
            if not hasattr(ex, "messages"):
                raise DataError(f"eval.tasks.dataset: {origin}: a text record has no reference answer; give "
                                "conversations, alpaca or prompt/completion records")
            chats.append((origin, ex))
        evals += [TaskEval(chats, tokenizer, t), LossEval(chats, tokenizer)]
    if eval_cfg.forgetting is not None:
        f = eval_cfg.forgetting
        examples = read_examples(f.dataset, "eval.forgetting.dataset", f.max_samples)
        seqs = [example_ids(tokenizer, ex, origin)[:f.max_tokens] for origin, ex in examples]
        evals.append(ForgettingEval([s for s in seqs if len(s) >= 2], f, f.dataset.path))
        if f.lm_eval_tasks:
            from .lm_eval import LmEval

            evals.append(LmEval(f))
    if eval_cfg.needle is not None:
        n = eval_cfg.needle
        needle = NeedleEval(tokenizer, n, sequence_len, model_config)
        evals.append(needle)
        if n.documents is not None:
            examples = read_examples(n.documents, "eval.needle.documents", n.documents_max_samples)
            longest = n.documents_max_tokens or max(needle.lengths or [sequence_len])
            evals.append(PositionPplEval(examples, tokenizer, n, longest))
    return evals


class Evaluator:
    """Runs a list of evaluations on a model pair and keeps what a report needs."""

    def __init__(self, evaluations: list[Evaluation], echo=print) -> None:
        self.evaluations, self.echo = evaluations, echo
        self.results: list[Result] = []

    def run(self, pair: ModelPair) -> dict[str, float]:
        """Every evaluation once; returns the flat metrics ({"tasks.exact_match": .., "...@base": ..})."""
        self.results = [ev.run(pair) for ev in self.evaluations]
        flat: dict[str, float] = {}
        for r in self.results:
            flat.update(r.flat())
        return flat

    @property
    def warnings(self) -> list[str]:
        return [w for r in self.results for w in r.warnings]

    def report(self, name: str, source: str, base: str | None, step: int | None, best: dict | None = None) -> dict:
        return {
            "model": {"name": name, "source": source, "base": base},
            "step": step,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "evaluations": [asdict(r) for r in self.results],
            "warnings": self.warnings,
            "best": best,
        }


def summary_lines(results: list[Result]) -> list[str]:
    lines = []
    for r in results:
        for metric, sides in r.metrics.items():
            base, tuned = sides.get("base"), sides.get("tuned")
            shown = f"{tuned:.4g}" if base is None else f"base {base:.4g} -> tuned {tuned:.4g}"
            lines.append(f"  {r.name}.{metric}: {shown}")
    return lines


def read_history(metrics_jsonl: Path) -> list[dict]:
    """The evaluation lines of a run's metrics.jsonl (held-out loss and the eval: section's metrics)."""
    if not metrics_jsonl.is_file():
        return []
    out = []
    for line in metrics_jsonl.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" not in rec and "event" not in rec and len(rec) > 1 and "step" in rec:
            out.append({k: v for k, v in rec.items() if k != "eval_ppl"})
    return out


class BestTracker:
    """The best value of eval.metric so far and how many evaluations since it improved."""

    def __init__(self, metric: str, patience: int | None) -> None:
        self.metric, self.patience = metric, patience
        self.best: float | None = None
        self.best_step: int | None = None
        self.since = 0

    def update(self, step: int, metrics: dict[str, float]) -> bool:
        """True when this evaluation is the best so far."""
        if self.metric not in metrics:
            known = ", ".join(sorted(k for k in metrics if "@" not in k)) or "none"
            raise ConfigError(f"eval.metric: {self.metric} was not measured; measured: {known}")
        value = metrics[self.metric]
        if not math.isfinite(value):
            better = False
        elif self.best is None:
            better = True
        else:
            better = value < self.best if lower_is_better(self.metric) else value > self.best
        if better:
            self.best, self.best_step, self.since = value, step, 0
        else:
            self.since += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.since >= self.patience


class TrainingEvals:
    """What the training loop calls: `due`; at each evaluation `measure`, then `record` and, when the
    evaluation is the best so far, `keep_best`; `finish` at the end. Measuring is apart so that the
    processes of a sharded model all run it, while rank 0 alone records."""

    def __init__(self, cfg, pair: ModelPair, evaluator: Evaluator, out: Path,
                 save_model: Callable[[Path, dict | None], object], tracker: BestTracker | None, echo=print) -> None:
        self.cfg, self.pair, self.evaluator, self.out, self.echo = cfg, pair, evaluator, out, echo
        self.save_model, self.tracker = save_model, tracker
        self.best_dir: Path | None = None
        self.last_step: int | None = None

    @classmethod
    def start(cls, cfg, model, tokenizer, autocast_dtype, out: Path, save_model, echo=print,
              every=bool, extra: list[Evaluation] = ()) -> TrainingEvals | None:
        """None when the config asks for nothing beyond the held-out loss. save_model(dir, weights): the
        model into dir (weights: the whole state dict of a sharded model); every: ModelPair's; extra:
        evaluations the run adds of its own (a preference run's held-out pairs)."""
        e = cfg.eval
        if not e.requested:
            return None
        # Without a held-out set, eval.metric loss is never measured: no best/ then, the final adapter is the result.
        tracked = e.metric != "loss" or bool(cfg.val_set_size or cfg.val_datasets)
        if not tracked and e.early_stopping_patience is not None:
            raise ConfigError("eval.early_stopping_patience: eval.metric loss needs a held-out set (val_set_size or "
                              "val_datasets); or name an evaluation's metric, e.g. tasks.exact_match")
        evals = build_evaluations(e, tokenizer, model.config, cfg.sequence_len) + list(extra)
        pair = ModelPair(model, tokenizer, autocast_dtype=autocast_dtype, every=every)
        tracker = BestTracker(e.metric, e.early_stopping_patience) if tracked else None
        self = cls(cfg, pair, Evaluator(evals, echo), out, save_model, tracker, echo)
        info = out / BEST_DIR / BEST_INFO
        if tracker is not None and cfg.resume is not None and info.is_file():  # keep the best of the earlier part
            kept = json.loads(info.read_text())
            if kept.get("metric") == e.metric:
                tracker.best, tracker.best_step, self.best_dir = kept["value"], kept["step"], info.parent
        return self

    @staticmethod
    def due(cfg, step: int, last: bool) -> bool:
        """Whether the evaluations run at `step` (the same answer on every process)."""
        return last or (cfg.eval.during_training and cfg.eval_steps is not None and step % cfg.eval_steps == 0)

    def measure(self) -> dict[str, float]:
        """Every evaluation once, on the model as it is now."""
        return self.evaluator.run(self.pair)

    def record(self, step: int, metrics: dict[str, float], heldout_loss: float | None, log) -> dict:
        """Log the metrics measured at `step` and judge them: {"best": they are the best so far (keep_best
        comes next), "stop": why to stop when early stopping says so, else None}."""
        if heldout_loss is not None:
            metrics["loss"] = heldout_loss
        self.last_step = step
        shown = {k: v for k, v in metrics.items() if k != "loss"}  # the held-out loss has its own line
        log.metrics(step, shown, "evaluation: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items() if "@" not in k))
        for warning in self.evaluator.warnings:
            log.event({"step": step, "event": "warning", "message": warning})
            self.echo(f"warning at step {step}: {warning}")
        best = self.tracker is not None and self.tracker.update(step, metrics)
        # patience is at least 1: an evaluation that is the best never stops the run, so best_dir is set by then
        return {"best": best, "stop": self.stop_reason if self.tracker and self.tracker.should_stop else None}

    def keep_best(self, weights: dict | None = None) -> None:
        """The model as it is now into output_dir/best, with best.json (weights: as save_model takes them)."""
        def write(tmp: Path) -> None:
            self.save_model(tmp, weights)
            info = {"step": self.tracker.best_step, "metric": self.tracker.metric, "value": self.tracker.best}
            (tmp / BEST_INFO).write_text(json.dumps(info, indent=2) + "\n")

        self.best_dir = replace_dir(self.out / BEST_DIR, write, "adapter")

    @property
    def stop_reason(self) -> str:
        t = self.tracker
        return (f"{t.metric} has not improved for {t.since} evaluations (best {t.best:.4g} at step {t.best_step}, "
                f"kept in {self.best_dir})")

    @property
    def best(self) -> dict | None:
        if self.best_dir is None:
            return None
        return {"step": self.tracker.best_step, "metric": self.tracker.metric, "value": self.tracker.best,
                "dir": str(self.best_dir)}

    def finish(self, name: str) -> Path | None:
        """The report of the last evaluation, with the run's history, in output_dir/eval."""
        if not self.evaluator.results:
            return None
        report = self.evaluator.report(name, str(self.out), "adapters off" if self.pair.has_base else None,
                                       self.last_step, self.best)
        folder = write_report(self.out / "eval", report, read_history(self.out / "metrics.jsonl"))
        return folder / REPORT_HTML


# ---------------------------------------------------------------------- mistral-tune eval


def load_pair(path: Path, base_model: str | None = None, dtype: str = "float32", device: str = "cpu"):
    """(pair, base description) for a run folder, an adapter or a merged model.

    An adapter stays unmerged, so its base is the same model with adapters off. A merged or fully
    fine-tuned model gets its base loaded beside it when one is known (--base-model, or the run's
    config.yaml); otherwise it is evaluated alone.
    """
    from ..models.load import load_model

    path = Path(path).expanduser()
    if (path / "adapter" / "adapter_config.json").is_file():
        path = path / "adapter"  # a run folder: its adapter, not its merged copy
    from ..models.tuned import load_tuned

    tuned = load_tuned(path, base_model, dtype=dtype, device=device, merge=False)
    model, tokenizer, adapter_dir = tuned.model, tuned.tokenizer, tuned.adapter_dir
    if adapter_dir is not None:
        return ModelPair(model, tokenizer), "the same model with its adapters off"
    base_model = base_model or _run_config(path).get("base_model")
    if not base_model:
        return ModelPair(model, tokenizer), None
    base, _ = load_model(base_model, dtype=next(model.parameters()).dtype, device=device)
    for p in base.parameters():
        p.requires_grad_(False)
    return ModelPair(model, tokenizer, base_model=base.eval()), base_model


def _run_config(path: Path) -> dict:
    import yaml

    run = run_folder(path)
    if run is None:
        return {}
    return yaml.safe_load((run / "config.yaml").read_text()) or {}


def eval_settings(path: Path, config: Path | dict | None, overrides: list[str]):
    """(eval section, sequence_len) from --config (or the run's config.yaml; or a config's dict of keys)
    and eval.* overrides."""
    import yaml
    from pydantic import BaseModel, ConfigDict, ValidationError

    from ..config import EvalConfig, _apply_override, _eval_datasets, _format_error, _resolve_near, parse_override

    class Section(BaseModel):  # errors located as eval.KEY, as in a run's config
        model_config = ConfigDict(extra="forbid")
        eval: EvalConfig

    if isinstance(config, dict):
        data, where, base = config, "config", None
    elif config is not None:
        if not Path(config).is_file():
            raise ConfigError(f"config file not found: {config}")
        data = yaml.safe_load(Path(config).read_text()) or {}
        where, base = str(config), Path(config).resolve().parent
    else:
        data, where, base = _run_config(path), "the run's config.yaml", None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of keys")
    section = {"eval": copy.deepcopy(data.get("eval") or {})}
    for text in overrides:
        keys, value = parse_override(text)
        if keys[0] != "eval":
            raise ConfigError(f"override '{text}': mistral-tune eval takes eval.* keys only")
        _apply_override(section, keys, value)
    if base is not None:
        for ds in _eval_datasets(section["eval"]):
            if isinstance(ds.get("path"), str):
                ds["path"] = _resolve_near(ds["path"], base)
    try:
        eval_cfg = Section.model_validate(section).eval
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, where)) from None
    return eval_cfg, int(data.get("sequence_len") or 2048)


def _default_out(path: Path, run: Path | None, kind: str) -> Path:
    """run/eval for a run folder itself; run/eval-best for its best/ (not to replace the final model's
    report); ./eval-NAME for a model outside a run."""
    name = Path(path).expanduser().resolve().name
    if run is None:
        return Path.cwd() / f"{kind}-{name}"
    return run / kind if Path(path).expanduser().resolve() == run else run / f"{kind}-{name}"


def run_eval(path: Path, *, config: Path | dict | None = None, overrides: list[str] = (), out: Path | None = None,
             base_model: str | None = None, dtype: str = "float32", device: str = "cpu", echo=print) -> dict:
    """`mistral-tune eval`: the report of the eval: section's evaluations on one model."""
    eval_cfg, sequence_len = eval_settings(path, config, list(overrides))
    if eval_cfg.tasks is None and eval_cfg.forgetting is None and eval_cfg.needle is None:
        raise ConfigError("nothing to evaluate: give an eval: section with tasks, forgetting or needle (in the run's "
                          "config.yaml or --config FILE), or eval.* overrides")
    pair, base = load_pair(path, base_model, dtype, device)
    evaluator = Evaluator(build_evaluations(eval_cfg, pair.tokenizer, pair.config, sequence_len), echo)
    evaluator.run(pair)
    run = run_folder(path)
    out = out or _default_out(path, run, "eval")
    report = evaluator.report(Path(path).resolve().name, str(path), base, None)
    history = read_history(run / "metrics.jsonl") if run is not None else []
    folder = write_report(out, report, history)
    for line in summary_lines(evaluator.results):
        echo(line)
    for warning in evaluator.warnings:
        echo(f"warning: {warning}")
    echo(f"report: {folder / REPORT_HTML}")
    return report


def reference_prompts(cfg, tokenizer, limit: int = 1000) -> list[list[int]]:
    """Prompt ids of the training data (conversations without their last answer; texts cut to sequence_len)."""
    out = []
    for i, ds in enumerate(cfg.datasets):
        for origin, ex in read_examples(ds, f"datasets.{i}", limit):
            if hasattr(ex, "messages"):
                msgs = ex.messages[:-1] if ex.messages[-1]["role"] == "assistant" else ex.messages
                if msgs and msgs[-1]["role"] in ("user", "tool"):
                    out.append(tokenizer.encode_prompt(msgs))
            else:
                out.append(example_ids(tokenizer, ex, origin)[:cfg.sequence_len])
    return out


def run_drift(path: Path, folder: Path, *, config: Path | None = None, threshold: float = 0.3,
              out: Path | None = None, base_model: str | None = None, dtype: str = "float32", device: str = "cpu",
              echo=print) -> float:
    """`mistral-tune eval --drift DIR`: served prompts against the training data; DriftDetected above threshold."""
    from ..config import load_config
    from .drift import DriftDetected, DriftEval, read_served, served_ids

    run = run_folder(path)
    config = Path(config) if config is not None else (run / "config.yaml" if run is not None else None)
    if config is None:
        raise ConfigError(f"{path}: not inside a training run; pass --config with the run's config (its datasets "
                          "are the reference)")
    cfg = load_config(config)
    pair, _ = load_pair(path, base_model, dtype, device)
    served = []
    for rec in read_served(folder):
        try:
            served.append(served_ids(pair.tokenizer, rec))
        except (DataError, KeyError) as exc:
            raise DataError(f"{folder}: a logged request has no readable prompt ({exc})") from None
    result = DriftEval(served, reference_prompts(cfg, pair.tokenizer), "the training data").run(pair)
    evaluator = Evaluator([], echo)
    evaluator.results = [result]
    out = out or _default_out(path, run, "drift")
    folder_out = write_report(out, evaluator.report(Path(path).resolve().name, str(path), None, None), [])
    for line in summary_lines([result]):
        echo(line)
    score = result.metrics["score"]["tuned"]
    echo(f"report: {folder_out / REPORT_HTML}")
    if score > threshold:
        raise DriftDetected(f"drift score {score:.3f} is above the threshold {threshold:g}; report: "
                            f"{folder_out / REPORT_HTML}")
    echo(f"drift score {score:.3f} (threshold {threshold:g})")
    return score
