"""Merging a LoRA adapter into its base model and writing an HF model directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..chat import load_tokenizer
from ..errors import ModelError
from ..lora import load_adapter, merge_lora, read_adapter_config
from ..models.load import load_model, save_model


def find_adapter(run_or_adapter: Path) -> Path:
    """Accept an adapter directory or a run's output directory (which holds adapter/)."""
    if (run_or_adapter / "adapter_config.json").is_file():
        return run_or_adapter
    if (run_or_adapter / "adapter" / "adapter_config.json").is_file():
        return run_or_adapter / "adapter"
    raise ModelError(f"{run_or_adapter}: neither an adapter directory nor a run directory with adapter/")


def merge_to_dir(adapter_dir: Path, out_dir: Path, base_model: str | None = None, dtype: str = "float32") -> Path:
    """Base model + adapter -> merged HF model directory (weights, config, tokenizer files).

    Written to a temporary sibling directory first, then renamed, so a failure leaves nothing.
    """
    adapter_dir = find_adapter(Path(adapter_dir))
    _, recorded_base = read_adapter_config(adapter_dir)
    base = base_model or recorded_base
    if not base:
        raise ModelError(f"{adapter_dir}: adapter_config.json names no base model; pass --base-model")
    model, model_dir = load_model(base, dtype=torch.float32)
    load_adapter(model, adapter_dir)
    merge_lora(model)
    try:
        tokenizer = load_tokenizer(None, adapter_dir)
    except ModelError:
        tokenizer = load_tokenizer(None, model_dir)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_model(model, tmp, dtype=dtype)
        tokenizer.save(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
