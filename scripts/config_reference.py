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
    GRPOConfig,
    NeedleConfig,
    RewardConfig,
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
                ("`eval.forgetting`", ForgettingConfig), ("`eval.needle`", NeedleConfig),
                ("`grpo` (method: grpo)", GRPOConfig), ("Each entry of `grpo.rewards`", RewardConfig))
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
    return "\n".join(lines + _axolotl_section())


def _axolotl_section() -> list[str]:
    from mistral_tune.config_axolotl import OPTIMIZERS, REFUSED_GROUPS, RENAMED, SAME, SCHEDULERS

    return [
        "## From Axolotl", "",
        "`mistral-tune convert axolotl AXOLOTL.yaml --out ours.yaml` writes a config of ours from an Axolotl config, "
        "checked by the same schema validation as `load_config` (no model or data is read: run `mistral-tune "
        "validate ours.yaml` for those). It prints, and writes at the top of the new file as comments, every Axolotl "
        "key that has no direct counterpart with what became of it; it never writes over its input, and replaces "
        "`--out` only with `--overwrite` and only when that file is an earlier conversion.", "",
        f"- Same name and meaning: {', '.join(f'`{k}`' for k in SAME)}.",
        "- Renamed: " + ", ".join(f"`{a}` → `{b}`" for a, b in RENAMED.items()) + "; `test_datasets` → "
        "`val_datasets`; `resume_from_checkpoint` → `resume` (`auto_resume_from_checkpoints` → `resume: auto`); "
        "`early_stopping_patience` → `eval.early_stopping_patience`; `excess_length_strategy` → `on_too_long`; "
        "`dataset_exact_deduplication` → `cleaning.dedup`; `batch_size` → `gradient_accumulation_steps`.",
        "- `adapter`: `lora`/`qlora`, with `load_in_4bit: true` → `qlora`; no adapter → `adapter: none` (Axolotl "
        "then trains the whole model). `load_in_8bit: true` has no 8-bit counterpart: the base stays bf16 (use "
        "`qlora` or `base_precision: fp8` for less memory).",
        "- `lora_target_linear: true` → every projection (the default); a list keeps the projections we know "
        "(Mixtral's router `gate` is left out); a PEFT regex is read against the text model's module names; "
        "neither → `[q_proj, v_proj]`, PEFT's default.",
        "- `optimizer`: " + ", ".join(f"`{a}` → `{b}`" for a, b in OPTIMIZERS.items()) + "; `lr_scheduler`: "
        + ", ".join(f"`{a}` → `{b}`" for a, b in SCHEDULERS.items()) + ".",
        "- `bf16` carries over; `fp16: true` → `bf16: auto`. `gradient_checkpointing: offload` and "
        "`activation_offloading` → `offload_activations`. `fsdp`/`fsdp_config` → `distributed: fsdp` for full "
        "fine-tuning, `ddp` with adapters; `deepspeed` is left out (DDP or FSDP2 here).",
        "- `wandb_*` / `mlflow_*` / `use_tensorboard` → `report_to`; `wandb_project`, `wandb_entity`, "
        "`mlflow_experiment_name` and `mlflow_tracking_uri` carry over; the run name goes in `WANDB_NAME` / "
        "`MLFLOW_RUN_NAME`.",
        "- Datasets: `path`, `split`, `name`; `ds_type` → `source`; `type: alpaca` (and its custom "
        "`field_instruction`/`field_input`/`field_output`/`field_system` form) → `format: alpaca`; "
        "`chat_template` with `field_messages` and `message_property_mappings` → `format: messages` (role/content) "
        "or `format: sharegpt` (other names, e.g. from/value) with a `field_map`; `sharegpt` → `format: sharegpt`; "
        "`completion` with `field` and `pretraining_dataset` with `text_column` → `format: text`.",
        "- Left out with the reason printed: kernel and attention choices (`flash_attention`, `plugins`, ...), "
        "tokenizer and architecture hints, precision flags such as `tf32`, launcher settings, hub upload, the "
        "chat template and special tokens (mistral-common renders the model's own format), "
        "`saves_per_epoch`/`evals_per_epoch`, `unfrozen_parameters` (full fine-tuning trains every weight).",
        "- Refused, with the key named, when leaving a key out would train something else:",
        *[f"  - {', '.join(f'`{k}`' for k in keys[:6])}{', ...' if len(keys) > 6 else ''}: {why}."
          for why, keys in REFUSED_GROUPS.items()],
        "",
        "A mistral-tune config that holds Axolotl's keys (`train`, `validate`) gets one line per problem, each "
        "naming the key and its counterpart (`load_in_4bit` → `adapter: qlora`), and a last line pointing to "
        "`convert axolotl`.", ""]


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
