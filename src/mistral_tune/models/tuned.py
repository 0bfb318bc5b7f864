"""The one loader of a tuned model: merge, export, chat, generate, serve and evaluation all use it.

What the user points at may be a model directory (a merged model, a full fine-tune, any HF
Mistral checkpoint), a run's output directory (its merged/ model, else model/, else base +
adapter/), or an adapter directory. An adapter's base comes from adapter_config.json or
--base-model; its tokenizer from the adapter directory, else from the base.

A QLoRA adapter (base_quantization.json beside it) was trained on the NF4-quantized base, so
its target projections are quantized and dequantized back before the adapter goes on: the
model loaded is the one that was trained, not the full-precision base with its adapter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..chat import ChatTokenizer, load_tokenizer
from ..dtypes import DTYPE_ALIASES, DTYPE_NAMES
from ..errors import ModelError
from .load import DTYPES, load_model
from .lora import merge_lora
from .mistral import MistralForCausalLM
from .multi_lora import attach_adapters
from .peft_format import ADAPTER_CONFIG, BASE_QUANTIZATION, load_adapter, read_adapter_config
from .quant import nf4_round_trip

_DTYPES = {**DTYPES, **{alias: DTYPES[name] for alias, name in DTYPE_ALIASES.items()}}


@dataclass
class TunedModel:
    model: MistralForCausalLM  # LoRA layers attached and not merged when merge=False; merged otherwise
    tokenizer: ChatTokenizer
    name: str  # what /v1/models reports
    source: Path  # what the user pointed at
    model_dir: Path  # the base (or full/merged) model directory actually loaded
    adapter_dir: Path | None
    qlora: bool  # the base went through the NF4 round trip (the adapter was trained on NF4)
    adapters: list[str] = field(default_factory=list)  # several adapters on the base, by name (load_with_adapters)


def adapter_in(path: Path) -> Path | None:
    """The adapter directory at path or at path/adapter (a run's output directory), if any."""
    for adapter in (path, path / "adapter"):
        if (adapter / ADAPTER_CONFIG).is_file():
            return adapter
    return None


def resolve_source(path: str | Path) -> tuple[Path, Path | None]:
    """(model_dir, adapter_dir or None) for a model, run or adapter directory. For an adapter,
    model_dir is the adapter directory itself: its base is named in adapter_config.json."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ModelError(f"{path}: not a directory (expected a model, run or adapter directory)")
    if (path / "config.json").is_file():
        return path, None
    if (path / "merged" / "config.json").is_file():
        return path / "merged", None
    if (path / "model" / "config.json").is_file():  # a full fine-tune's run directory
        return path / "model", None
    adapter = adapter_in(path)
    if adapter is not None:
        return adapter, adapter
    raise ModelError(f"{path}: no config.json, merged/, model/ or adapter/ found (is this a model or run directory?)")


def load_tuned(
    path: str | Path, base_model: str | None = None, *, dtype: str = "float32", device: str = "cpu",
    merge: bool = True,
) -> TunedModel:
    """Load what `path` names for inference (eval mode, no gradients), in `dtype` on `device`.

    merge=True folds an adapter into the weights (in float32, before the cast), so decoding costs
    what a merged model costs; merge=False keeps the LoRA layers on top of the base.
    """
    if dtype not in _DTYPES:
        raise ModelError(f"dtype {dtype!r}: expected one of {', '.join(_DTYPES)}")
    source = Path(path).expanduser()
    model_dir, adapter = resolve_source(source)
    qlora = False
    if adapter is None:
        model, model_dir = load_model(str(model_dir), dtype=torch.float32, device=device)
        tokenizer = load_tokenizer(None, model_dir)
    else:
        spec, recorded = read_adapter_config(adapter)
        base = base_model or recorded
        if not base:
            raise ModelError(f"{adapter}: adapter_config.json names no base model; pass --base-model")
        model, model_dir = load_model(base, dtype=torch.float32, device=device)
        qlora = (adapter / BASE_QUANTIZATION).is_file()
        if qlora:  # a bnb-4bit base is NF4 already: its projections are not nn.Linear, so left as they are
            nf4_round_trip(model, spec.target_modules, _quantized_from(adapter / BASE_QUANTIZATION))
        load_adapter(model, adapter)
        if merge:
            merge_lora(model)
        try:
            tokenizer = load_tokenizer(None, adapter)
        except ModelError:
            tokenizer = load_tokenizer(None, model_dir)
    model = model.to(_DTYPES[dtype]).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return TunedModel(model, tokenizer, source.resolve().name, source, model_dir, adapter, qlora)


def _quantized_from(info_file: Path) -> torch.dtype:
    """The dtype a QLoRA base was quantized from (adapters written before this was recorded: float32)."""
    try:
        name = json.loads(info_file.read_text()).get("quantized_from", "float32")
    except (json.JSONDecodeError, AttributeError):
        raise ModelError(f"{info_file}: not a JSON object") from None
    if name not in DTYPE_NAMES:
        raise ModelError(f"{info_file}: quantized_from {name!r} is not float32, bfloat16 or float16")
    return getattr(torch, name)


def load_with_adapters(path: str | Path, adapters: list[tuple[str, Path]], *, dtype: str = "float32",
                       device: str = "cpu") -> TunedModel:
    """A base model with several adapters on it, unmerged, each chosen per sequence (models/multi_lora.py;
    `adapters`: (name, adapter or run directory), numbered 1.. in this order). Every adapter must have
    been trained on this base."""
    loaded = load_tuned(path, dtype=dtype, device=device)
    if loaded.adapter_dir is not None:
        raise ModelError(f"{loaded.source}: is an adapter; adapters go on a base model: name the base model "
                         "directory, and this adapter as one of the adapters")
    dirs = []
    for name, where in adapters:
        adapter = adapter_in(Path(where).expanduser())
        if adapter is None:
            raise ModelError(f"adapter {name}: {where} holds no {ADAPTER_CONFIG} (an adapter or run directory?)")
        _check_base(name, adapter, loaded)
        dirs.append((name, adapter))
    attach_adapters(loaded.model, dirs)
    loaded.adapters = [name for name, _ in adapters]
    return loaded


def _check_base(name: str, adapter: Path, loaded: TunedModel) -> None:
    """The adapter's recorded base is the served one: the same directory, the same name, or a hub id whose
    last part is the directory's name (a local copy of it)."""
    _, recorded = read_adapter_config(adapter)
    if not recorded:
        return
    given = Path(recorded).expanduser()
    same = (recorded == str(loaded.source) or given.name == loaded.source.resolve().name
            or (given.is_dir() and given.resolve() in (loaded.source.resolve(), loaded.model_dir.resolve())))
    if not same:
        raise ModelError(f"adapter {name} ({adapter}): was trained on {recorded!r}, not on {str(loaded.source)!r}; "
                         f"serve it on its own base (or, if that is this model under another name, set "
                         f"base_model_name_or_path in {adapter / ADAPTER_CONFIG})")
