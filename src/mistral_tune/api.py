"""The Python API: what the commands do, as functions a notebook calls.

    from mistral_tune import api

    run = api.train({"base_model": "tiny-model", "datasets": [{"path": "train.jsonl"}], "output_dir": "out"})
    run.metrics[-1], run.best            # metrics.jsonl's lines; the best evaluation (step, metric, value, dir)
    api.evaluate(run)                    # the eval_report.json dict: base vs tuned for each metric
    merged = api.merge(run)              # the merged HF model directory
    api.generate(merged, ["Hello!"])     # the answers, one string a prompt
    api.push(run, "your-name/my-model")  # merged/ (or adapter/) and its README.md model card, to the Hub

A config is a `Config`, a dict of the YAML's keys, or the path of a YAML file; `overrides` are the
command line's key=value pairs. A model is a run's output_dir (or the `TrainResult` that `train`
returns), an adapter directory or a merged model. Errors a user can cause raise
mistral_tune.errors.MistralTuneError subclasses with the message the command line prints.

Importing this module is cheap (no torch): the config is read and checked before the trainer,
the model code and torch are imported, so a wrong key or a missing file fails in a moment.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import Config, apply_overrides, config_from_dict
from .config import load_config as _load_yaml
from .dtypes import DTYPE_ALIASES
from .errors import ConfigError

if TYPE_CHECKING:
    from .train.loop import TrainResult

ConfigLike = Config | Mapping[str, Any] | str | os.PathLike
ModelLike = str | os.PathLike  # or a TrainResult: its output_dir


def load_config(config: ConfigLike, overrides: Sequence[str] = ()) -> Config:
    """A checked Config from a Config, a dict of keys, or a YAML file, with key=value overrides applied."""
    if isinstance(config, Config):
        if not overrides:
            return config
        config = config.model_dump(mode="json", exclude_unset=True)
    if isinstance(config, Mapping):
        if overrides:
            config = apply_overrides(json.loads(json.dumps(dict(config))), overrides)
        return config_from_dict(dict(config), "config")
    if isinstance(config, str | os.PathLike):
        return _load_yaml(config, list(overrides))
    raise ConfigError(f"a config is a dict, a YAML file's path or a Config, not {type(config).__name__}")


def _path(model) -> Path:
    """A run's TrainResult stands for its output_dir."""
    return Path(model.output_dir) if hasattr(model, "output_dir") else Path(model)


def train(config: ConfigLike, overrides: Sequence[str] = (), *, merge: bool = False, force: bool = False,
          echo: Callable[[str], object] = print) -> TrainResult:
    """Fine-tune as the config says; the TrainResult names the run's outputs (output_dir, adapter_dir,
    model_dir, best, report) and reads its metrics.jsonl (`.metrics`) and evaluation report (`.evaluation`).
    A run stopped by SIGTERM/Ctrl-C returns with `stopped_by` set and the checkpoint to resume from."""
    cfg = load_config(config, overrides)
    from .train.loop import train as run_training

    return run_training(cfg, echo=echo, merge=merge, force=force)


def evaluate(model: ModelLike, config: ConfigLike | None = None, overrides: Sequence[str] = (), *,
             out: str | os.PathLike | None = None, base_model: str | None = None, dtype: str = "float32",
             device: str = "cpu", echo: Callable[[str], object] = print) -> dict:
    """The eval: section's evaluations on a model, base vs tuned: the report's JSON as a dict (also written,
    with report.html, to `out`, by default the run's eval/). `config`: where the eval: section is (default:
    the run's config.yaml); overrides are eval.key=value."""
    section = None
    if config is not None:
        if isinstance(config, Config):
            config = config.model_dump(mode="json", exclude_unset=True)
        if isinstance(config, Mapping):
            section = dict(config)
        elif isinstance(config, str | os.PathLike):
            section = Path(config)
            if not section.is_file():
                raise ConfigError(f"config file not found: {section}")
    from .evaluate.run import run_eval

    return run_eval(_path(model), config=section, overrides=list(overrides), out=Path(out) if out else None,
                    base_model=base_model, dtype=dtype, device=device, echo=echo)


def merge(run_or_adapter: ModelLike, out: str | os.PathLike | None = None, *, base_model: str | None = None,
          dtype: str = "bf16", max_shard_size: str = "5GB", overwrite: bool = False,
          echo: Callable[[str], object] = print) -> Path:
    """Fold a run's (or an adapter directory's) LoRA adapter into its base: the merged HF model directory
    (default: beside the adapter, merged/), with its model card."""
    from .export.hf import find_adapter, merge_to_dir, parse_size

    adapter = find_adapter(_path(run_or_adapter))
    target = Path(out) if out else adapter.parent / "merged"
    return merge_to_dir(adapter, target, base_model=base_model, dtype=DTYPE_ALIASES.get(dtype, dtype),
                        max_shard_bytes=parse_size(max_shard_size), overwrite=overwrite, echo=echo)


def push(run_or_model: ModelLike, repo: str, *, private: bool = False, adapter: bool = False,
         token: str | None = None, echo: Callable[[str], object] = print) -> str:
    """Upload a run's merged model (or its adapter, or the adapter/model directory given) with its model card
    to the Hugging Face Hub repository `repo`; the URL of the commit. A missing token, a bad repository name
    or a folder with nothing to push fail before anything is sent."""
    from .export.hub import push as push_folder

    return push_folder(_path(run_or_model), repo, private=private, adapter=adapter, token=token, echo=echo)


def init_model(out: str | os.PathLike, *, tokenizer: str = "v3", seed: int = 0, overwrite: bool = False) -> Path:
    """A tiny random-init Mistral model (HF format, with its tokenizer file) for trials: a base_model that
    trains on a CPU in seconds."""
    from .fsutil import check_target, replace_dir
    from .quickstart import create_tiny_model

    target = check_target(out, "tiny", overwrite=overwrite, label="init-model")
    replace_dir(target, lambda tmp: create_tiny_model(tmp, tokenizer=tokenizer, seed=seed), "tiny")
    return target


def sampling(max_tokens: int = 256, temperature: float | None = None, top_p: float | None = None,
             seed: int | None = None, loaded=None):
    """The decoding settings: the values given, checked (an out-of-range value is a ConfigError naming
    the option), and for those not given the one rule of every command (serve/defaults.py): the loaded
    model's generation_config.json, else the stated defaults."""
    for name, value in (("temperature", temperature), ("top_p", top_p), ("max_tokens", max_tokens)):
        if value is not None and (value < 0 or (name == "top_p" and not 0 < value <= 1)
                                  or (name == "max_tokens" and value < 1)):
            raise ConfigError(f"--{name.replace('_', '-')} {value}: out of range")
    from .serve.chat import Sampling
    from .serve.defaults import sampling_defaults

    d = sampling_defaults(loaded.adapter_dir, loaded.model_dir) if loaded is not None else sampling_defaults()
    return Sampling(max_tokens=max_tokens, temperature=d.temperature if temperature is None else temperature,
                    top_p=d.top_p if top_p is None else top_p, top_k=d.top_k, seed=seed)


def load_model(model: ModelLike, base_model: str | None = None, dtype: str = "float32", device: str = "cpu"):
    """A model ready to decode (an adapter merged into its base): what chat, generate and serve load."""
    from .models.tuned import load_tuned

    return load_tuned(_path(model), base_model, dtype=DTYPE_ALIASES.get(dtype, dtype), device=device)


def generate(model: ModelLike, prompts: Sequence[str | Sequence[Mapping] | Mapping] | str | os.PathLike, *,
             out: str | os.PathLike | None = None, overwrite: bool = False, base_model: str | None = None,
             dtype: str = "float32", device: str = "cpu", max_tokens: int = 256, temperature: float | None = None,
             top_p: float | None = None, seed: int | None = None, system: str | None = None, batch_size: int = 8,
             progress: Callable[[int, int], object] | None = None) -> list[str]:
    """Answer prompts in batches: the completions, in the prompts' order. `prompts` is a list (a string is
    one user message; a list of {"role", "content"} messages is a conversation; a dict is a record with
    "messages" or "prompt") or the path of a JSONL/text file. `out`: also keep the JSONL that `mistral-tune
    generate` writes (each record with its completion and token counts). Sampling settings not given
    follow the model's generation_config.json, else the stated defaults (serve/defaults.py)."""
    sampling(max_tokens, temperature, top_p, seed)  # checked before anything loads
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be at least 1")
    from .fsutil import check_target
    from .serve.chat import generate_file

    with tempfile.TemporaryDirectory(prefix="mistral-tune-generate-") as tmp:
        source = _prompt_file(prompts, Path(tmp))
        target = (check_target(out, "completions", sources=[source], overwrite=overwrite) if out is not None
                  else Path(tmp) / "completions.jsonl")
        loaded = load_model(model, base_model, dtype, device)
        settings = sampling(max_tokens, temperature, top_p, seed, loaded)
        generate_file(loaded, source, target, settings, batch_size=batch_size, system=system, progress=progress)
        return [json.loads(line)["completion"] for line in target.read_text(encoding="utf-8").splitlines()]


def _prompt_file(prompts, tmp: Path) -> Path:
    """The prompts as a file generate_file reads: a path as it is, a list written as JSONL."""
    if isinstance(prompts, str | os.PathLike):
        return Path(prompts)
    path = tmp / "prompts.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                rec = {"prompt": p}
            elif isinstance(p, Mapping):
                rec = dict(p)
            elif isinstance(p, Sequence) and all(isinstance(m, Mapping) for m in p):
                rec = {"messages": [dict(m) for m in p]}
            else:
                raise ConfigError(f"prompt {i}: expected a string, a list of messages or a record, "
                                  f"not {type(p).__name__}")
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path
