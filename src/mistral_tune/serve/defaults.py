"""The sampling defaults of every command that decodes (generate, chat, serve): one rule.

A setting the user gives (a command-line flag, a request field) wins. Otherwise the model's
generation_config.json decides, where there is one (the adapter's directory first, then the
model's): "do_sample": false means greedy; its "temperature", "top_p" and "top_k" replace the
stated defaults they name. Without one, the stated defaults hold: temperature 0.7, top_p 0.9,
top_k off. (Models written by mistral-tune carry "do_sample": false, so they answer greedily
unless asked otherwise.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError

RULE = ("default: the model's generation_config.json (do_sample false: greedy; else its temperature, top_p, "
        "top_k), without one temperature 0.7, top_p 0.9, top_k off")


@dataclass(frozen=True)
class SamplingDefaults:
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    source: str = "stated defaults"


def sampling_defaults(*dirs: Path | None) -> SamplingDefaults:
    """The defaults for a model whose files are in dirs (the first generation_config.json found)."""
    for d in dirs:
        path = Path(d) / "generation_config.json" if d is not None else None
        if path is None or not path.is_file():
            continue
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"{path}: cannot read ({exc})") from None
        if not isinstance(cfg, dict):
            raise ModelError(f"{path}: expected a JSON object")
        stated = SamplingDefaults()
        values = {}
        for key, kind, ok in (("temperature", float, lambda v: 0 <= v), ("top_p", float, lambda v: 0 < v <= 1),
                              ("top_k", int, lambda v: 0 <= v)):
            value = cfg.get(key)
            if value is None:
                values[key] = getattr(stated, key)
            elif isinstance(value, bool) or not isinstance(value, int | float) or not ok(value):
                raise ModelError(f"{path}: {key} {value!r} is out of range")
            else:
                values[key] = kind(value)
        if cfg.get("do_sample") is False:
            values["temperature"] = 0.0
        return SamplingDefaults(**values, source=str(path))
    return SamplingDefaults()
