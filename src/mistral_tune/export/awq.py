"""AWQ 4-bit export through llm-compressor (`pip install 'mistral-tune[awq]'`).

AutoAWQ is unmaintained; llm-compressor (the vLLM project's successor) runs AWQ and writes the
compressed-tensors format, which vLLM loads natively and transformers loads with
compressed-tensors installed. llm-compressor 0.14's AWQ needs an accelerator (it pins
activations for the GPU), so this runs on a GPU machine. Calibration uses the run's own
training data (as the model saw it, formatted by mistral-common), because activation statistics
from the target distribution are what AWQ's scales are fitted to.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ..errors import ConfigError, ModelError
from ..fsutil import check_target, replace_dir
from .hf_tokenizer import TOKENIZER_FILES

SCHEMES = ("W4A16_ASYM", "W4A16")


def _require_llmcompressor():
    try:
        from llmcompressor import oneshot
        from llmcompressor.modifiers.awq import AWQModifier
    except ImportError as exc:
        raise ModelError(
            f"AWQ export needs llm-compressor ({exc.name or exc} is missing): pip install 'mistral-tune[awq]' "
            "(on the GPU machine; it pins its own transformers version, so use a separate environment "
            "if your training environment needs another)"
        ) from None
    return oneshot, AWQModifier


def calibration_ids(run_dir: Path, tokenizer, n: int, max_len: int) -> list[list[int]]:
    """Token ids of up to n training samples of the run (its config.yaml names the datasets)."""
    from ..config import load_config
    from ..data.build import build_dataset

    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(f"{run_dir}: no config.yaml, so the run's dataset is unknown; pass --calibration-config")
    cfg = load_config(cfg_path)
    data = build_dataset(cfg, tokenizer)
    samples = [list(s.tokens)[:max_len] for s in data.train[:n]]  # a slice: no need to build every sample
    if not samples:
        raise ConfigError(f"{cfg_path}: the run's datasets give no samples to calibrate on")
    return samples


def export_awq(
    source: Path,
    out_dir: Path,
    calibration_config: Path | None = None,
    num_samples: int = 128,
    max_seq_len: int = 512,
    scheme: str = "W4A16_ASYM",
    base_model: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Quantize a merged model (or a run, merged first) with AWQ into out_dir, which must be new or empty,
    or (overwrite) an earlier AWQ model (fsutil.check_target)."""
    if scheme not in SCHEMES:
        raise ConfigError(f"--scheme {scheme!r}: expected one of {', '.join(SCHEMES)}")
    out_dir = check_target(out_dir, "awq", sources=[source, base_model, calibration_config], overwrite=overwrite)
    oneshot, AWQModifier = _require_llmcompressor()  # noqa: N806 (a class)
    import torch

    if not torch.accelerator.is_available():
        # llm-compressor 0.14 pins calibration activations for the accelerator during AWQ's
        # grid search, which fails outright on a CPU-only machine.
        raise ModelError("AWQ through llm-compressor needs a GPU (none is visible here); run this command on "
                         "the GPU machine, or export --quant q4_k_m GGUF for CPU inference")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from ..chat import load_tokenizer
    from ..models.tuned import resolve_source
    from .hf import merge_to_dir

    source = Path(source)
    model_dir, adapter = resolve_source(source)
    run_dir = source if (source / "config.yaml").is_file() else source.parent
    with tempfile.TemporaryDirectory() as tmp:
        if adapter is not None:  # AWQ needs the merged weights
            model_dir = merge_to_dir(adapter, Path(tmp) / "merged", base_model=base_model, dtype="bfloat16")
        tokenizer = load_tokenizer(None, model_dir)
        if calibration_config is not None:
            cal_dir = Path(tmp) / "cal"
            cal_dir.mkdir()
            shutil.copy(calibration_config, cal_dir / "config.yaml")
            run_dir = cal_dir
        ids = calibration_ids(run_dir, tokenizer, num_samples, max_seq_len)
        dataset = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]})
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
        recipe = [AWQModifier(ignore=["lm_head"], scheme=scheme, targets=["Linear"])]
        oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=max_seq_len,
                num_calibration_samples=len(ids))

        def write(staging: Path) -> None:
            model.save_pretrained(staging, save_compressed=True)
            # Our tokenizer files (HF + mistral-common), not a re-save through transformers.
            for name in (*TOKENIZER_FILES, tokenizer.save_name(), "generation_config.json"):
                if (model_dir / name).is_file():
                    shutil.copy(model_dir / name, staging / name)

        return replace_dir(out_dir, write, "awq", [source, base_model])
