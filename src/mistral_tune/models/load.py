"""Reading and writing HF-format Mistral and Mixtral checkpoints (config.json + safetensors, sharded or not).

Mixtral's experts are read from either layout: the hub's (one w1/w2/w3 matrix per expert under
`block_sparse_moe`) or the stacked 3D tensors transformers 5 writes (`mlp.experts.gate_up_proj`,
`mlp.experts.down_proj`). They are written in the hub's layout, which every consumer reads
(transformers 4 and 5, vLLM, llama.cpp's converter).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..dtypes import DTYPE_NAMES
from ..errors import ModelError
from ..fsutil import atomic_write_text
from .families import family_of
from .mistral import MistralConfig, MistralForCausalLM

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}  # "bfloat16" -> torch.bfloat16, ...


def resolve_model_dir(name_or_path: str, weights: bool = True) -> Path:
    """A local directory as is; otherwise a hub id fetched (or taken from the cache) by huggingface_hub.
    weights=False fetches the config and tokenizer files only (what `plan` and the checks read)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1
    if looks_local or path.exists():
        raise ModelError(f"base_model: directory not found: {name_or_path}")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                name_or_path,
                # README.md: the model card, whose license the cards of what we write carry on
                allow_patterns=["*.json", "tokenizer.model*", "tekken.json", "README.md"]
                + (["*.safetensors"] if weights else []),
            )
        )
    except Exception as exc:  # network, auth, missing repo: all end the run the same way
        raise ModelError(
            f"base_model: '{name_or_path}' is not a local directory and could not be fetched from "
            f"the hub ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None


def read_config(model_dir: Path) -> MistralConfig:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelError(f"{model_dir}: no config.json (is this an HF model directory?)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    family = family_of(data, str(path))
    wrapper = None
    if family.wraps_text_model:
        text = data.get("text_config")
        if not isinstance(text, dict):
            raise ModelError(f"{path}: {family.architecture} without a text_config object")
        # transformers ties the text model's head to its embeddings by the outer flag (default true).
        wrapper, data = data, {**text, "tie_word_embeddings": data.get("tie_word_embeddings", True)}
        family_of({"model_type": text.get("model_type")}, f"{path} (text_config)")
    else:
        data = {**data, "architectures": [family.architecture]}
    # transformers >= 5 writes rope_theta inside rope_parameters; older files have it at the top.
    rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ModelError(f"{path}: RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not supported")
    if "rope_theta" not in data and "rope_theta" in rope:
        data = {**data, "rope_theta": rope["rope_theta"]}
    cfg = MistralConfig.from_hf(data)
    cfg.wrapper = wrapper
    return cfg


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / INDEX_NAME
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [model_dir / n for n in names]
    elif (model_dir / WEIGHTS_NAME).is_file():
        files = [model_dir / WEIGHTS_NAME]
    else:
        raise ModelError(f"{model_dir}: no {WEIGHTS_NAME} or {INDEX_NAME} (only safetensors are read)")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ModelError(f"{index}: lists shard(s) that do not exist: {', '.join(missing)}")
    return files


def is_bnb_4bit(model_dir: Path) -> bool:
    """Whether config.json says the checkpoint is pre-quantized with bitsandbytes 4-bit (e.g. *-bnb-4bit)."""
    data = json.loads((model_dir / "config.json").read_text())
    quant = data.get("quantization_config") or {}
    if not quant:
        return False
    if quant.get("quant_method") != "bitsandbytes" or not (quant.get("load_in_4bit") or quant.get("_load_in_4bit")):
        raise ModelError(
            f"{model_dir / 'config.json'}: quantization {quant.get('quant_method')!r} is not supported; "
            "only bitsandbytes 4-bit (NF4) checkpoints or unquantized ones are read"
        )
    if quant.get("bnb_4bit_quant_type", "nf4") != "nf4":
        raise ModelError(f"{model_dir / 'config.json'}: bnb_4bit_quant_type must be nf4")
    return True


def load_model(
    name_or_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    shard: Callable[[MistralForCausalLM], None] | None = None,
) -> tuple[MistralForCausalLM, Path]:
    """Build the model from an HF checkpoint; every parameter must be present with its shape.

    A bitsandbytes 4-bit checkpoint keeps its quantized projections as frozen NF4 layers (the
    base of `adapter: qlora`); everything else is read at `dtype`. With `shard` (which splits the
    parameters of the model, still on the meta device, over processes: FSDP2), each process reads
    only its own rows of every tensor.
    """
    model_dir = resolve_model_dir(name_or_path)
    cfg = read_config(model_dir)
    prequantized = is_bnb_4bit(model_dir)
    with torch.device("meta"):
        model = MistralForCausalLM(cfg)
    if shard is not None:
        if cfg.moe or cfg.wrapper is not None:
            raise ModelError(f"{model_dir}: sharded (FSDP) loading of {cfg.wrapper and 'Mistral 3' or 'Mixtral'} "
                             "checkpoints is not supported yet; train it on one process or with distributed: ddp")
        shard(model)
        model.to_empty(device=device)
        _read_shards(model, model_dir, dtype)
        return model, model_dir
    expected = dict(model.state_dict())
    tensors: dict[str, torch.Tensor] = {}
    quant_parts: dict[str, dict[str, torch.Tensor]] = {}  # "<module>.weight" -> its quant-state tensors
    expert_parts: dict[tuple[str, int, str], torch.Tensor] = {}  # hub layout: (layer, expert, w1|w2|w3)
    passthrough: dict[str, torch.Tensor] = {}  # a vision-language checkpoint's other tensors
    if cfg.moe and prequantized:
        raise ModelError(f"{model_dir}: 4-bit Mixtral checkpoints are not read yet; use the unquantized model")
    for file in weight_files(model_dir):
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for key in f.keys():
                if cfg.moe and (hub := _HUB_EXPERT.match(key)):
                    expert_parts[hub["layer"], int(hub["expert"]), hub["w"]] = f.get_tensor(key).to(dtype)
                    continue
                key_in_file, key = key, key.replace(".block_sparse_moe.gate.", ".mlp.gate.")
                if cfg.wrapper is not None:
                    key = _text_key(key)
                    if key is None:  # the vision tower and projector: carried through as they are
                        passthrough[key_in_file] = f.get_tensor(key_in_file)
                        continue
                if prequantized and key not in expected and ".weight." in key:
                    weight_key, _, part = key.partition(".weight.")
                    quant_parts.setdefault(weight_key + ".weight", {})[part] = f.get_tensor(key)
                    continue
                if key not in expected:
                    continue  # e.g. rotary inv_freq buffers written by old exporters
                t = f.get_tensor(key_in_file)
                if prequantized and t.dtype == torch.uint8:
                    tensors[key] = t  # packed 4-bit data; its quant state is read above
                    continue
                if tuple(t.shape) != tuple(expected[key].shape):
                    raise ModelError(
                        f"{file}: tensor {key} has shape {tuple(t.shape)}, config.json implies "
                        f"{tuple(expected[key].shape)}"
                    )
                tensors[key] = t.to(dtype)
    if expert_parts:
        tensors.update(_stack_experts(expert_parts, cfg, model_dir))
    if cfg.tie_word_embeddings and "lm_head.weight" not in tensors:
        tensors["lm_head.weight"] = tensors.get("model.embed_tokens.weight")
    missing = sorted(k for k in expected if k not in tensors or tensors[k] is None)
    if missing:
        raise ModelError(f"{model_dir}: checkpoint lacks {len(missing)} tensor(s), e.g. {missing[0]}")
    if quant_parts:
        _install_nf4(model, tensors, quant_parts, device, model_dir)
    model.load_state_dict(tensors, assign=True)
    model.passthrough = passthrough
    if cfg.tie_word_embeddings:
        # assign=True gives each key its own Parameter; re-tie so they are one (one grad, one optimizer slot).
        model.lm_head.weight = model.model.embed_tokens.weight
    return model, model_dir


def _text_key(key: str) -> str | None:
    """A vision-language checkpoint's key -> our text model's key (None: not the text model's).
    Both layouts are read: transformers 4's (language_model.model.*, language_model.lm_head) and the
    one transformers 5 holds in memory (model.language_model.*, lm_head)."""
    for prefix in ("language_model.model.", "model.language_model."):
        if key.startswith(prefix):
            return "model." + key.removeprefix(prefix)
    if key in ("language_model.lm_head.weight", "lm_head.weight"):
        return "lm_head.weight"
    return None


def _wrapped_key(key: str) -> str:
    """The inverse of _text_key, in the layout transformers writes (and so every reader takes)."""
    return "language_model." + key


_HUB_EXPERT = re.compile(r"^(?P<layer>model\.layers\.\d+)\.block_sparse_moe\.experts\.(?P<expert>\d+)\."
                         r"(?P<w>w[123])\.weight$")


def _stack_experts(parts: dict, cfg: MistralConfig, model_dir: Path) -> dict[str, torch.Tensor]:
    """Hub-layout expert matrices -> our stacked gate_up_proj (E, 2I, H) and down_proj (E, H, I)."""
    out = {}
    for layer in sorted({layer for layer, _, _ in parts}):
        def get(e: int, w: str, layer=layer) -> torch.Tensor:
            t = parts.get((layer, e, w))
            if t is None:
                raise ModelError(f"{model_dir}: checkpoint lacks {layer}.block_sparse_moe.experts.{e}.{w}.weight")
            return t
        experts = range(cfg.num_local_experts)
        gate_up = [torch.cat([get(e, "w1"), get(e, "w3")]) for e in experts]
        out[f"{layer}.mlp.experts.gate_up_proj"] = torch.stack(gate_up)
        out[f"{layer}.mlp.experts.down_proj"] = torch.stack([get(e, "w2") for e in experts])
    return out


def _hub_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our stacked expert tensors -> the hub's per-expert w1/w3/w2 matrices under block_sparse_moe."""
    out = {}
    for key, t in state.items():
        layer, sep, name = key.partition(".mlp.")
        if not sep:
            out[key] = t
        elif name == "gate.weight":
            out[f"{layer}.block_sparse_moe.gate.weight"] = t
        elif name == "experts.gate_up_proj":
            gate, up = t.chunk(2, dim=1)
            for e in range(t.shape[0]):
                out[f"{layer}.block_sparse_moe.experts.{e}.w1.weight"] = gate[e].contiguous()
                out[f"{layer}.block_sparse_moe.experts.{e}.w3.weight"] = up[e].contiguous()
        elif name == "experts.down_proj":
            for e, w2 in enumerate(t):
                out[f"{layer}.block_sparse_moe.experts.{e}.w2.weight"] = w2.contiguous()
        else:
            out[key] = t
    return out


def _read_shards(model: MistralForCausalLM, model_dir: Path, dtype: torch.dtype) -> None:
    """Fill each sharded parameter with its rows, sliced from the memory-mapped files."""
    params = dict(model.named_parameters())  # a tied head is the embedding's parameter, read once
    seen = set()
    with torch.no_grad():
        for file in weight_files(model_dir):
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    if key not in params or key in seen:
                        continue
                    whole = f.get_slice(key)
                    if tuple(whole.get_shape()) != tuple(params[key].shape):
                        raise ModelError(f"{file}: tensor {key} has shape {tuple(whole.get_shape())}, config.json "
                                         f"implies {tuple(params[key].shape)}")
                    p = params[key]
                    (p.to_local() if hasattr(p, "to_local") else p).copy_(local_part(p, whole).to(dtype))
                    seen.add(key)
    missing = sorted(set(params) - seen)
    if missing:
        raise ModelError(f"{model_dir}: checkpoint lacks {len(missing)} tensor(s), e.g. {missing[0]}")


def local_part(param: torch.Tensor, full):
    """The part of `full` (the whole tensor, or a safetensors slice of it) that this process holds of
    `param`: a DTensor's own shard, or all of a plain tensor."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(param, DTensor):
        return full[tuple(slice(None) for _ in param.shape)]
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return full[tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))]


def _install_nf4(model: MistralForCausalLM, tensors: dict, quant_parts: dict, device, model_dir: Path) -> None:
    """Swap each pre-quantized projection's nn.Linear for an NF4 layer holding the packed weight."""
    from bitsandbytes.functional import QuantState

    from .quant import NF4Linear

    modules = dict(model.named_modules())
    for weight_key, parts in quant_parts.items():
        module_name = weight_key.removesuffix(".weight")
        linear = modules.get(module_name)
        packed = tensors.pop(weight_key, None)
        if linear is None or packed is None:
            raise ModelError(f"{model_dir}: quantization state for {weight_key} but no matching weight")
        try:
            state = QuantState.from_dict(dict(parts), device=torch.device(device))
        except (ValueError, AssertionError, KeyError) as exc:
            raise ModelError(f"{model_dir}: unreadable 4-bit state for {weight_key} ({exc})") from None
        if tuple(state.shape) != (linear.out_features, linear.in_features):
            raise ModelError(
                f"{model_dir}: {weight_key} is quantized with shape {tuple(state.shape)}, config.json implies "
                f"{(linear.out_features, linear.in_features)}"
            )
        parent_name, _, child = module_name.rpartition(".")
        setattr(modules[parent_name], child,
                NF4Linear(packed.to(device), state, linear.in_features, linear.out_features))


def save_model(
    model: MistralForCausalLM,
    out_dir: Path,
    dtype: str = "float32",
    max_shard_bytes: int = 5 * 1024**3,
    state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write config.json, generation_config.json and (sharded) safetensors into out_dir. state: the
    weights when the model's own are sharded over processes (gathered by the caller)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    torch_dtype = DTYPES[dtype]
    state = {k: v.detach().to(torch_dtype).contiguous() for k, v in (state or model.state_dict()).items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    if cfg.moe:
        state = _hub_layout(state)
    if cfg.wrapper is not None:  # the text model under the checkpoint's names, the rest unchanged
        state = {_wrapped_key(k): v for k, v in state.items()}
        state.update({k: v.contiguous() for k, v in getattr(model, "passthrough", {}).items()})
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / WEIGHTS_NAME), metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out_dir / name), metadata=meta)
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        _write_json(out_dir / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    _write_json(out_dir / "config.json", cfg.to_hf(dtype))
    _write_json(
        out_dir / "generation_config.json",
        {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": False},
    )


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
