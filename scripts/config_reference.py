"""Write docs/config.md from the config schema, so the reference never drifts from the code."""

import sys
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from mistral_tune.config import (
    PRESETS,
    CleaningConfig,
    Config,
    DatasetConfig,
    EvalConfig,
    ForgettingConfig,
    NeedleConfig,
    TaskEvalConfig,
)


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return "see below" if isinstance(value, BaseModel) else f"`{value}`"
    if field.default is PydanticUndefined:
        return "**required**"
    return f"`{field.default}`"


def _type(field) -> str:
    text = str(field.annotation).replace("typing.", "").replace("mistral_tune.config.", "")
    return text.replace("<class '", "").replace("'>", "").replace("|", "\\|")


def render() -> str:
    lines = ["# Config reference", "",
             "Generated from `src/mistral_tune/config.py` by `python scripts/config_reference.py`.",
             "Any key can be overridden on the command line: `mistral-tune train cfg.yaml key=value`",
             "(nested: `datasets.0.path=other.jsonl`).", ""]
    sections = (("Run keys", Config), ("Each entry of `datasets` (and `val_datasets`)", DatasetConfig),
                ("`cleaning`", CleaningConfig), ("`eval`", EvalConfig), ("`eval.tasks`", TaskEvalConfig),
                ("`eval.forgetting`", ForgettingConfig), ("`eval.needle`", NeedleConfig))
    for title, model in sections:
        lines += [f"## {title}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            desc = (field.description or "").replace("|", "\\|")
            lines.append(f"| `{name}` | {_type(field)} | {_default(field)} | {desc} |")
        lines.append("")
    lines += ["## Presets", "", "`preset: NAME` fills the keys a config leaves out; its own keys win.", "",
              "| preset | what for | keys |", "|---|---|---|"]
    for name, (what, keys) in PRESETS.items():
        lines.append(f"| `{name}` | {what} | {', '.join(f'`{k}: {v}`' for k, v in keys.items())} |")
    lines += ["", *TRACKERS.strip().splitlines(), ""]
    return "\n".join(lines)


TRACKERS = """
## Experiment trackers

`report_to: [wandb, mlflow]` sends each tracker the config (flattened: `lora_r`, `datasets_0_path`, and
the whole config.yaml), the data report, every metrics.jsonl line at its step (step lines, held-out
loss, the `eval:` section's metrics during training and at its end, the base model's as `NAME_base`),
and at the end the adapter (or model), `best/`, the evaluation report and report.html as artifacts.

| setting | config key | environment variable (used when the key is unset) | default |
|---|---|---|---|
| W&B project | `wandb_project` | `WANDB_PROJECT` | `mistral-tune` |
| W&B entity | `wandb_entity` | `WANDB_ENTITY` | your W&B default |
| W&B group | `wandb_group` | `WANDB_RUN_GROUP` | none |
| W&B tags | `wandb_tags` | `WANDB_TAGS` | none |
| MLflow store | `mlflow_tracking_uri` | `MLFLOW_TRACKING_URI` | `output_dir/mlflow.db` (SQLite) |
| MLflow experiment | `mlflow_experiment_name` | `MLFLOW_EXPERIMENT_NAME` | `mistral-tune` |

`WANDB_MODE=offline` keeps the W&B run in `output_dir/wandb` (`wandb sync` uploads it).

**Stores.** The default needs nothing: `mlflow ui --backend-store-uri sqlite:///OUTPUT_DIR/mlflow.db`
shows the run. `sqlite:///mlflow.db` (relative to the working directory) or `sqlite:////abs/path.db`
share one store between runs (MLflow puts their artifacts in `./mlruns` of the working directory);
`http://host:5000` sends to a tracking server. MLflow 3 refuses a file store (`file:./mlruns`, or a
plain path): `validate` and `train` stop before anything loads and name the SQLite URI to use
instead; set `MLFLOW_ALLOW_FILE_STORE=true` (MLflow's own switch) to keep a file store. It is not
mapped to SQLite silently: `mlflow ui` on `./mlruns` would not show runs written elsewhere.

**Names.** W&B and MLflow get one form of each name: every run of characters other than ASCII
letters, digits and `_` becomes one `_`, a name starting with a digit gets a `_` in front, and a name
longer than 250 characters is cut and ends in a hash (`tasks.exact_match@base` ->
`tasks_exact_match_base`, `datasets.0.path` -> `datasets_0_path`). This is W&B's rule for names it
can sort and filter on, which MLflow's rule accepts too. TensorBoard keeps its `train/`, `eval/`,
`base/` tags; metrics.jsonl keeps the original names.

**Run status.** A complete run ends its tracker runs as finished (MLflow `FINISHED`, W&B exit code
0); a stop request (SIGTERM, Ctrl-C) as stopped and resumable (MLflow `KILLED`, W&B preempting with
exit code 128 + the signal's number); an error as failed (MLflow `FAILED`, W&B exit code 1). A
resumed run continues the same tracker runs (trackers.json).

**Failures.** A missing package or a setting the library refuses (a file store, a missing SQLite
folder, a W&B project, group or tag W&B refuses) stops `validate` and `train` before anything
loads. A tracker that fails later (it cannot start, a server goes away) is reported in one line,
closed as failed where it can be, and left out; the run, metrics.jsonl and the other trackers go on.
"""


if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    if "--check" in sys.argv:
        sys.exit(0 if out.read_text() == render() else 1)
    out.write_text(render())
    print(f"wrote {out}")
