"""Writing an HF model directory: a LoRA adapter merged into its base, or a full fine-tune.

The directory is what transformers, vLLM and TGI load: config.json, generation_config.json,
safetensors (sharded with model.safetensors.index.json above max_shard_bytes), the mistral-common
tokenizer file (for our own tools and mistral-common users) and HF tokenizer files with a chat
template that renders mistral-common's ids (export/hf_tokenizer.py).
"""

from __future__ import annotations

from pathlib import Path

from ..dtypes import DTYPE_NAMES
from ..errors import ModelError
from ..fsutil import check_target, replace_dir, run_folder
from ..models.load import save_model
from ..models.peft_format import read_adapter_config
from ..models.tuned import adapter_in, load_tuned
from .card import write_card
from .hf_tokenizer import save_hf_tokenizer

MERGE_DTYPES = tuple(sorted(DTYPE_NAMES))  # all of them, listed alphabetically in its messages


def find_adapter(run_or_adapter: Path) -> Path:
    """Accept an adapter directory or a run's output directory (which holds adapter/)."""
    adapter = adapter_in(Path(run_or_adapter))
    if adapter is None:
        raise ModelError(f"{run_or_adapter}: neither an adapter directory nor a run directory with adapter/")
    return adapter


def write_hf_model(model, tokenizer, out_dir: Path, dtype: str = "float32",
                   max_shard_bytes: int = 5_000_000_000, state: dict | None = None) -> None:
    """Weights, config and both tokenizers (mistral-common's file, HF's files) into out_dir: the
    model directory of a merge and of a full fine-tune alike. `state`: the weights when the model's
    own are shards (gathered by the trainer)."""
    save_model(model, out_dir, dtype=dtype, max_shard_bytes=max_shard_bytes, state=state)
    tokenizer.save(out_dir)
    save_hf_tokenizer(tokenizer, out_dir)


def merge_to_dir(
    adapter_dir: Path,
    out_dir: Path,
    base_model: str | None = None,
    dtype: str = "float32",
    max_shard_bytes: int = 5_000_000_000,  # HF's "5GB"
    echo=print,
    overwrite: bool = False,
) -> Path:
    """Base model + adapter -> merged HF model directory (weights, config, tokenizer files).

    The merge itself runs in float32 (W + scaling * B @ A), then the weights are cast to dtype
    once. Written to a temporary sibling directory first, then renamed, so a failure leaves nothing.
    out_dir must be new or empty, or (overwrite) an earlier merged model (fsutil.check_target).
    """
    if dtype not in MERGE_DTYPES:
        raise ModelError(f"merge dtype {dtype!r}: expected one of {', '.join(MERGE_DTYPES)}")
    if max_shard_bytes <= 0:
        raise ModelError(f"max shard size must be positive, got {max_shard_bytes}")
    adapter_dir = find_adapter(Path(adapter_dir))
    _, recorded_base = read_adapter_config(adapter_dir)
    base = base_model or recorded_base
    if not base:
        raise ModelError(f"{adapter_dir}: adapter_config.json names no base model; pass --base-model")
    out_dir = check_target(out_dir, "merged", sources=[adapter_dir, base], overwrite=overwrite)
    tuned = load_tuned(adapter_dir, base_model)
    if tuned.qlora:
        echo("QLoRA adapter: merged after dequantizing the NF4 base it was trained on, so the merged model is the "
             "one that was trained")
    def write(tmp: Path) -> None:
        write_hf_model(tuned.model, tuned.tokenizer, tmp, dtype, max_shard_bytes)
        write_card(tmp, base_model=base, run=run_folder(adapter_dir), name=out_dir.name)

    return replace_dir(out_dir, write, "merged", [adapter_dir, base])


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes (HF's max_shard_size spelling)."""
    units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    t = text.strip().upper()
    unit = next((u for u in units if t.endswith(u)), "B")
    number, factor = t.removesuffix(unit).strip(), units[unit]
    try:
        value = float(number)
    except ValueError:
        raise ModelError(f"size {text!r}: expected a number with an optional unit, e.g. 5GB or 500MB") from None
    if value <= 0:
        raise ModelError(f"size {text!r} must be positive")
    return int(value * factor)
