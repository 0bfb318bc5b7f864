"""A LoRA adapter as vLLM's LoRA loader accepts it (PEFT format, checked before it ships).

vLLM reads adapter_config.json through its `PEFTHelper` and the tensors by PEFT key name
(`base_model.model.<module>.lora_A.weight`). What it refuses, it refuses at request time on
the GPU server, so we check here: no modules_to_save (vLLM: "only supports modules_to_save
being None"), no DoRA, no trainable tokens (only LoRA A/B tensors load), bias "none", r and
lora_alpha present, every adapted module one of the projections vLLM can adapt in a Mistral
model, and a rank within --max-lora-rank. Adapters it refuses serve in vLLM once merged.

LoRA on Mixtral's experts is refused too: we write it as PEFT does for transformers' stacked experts
(target_parameters, one A/B pair per stacked weight), and vLLM reads that layout only for models that
declare 3D MoE LoRA weights (`is_3d_moe_weight`); its Mixtral does not, and expects a pair per expert
and projection (experts.<e>.w1/w2/w3) instead.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors import safe_open

from ..errors import ModelError
from ..fsutil import check_target, replace_dir
from ..lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .hf import find_adapter

#: Projections vLLM's Mistral model exposes to LoRA (q/k/v pack into qkv_proj, gate/up into gate_up_proj).
VLLM_LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Values vLLM accepts for --max-lora-rank.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_PREFIX = "base_model.model."


def vllm_adapter_problems(adapter_dir: Path) -> list[str]:
    """Reasons vLLM would refuse this adapter (empty when it loads)."""
    problems: list[str] = []
    try:
        cfg = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return [f"{ADAPTER_CONFIG}: unreadable ({exc})"]
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg:
            problems.append(f"{ADAPTER_CONFIG}: missing {key!r}")
    if cfg.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {cfg.get('peft_type')!r}: vLLM serves LoRA adapters only")
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save {cfg['modules_to_save']}: vLLM only supports modules_to_save being None")
    if cfg.get("use_dora"):
        problems.append("use_dora: vLLM does not support DoRA")
    if cfg.get("trainable_token_indices"):
        problems.append(f"trainable tokens {cfg['trainable_token_indices']} (new special tokens): vLLM loads "
                        "LoRA A/B tensors only")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias {cfg['bias']!r}: vLLM needs bias 'none' (unless started with bias support)")
    r = cfg.get("r")
    if isinstance(r, int) and r > max(VLLM_MAX_LORA_RANKS):
        problems.append(f"r={r}: above vLLM's largest --max-lora-rank ({max(VLLM_MAX_LORA_RANKS)})")
    targets = cfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    bad = sorted(set(targets) - set(VLLM_LORA_MODULES))
    if bad:
        problems.append(f"target_modules {bad}: vLLM adapts only {', '.join(VLLM_LORA_MODULES)} in Mistral models")

    if cfg.get("target_parameters"):
        problems.append(f"target_parameters {cfg['target_parameters']} (LoRA on Mixtral's stacked experts): vLLM "
                        "reads this layout only for models with 3D MoE LoRA weights, and its Mixtral expects one "
                        "adapter per expert and projection (experts.<e>.w1/w2/w3)")

    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        return problems + [f"{ADAPTER_WEIGHTS}: missing (vLLM reads safetensors, not .bin)"]
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            if cfg.get("target_parameters") and ".experts." in key:
                continue  # refused above
            # vLLM's parse_fine_tuned_lora_name: base_model.model.<module>.lora_{A,B}.weight
            module, _, rest = key.removeprefix(_PREFIX).rpartition(".lora_")
            if not key.startswith(_PREFIX) or rest not in ("A.weight", "B.weight"):
                problems.append(f"tensor {key}: not a PEFT LoRA key (base_model.model.<module>.lora_A/B.weight)")
                break
            if module.rsplit(".", 1)[-1] not in VLLM_LORA_MODULES:
                problems.append(f"tensor {key}: module {module} cannot be adapted by vLLM")
                break
            shape = f.get_slice(key).get_shape()
            if isinstance(r, int) and (shape[0] if rest == "A.weight" else shape[1]) != r:
                problems.append(f"tensor {key}: shape {shape} does not match r={r}")
                break
    return problems


def min_max_lora_rank(r: int) -> int:
    """The smallest --max-lora-rank value vLLM accepts that fits rank r."""
    return next(v for v in VLLM_MAX_LORA_RANKS if v >= r)


def export_adapter(run_or_adapter: Path, out_dir: Path | None = None, overwrite: bool = False) -> tuple[Path, dict]:
    """Check the adapter for vLLM; optionally copy it (config, weights, tokenizer) to out_dir, which must be
    new or empty, or (overwrite) an earlier exported adapter (fsutil.check_target)."""
    adapter = find_adapter(Path(run_or_adapter))
    problems = vllm_adapter_problems(adapter)
    if problems:
        raise ModelError(f"{adapter}: vLLM would not load this adapter: " + "; ".join(problems)
                         + ". Merge it (mistral-tune merge) and serve the merged model instead")
    cfg = json.loads((adapter / ADAPTER_CONFIG).read_text())
    if out_dir is not None:
        out_dir = check_target(out_dir, "adapter", sources=[adapter], overwrite=overwrite)
        source = adapter
        adapter = replace_dir(out_dir, lambda tmp: shutil.copytree(source, tmp, dirs_exist_ok=True), "adapter",
                              [source])
    return adapter, cfg
