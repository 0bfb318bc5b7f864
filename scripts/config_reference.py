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
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    if "--check" in sys.argv:
        sys.exit(0 if out.read_text() == render() else 1)
    out.write_text(render())
    print(f"wrote {out}")
