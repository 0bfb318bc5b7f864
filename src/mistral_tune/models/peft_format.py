"""PEFT's adapter files: adapter_config.json + adapter_model.safetensors as PEFT reads and writes
them, the key names there (ours <-> PEFT's, Mixtral's experts and a vision-language wrapper
included), the note beside a QLoRA adapter (base_quantization.json), and the PiSSA / OLoRA starting
factors a checkpoint keeps (lora_init.safetensors). The layers these tensors belong to are lora.py's.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ModelError
from ..fsutil import atomic_write_text
from .families import EXPERT_TARGETS
from .lora import WHOLE_MODULES, LoraSpec, apply_lora, initialised_layers
from .mistral import Experts
from .quant import BLOCKSIZE, NF4Linear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: A checkpoint's PiSSA / OLoRA starting factors A0, B0 (resume puts them back; save_adapter subtracts them).
LORA_INIT_WEIGHTS = "lora_init.safetensors"
# Written beside a QLoRA adapter: the base it was trained on was NF4, so a merge must use the
# dequantized NF4 weights to give the trained model. (PEFT's config has no field for it.)
BASE_QUANTIZATION = "base_quantization.json"
_PEFT_PREFIX = "base_model.model."


def _text_model_path(model: nn.Module) -> str:
    """Where transformers (and so PEFT) holds our `model.` decoder: under model.language_model for the
    text model of a vision-language checkpoint (Mistral3ForConditionalGeneration)."""
    return "model.language_model." if getattr(getattr(model, "config", None), "wrapper", None) else "model."


_OUR_EXPERT_LORA = re.compile(r"\.experts\.lora\.(\w+)\.(?=lora_[AB]\.)")
_PEFT_EXPERT_LORA = re.compile(r"\.experts\.((?:base_layer\.)*)(?=lora_[AB]\.)")


def _expert_adapters(model: nn.Module) -> list[str]:
    """The stacked expert weights that carry adapters, in Experts.STACKED order."""
    experts = next((m for m in model.modules() if isinstance(m, Experts)), None)
    return [] if experts is None else [p for p in Experts.STACKED if p in experts.lora]


def expert_pair_infixes(stacked) -> dict[str, str]:
    """Where PEFT keeps the pair of each adapted stacked expert weight: what comes between
    `<layer>.mlp.experts.` and `lora_A`. PEFT wraps the experts module once per adapted weight, in
    Experts.STACKED order, the last outermost: its pair is <experts>.lora_A, the one inside it
    <experts>.base_layer.lora_A, and so on."""
    names = [p for p in Experts.STACKED if p in stacked]
    return {p: "base_layer." * (len(names) - 1 - i) for i, p in enumerate(names)}


def _peft_key(model: nn.Module, name: str) -> str:
    """Our parameter name -> PEFT's saved key (base_model.model.<module>.lora_A.weight, ...)."""
    if m := _OUR_EXPERT_LORA.search(name):
        infix = expert_pair_infixes(_expert_adapters(model))[m[1]]
        name = f"{name[:m.start()]}.experts.{infix}{name[m.end():]}"
    if name.startswith("model."):
        name = _text_model_path(model) + name.removeprefix("model.")
    return _PEFT_PREFIX + name.replace(".trainable_tokens_delta", ".token_adapter.trainable_tokens_delta")


def our_key(model: nn.Module, key: str) -> str:
    """PEFT's saved key (also in its in-memory form, with the adapter name) -> our parameter name."""
    name = key.removeprefix(_PEFT_PREFIX).replace(".token_adapter.", ".")
    name = name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
    if m := _PEFT_EXPERT_LORA.search(name):
        by_infix = {infix: p for p, infix in expert_pair_infixes(_expert_adapters(model)).items()}
        if m[1] in by_infix:  # else a key no adapter of this model has: reported by load_adapter
            name = f"{name[:m.start()]}.experts.lora.{by_infix[m[1]]}.{name[m.end():]}"
    inner = _text_model_path(model)
    return "model." + name.removeprefix(inner) if name.startswith(inner) else name


def adapter_state(model: nn.Module, spec: LoraSpec) -> dict[str, torch.Tensor]:
    """The adapter's tensors under our parameter names: LoRA A/B, DoRA magnitudes, trained token
    rows, and the modules trained whole."""
    whole = {f"{WHOLE_MODULES[m]}.weight" for m in spec.modules_to_save}
    return {k: v for k, v in model.state_dict().items()
            if k in whole or ".lora_A." in k or ".lora_B." in k
            or k.endswith((".lora_magnitude_vector", ".trainable_tokens_delta"))}


def save_adapter(
    model: nn.Module, spec: LoraSpec, out_dir: Path, base_model: str, dtype: torch.dtype | None = None
) -> None:
    """Write a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors).

    After PiSSA / OLoRA, for the original base: W + s (BA - B0 A0) is the trained W_res + s BA, written
    as the rank-2r LoRA A' = [A; A0], B' = [B, -B0] with alpha doubled (by sqrt 2 with rsLoRA) so the
    scale stays s, as PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) writes it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stacked = _expert_adapters(model)
    state = adapter_state(model, spec)
    initial = lora_init_state(model)
    for key, start in initial.items():
        if ".lora_A." in key:
            state[key] = torch.cat([state[key], start])
        else:
            state[key] = torch.cat([state[key], -start], dim=1)
    tensors = {_peft_key(model, k): v.detach().contiguous() for k, v in state.items()}
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    # NF4 projections and experts; an FP8 base writes nothing: its adapter merges into the original weights.
    quantized = [m for m in model.modules() if isinstance(m, NF4Linear)]
    if quantized:
        info = {"quant_type": "nf4", "blocksize": BLOCKSIZE, "double_quant": True, "library": "bitsandbytes"}
        if quantized[0].quantized_from is not None:  # None: the base was read quantized (bnb-4bit)
            info["quantized_from"] = str(quantized[0].quantized_from).removeprefix("torch.")
        (out_dir / BASE_QUANTIZATION).write_text(json.dumps(info, indent=2) + "\n")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": 2 * spec.r if initial else spec.r,
        "lora_alpha": spec.alpha * (math.sqrt(2) if spec.use_rslora else 2) if initial else spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": sorted(t for t in spec.target_modules if not (stacked and t in EXPERT_TARGETS)),
        "use_rslora": spec.use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": sorted(spec.modules_to_save) or None,
        "use_dora": spec.use_dora,
        "trainable_token_indices": {k: sorted(v) for k, v in spec.trainable_tokens.items()} or None,
    }
    if stacked:  # PEFT's LoRA on parameters, by their path below a decoder layer
        config["target_parameters"] = [f"mlp.experts.{p}" for p in stacked]
    atomic_write_text(out_dir / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")


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
    targets = list(targets) if isinstance(targets, list) else [targets]
    for param in data.get("target_parameters") or []:
        name = str(param).rpartition(".")[2]
        if name not in Experts.STACKED or not str(param).endswith(f"experts.{name}"):
            raise ModelError(f"{path}: target_parameters {param!r}: only Mixtral's experts "
                             f"(mlp.experts.{' / '.join(Experts.STACKED)}) are supported")
        targets.append(name)
    tokens = data.get("trainable_token_indices") or {}
    if isinstance(tokens, list):  # PEFT: a plain list means the input embedding
        tokens = {"embed_tokens": tokens}
    whole = list(data.get("modules_to_save") or [])
    unknown = sorted((set(whole) | set(tokens)) - set(WHOLE_MODULES))
    if unknown:
        raise ModelError(f"{path}: modules_to_save / trainable_token_indices name {unknown}; "
                         f"only {', '.join(WHOLE_MODULES)} are supported")
    spec = LoraSpec(
        r=int(data["r"]),
        alpha=float(data.get("lora_alpha", data["r"])),
        dropout=float(data.get("lora_dropout", 0.0)),
        target_modules=targets,
        use_rslora=bool(data.get("use_rslora", False)),
        use_dora=bool(data.get("use_dora", False)),
        modules_to_save=whole,
        trainable_tokens={k: [int(i) for i in v] for k, v in tokens.items()},
    )
    return spec, data.get("base_model_name_or_path", "")


def adapter_tensors(model: nn.Module, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """A saved adapter's tensors under our parameter names (of `model`, whose adapters are on)."""
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise ModelError(f"{adapter_dir}: no {ADAPTER_WEIGHTS} (only safetensors adapters are read)")
    return {our_key(model, k): v for k, v in load_file(str(adapter_dir / ADAPTER_WEIGHTS)).items()}


def load_adapter(model: nn.Module, adapter_dir: Path) -> LoraSpec:
    """Attach a saved PEFT adapter to a plain model (wraps the targets, then loads its tensors)."""
    spec, _ = read_adapter_config(adapter_dir)
    apply_lora(model, spec)
    state = adapter_tensors(model, adapter_dir)
    own = set(adapter_state(model, spec))
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


def lora_init_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The PiSSA / OLoRA starting factors under the names of the factors they started (`<module>.lora_A.weight`)."""
    state = {}
    for name, m in initialised_layers(model).items():
        state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = m.lora_init_A, m.lora_init_B
    return state


def save_lora_init(model: nn.Module, checkpoint_dir: Path) -> None:
    """Write the PiSSA / OLoRA starting factors (lora_init_state) into a checkpoint; nothing without them."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in lora_init_state(model).items()}
    if state:
        save_file(state, str(checkpoint_dir / LORA_INIT_WEIGHTS))


def restore_lora_init(model: nn.Module, checkpoint_dir: Path) -> None:
    """Put a checkpoint's starting factors (save_lora_init) back: the frozen residual weights are the ones
    the checkpoint's run trained on, even where this run's SVD / QR came out otherwise."""
    layers = initialised_layers(model)
    path = checkpoint_dir / LORA_INIT_WEIGHTS
    state = load_file(str(path)) if path.is_file() else {}
    if set(state) != set(lora_init_state(model)):
        raise ModelError(f"{path}: does not hold the starting factors of this model's {len(layers)} PiSSA / OLoRA "
                         f"layers ({len(state)} tensors); was the checkpoint written with another lora_init?")
    for name, m in layers.items():
        m.set_initial(state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"])
