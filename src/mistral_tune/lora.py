"""LoRA adapters: the layer, attaching to a model, PEFT-format save/load, and merging.

A `LoraLinear` *is* the frozen `nn.Linear` it adapts (same `weight` parameter, same name), plus
`lora_A` / `lora_B`, so state-dict keys match transformers for the base and PEFT for the adapter.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import ModelError
from .models.quant import NF4Linear
from .models.recompute import linear_grad_only

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Written beside a QLoRA adapter: the base it was trained on was NF4, so a merge must use the
# dequantized NF4 weights to give the trained model. (PEFT's config has no field for it.)
BASE_QUANTIZATION = "base_quantization.json"
_PEFT_PREFIX = "base_model.model."


@dataclass
class LoraSpec:
    r: int = 16
    alpha: float = 16
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        # rsLoRA scales by alpha/sqrt(r) so larger ranks keep learning (Kalajdzievski, 2023).
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoraLinear(nn.Linear):
    """y = x W^T + scaling * dropout(x) A^T B^T, with W frozen and B initialised to zero.

    W is the adapted nn.Linear's own weight, or (QLoRA) a frozen NF4 layer from models/quant.py.
    """

    def __init__(self, base: nn.Module, spec: LoraSpec) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        if isinstance(base, nn.Linear):
            self.weight = base.weight
            self.weight.requires_grad_(False)
            self.quantized = None
            dev, dt = base.weight.device, base.weight.dtype
        else:
            self.register_parameter("weight", None)
            self.quantized = base
            dev, dt = base.device, torch.float32
        self.register_parameter("bias", None)
        self.lora_A = nn.Linear(self.in_features, spec.r, bias=False, device=dev, dtype=dt)
        self.lora_B = nn.Linear(spec.r, self.out_features, bias=False, device=dev, dtype=dt)
        self.lora_dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.scaling = spec.scaling
        self.disabled = False  # adapters_disabled(): the base model's output, in place
        self.reset_lora(None)

    def reset_lora(self, generator: torch.Generator | None) -> None:
        # Same init as PEFT's default: A kaiming-uniform, B zero, so training starts at the base model.
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform with a=sqrt(5)
        with torch.no_grad():
            self.lora_A.weight.uniform_(-bound, bound, generator=generator)
            self.lora_B.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.linear(x, self.weight) if self.quantized is None else self.quantized(x)
        return out if self.disabled else out + self._lora(x)

    def grad_only(self, x: torch.Tensor) -> torch.Tensor:
        """forward(x) when the result is only back-propagated through (models/recompute.py): the
        frozen product is skipped, the low-rank branch runs as usual."""
        base = self.quantized.grad_only(x) if self.quantized is not None else linear_grad_only(x, self.weight)
        return base + self._lora(x)

    def _lora(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.lora_A.out_features}, scaling={self.scaling:g}"


def apply_lora(model: nn.Module, spec: LoraSpec, seed: int | None = None) -> list[str]:
    """Freeze every parameter, then wrap the target projections. Returns the wrapped module names."""
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in spec.target_modules and type(child) in (nn.Linear, NF4Linear):
                lora = LoraLinear(child, spec)
                if generator is not None and lora.lora_A.weight.device.type == "cpu":
                    lora.reset_lora(generator)
                setattr(module, child_name, lora)
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise ModelError(f"lora_target_modules {spec.target_modules} matched no linear layer")
    return wrapped


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, LoraLinear) for m in model.modules())


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes as its base: every adapter's low-rank branch is skipped.
    Nothing is copied, so the base and the tuned model can be compared on one copy in memory."""
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, was in zip(layers, before, strict=True):
            m.disabled = was


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors under PEFT's key names (base_model.model.<module>.lora_A.weight)."""
    return {
        _PEFT_PREFIX + k: v.detach().contiguous()
        for k, v in model.state_dict().items()
        if ".lora_A." in k or ".lora_B." in k
    }


def save_adapter(
    model: nn.Module, spec: LoraSpec, out_dir: Path, base_model: str, dtype: torch.dtype | None = None
) -> None:
    """Write a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = lora_state_dict(model)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    if any(isinstance(m, LoraLinear) and m.quantized is not None for m in model.modules()):
        from .models.quant import BLOCKSIZE

        info = {"quant_type": "nf4", "blocksize": BLOCKSIZE, "double_quant": True, "library": "bitsandbytes"}
        (out_dir / BASE_QUANTIZATION).write_text(json.dumps(info, indent=2) + "\n")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.r,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": sorted(spec.target_modules),
        "use_rslora": spec.use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_dora": False,
    }
    tmp = out_dir / (ADAPTER_CONFIG + ".tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, out_dir / ADAPTER_CONFIG)


def read_adapter_config(adapter_dir: Path) -> tuple[LoraSpec, str]:
    """(spec, base_model_name_or_path) from a PEFT adapter directory."""
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise ModelError(f"{adapter_dir}: no {ADAPTER_CONFIG} (is this a LoRA adapter directory?)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: not valid JSON ({exc.msg})") from None
    if data.get("peft_type") != "LORA":
        raise ModelError(f"{path}: peft_type {data.get('peft_type')!r} is not LORA")
    targets = data.get("target_modules") or []
    spec = LoraSpec(
        r=int(data["r"]),
        alpha=float(data.get("lora_alpha", data["r"])),
        dropout=float(data.get("lora_dropout", 0.0)),
        target_modules=list(targets) if isinstance(targets, list) else [targets],
        use_rslora=bool(data.get("use_rslora", False)),
    )
    return spec, data.get("base_model_name_or_path", "")


def load_adapter(model: nn.Module, adapter_dir: Path) -> LoraSpec:
    """Attach a saved PEFT adapter to a plain model (wraps the targets, then loads A/B)."""
    spec, _ = read_adapter_config(adapter_dir)
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise ModelError(f"{adapter_dir}: no {ADAPTER_WEIGHTS} (only safetensors adapters are read)")
    apply_lora(model, spec)
    tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    state = {}
    for key, value in tensors.items():
        name = key.removeprefix(_PEFT_PREFIX).replace(".lora_A.default.", ".lora_A.").replace(
            ".lora_B.default.", ".lora_B."
        )
        state[name] = value
    own = {k for k in model.state_dict() if ".lora_" in k}
    missing, unexpected = own - set(state), set(state) - own
    if missing or unexpected:
        example = sorted(missing or unexpected)[0]
        raise ModelError(
            f"{adapter_dir / ADAPTER_WEIGHTS}: does not fit the model "
            f"({len(missing)} missing, {len(unexpected)} unexpected tensors, e.g. {example})"
        )
    own_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k in own}
    for key in sorted(state):
        if tuple(state[key].shape) != own_shapes[key]:
            raise ModelError(
                f"{adapter_dir / ADAPTER_WEIGHTS}: tensor {key} has shape {tuple(state[key].shape)}, the model "
                f"and adapter_config.json imply {own_shapes[key]} (adapter for another model or rank?)"
            )
    model.load_state_dict(state, strict=False)
    return spec


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight and put plain nn.Linear layers back. Returns the count."""
    merged = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoraLinear):
                # A QLoRA base is dequantized first: the merge is the model that was trained.
                base = child.weight if child.quantized is None else child.quantized.dequantized(torch.float32)
                plain = nn.Linear(child.in_features, child.out_features, bias=False,
                                  device=base.device, dtype=base.dtype)
                plain.weight.copy_((base.float() + child.delta_weight()).to(base.dtype))
                setattr(module, child_name, plain)
                merged += 1
    return merged
