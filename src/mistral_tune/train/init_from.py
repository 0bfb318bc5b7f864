"""Starting a run from an earlier run's LoRA adapter (the config's init_from): which adapter, whether it
fits this run (checked before anything loads, every mismatch a ConfigError naming init_from), and its
tensors copied into the run's freshly made adapter before the first step.

The run then trains that adapter further and writes it whole: the adapter it saves is for the same
base and holds the earlier run's training too. For dpo, ipo and kto the reference is the model the run
starts from, the base with that adapter (the training loop measures it after the copy).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from ..errors import ConfigError, ModelError
from ..models.load import local_part
from ..models.peft_format import ADAPTER_WEIGHTS, BASE_QUANTIZATION, adapter_tensors, read_adapter_config
from ..models.tuned import adapter_in


def init_adapter_dir(cfg, model_dir: Path) -> Path:
    """The adapter directory cfg.init_from names (a run directory or the adapter itself), checked against
    the config: LoRA shape, QLoRA or not, base model."""
    path = Path(cfg.init_from).expanduser()
    adapter = adapter_in(path) if path.is_dir() else None
    if adapter is None:
        raise ConfigError(f"init_from: {path}: no LoRA adapter there (expected a run directory with adapter/ in it, "
                          "or an adapter directory with adapter_config.json)")
    try:
        spec, base = read_adapter_config(adapter)
    except ModelError as exc:
        raise ConfigError(f"init_from: {exc}") from None
    ours = {"lora_r": cfg.lora_r, "lora_alpha": float(cfg.lora_alpha), "use_rslora": cfg.use_rslora,
            "use_dora": cfg.use_dora, "lora_modules_to_save": sorted(cfg.lora_modules_to_save)}
    theirs = {"lora_r": spec.r, "lora_alpha": spec.alpha, "use_rslora": spec.use_rslora, "use_dora": spec.use_dora,
              "lora_modules_to_save": sorted(spec.modules_to_save)}
    differ = [k for k in ours if ours[k] != theirs[k]]
    if differ:
        raise ConfigError(f"init_from: {adapter} has " + ", ".join(f"{k} {theirs[k]!r}" for k in differ)
                          + "; this config " + ", ".join(f"{k} {ours[k]!r}" for k in differ)
                          + ": set them as the adapter has them")
    qlora = (adapter / BASE_QUANTIZATION).is_file()
    if qlora != (cfg.adapter == "qlora"):
        raise ConfigError(f"init_from: {adapter} was trained {'on an NF4 base (qlora)' if qlora else 'with lora'}; "
                          f"set adapter: {'qlora' if qlora else 'lora'}")
    recorded = Path(base).expanduser() if base else None
    # a base that moved since (its recorded path is gone) cannot be compared: the tensors' shapes still are
    if recorded is not None and base != cfg.base_model and (recorded.exists() or not recorded.is_absolute()):
        if not recorded.exists() or recorded.resolve() != Path(model_dir).resolve():
            raise ConfigError(f"init_from: {adapter} was trained on {base}, not on base_model {cfg.base_model}")
    if not (adapter / ADAPTER_WEIGHTS).is_file():
        raise ConfigError(f"init_from: {adapter}: no {ADAPTER_WEIGHTS}")
    return adapter


@torch.no_grad()
def load_init_adapter(model, named: dict[str, torch.nn.Parameter], adapter: Path) -> None:
    """The saved adapter's tensors into the run's trainable parameters `named` (each process its own part of
    a sharded one); a ConfigError when they do not match one for one."""
    tensors = adapter_tensors(model, adapter)
    missing, unexpected = sorted(set(named) - set(tensors)), sorted(set(tensors) - set(named))
    if missing or unexpected:
        raise ConfigError(f"init_from: {adapter / ADAPTER_WEIGHTS} does not fit this run's adapter ({len(missing)} "
                          f"missing, {len(unexpected)} unexpected tensors, e.g. {(missing or unexpected)[0]}); set "
                          "lora_target_modules and new_special_tokens as that run had them")
    for name, p in named.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(p.shape):
            raise ConfigError(f"init_from: {adapter / ADAPTER_WEIGHTS}: {name} has shape {tuple(t.shape)}, this "
                              f"run's {tuple(p.shape)} (an adapter of another model?)")
        (p.to_local() if isinstance(p, DTensor) else p).copy_(local_part(p, t.to(p.dtype)))
