"""Finding and loading a model for inference from what the user points at.

Accepted: a merged/full HF model directory, a run's output directory (its merged/ model if
there is one, else base + adapter), or an adapter directory (base from adapter_config.json, or
--base-model). Adapters are folded into the weights in memory, so decoding costs the same as a
merged model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..chat import ChatTokenizer, load_tokenizer
from ..errors import ModelError
from ..lora import load_adapter, merge_lora, read_adapter_config
from ..models.load import load_model
from ..models.mistral import MistralForCausalLM

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    model: MistralForCausalLM
    tokenizer: ChatTokenizer
    name: str  # what /v1/models reports
    source: Path


def resolve_source(path: Path) -> tuple[Path, Path | None]:
    """(model_dir, adapter_dir or None) for a model, run or adapter directory."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ModelError(f"{path}: not a directory (expected a model, run or adapter directory)")
    if (path / "config.json").is_file():
        return path, None
    if (path / "merged" / "config.json").is_file():
        return path / "merged", None
    if (path / "model" / "config.json").is_file():  # a full fine-tune's run directory
        return path / "model", None
    for adapter in (path, path / "adapter"):
        if (adapter / "adapter_config.json").is_file():
            return adapter, adapter
    raise ModelError(f"{path}: no config.json, merged/, model/ or adapter/ found (is this a model or run directory?)")


def load_for_inference(
    path: str | Path, base_model: str | None = None, dtype: str = "float32", device: str = "cpu"
) -> LoadedModel:
    if dtype not in _DTYPES:
        raise ModelError(f"dtype {dtype!r}: expected one of {', '.join(_DTYPES)}")
    model_dir, adapter = resolve_source(Path(path))
    if adapter is None:
        model, _ = load_model(str(model_dir), dtype=torch.float32, device=device)
        tokenizer = load_tokenizer(None, model_dir)
    else:
        _, recorded = read_adapter_config(adapter)
        base = base_model or recorded
        if not base:
            raise ModelError(f"{adapter}: adapter_config.json names no base model; pass --base-model")
        model, base_dir = load_model(base, dtype=torch.float32, device=device)
        load_adapter(model, adapter)
        merge_lora(model)
        try:
            tokenizer = load_tokenizer(None, adapter)
        except ModelError:
            tokenizer = load_tokenizer(None, base_dir)
    model = model.to(_DTYPES[dtype]).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(model, tokenizer, Path(path).expanduser().resolve().name, Path(path))
