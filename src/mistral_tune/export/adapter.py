"""A LoRA adapter as vLLM's LoRA loader accepts it (PEFT format, checked before it ships).

vLLM reads adapter_config.json through its `PEFTHelper` and the tensors by PEFT key name
(`base_model.model.<module>.lora_A.weight`). What it refuses, it refuses at request time on
the GPU server, so we check here: no modules_to_save (vLLM: "only supports modules_to_save
being None"), no DoRA, no trainable tokens (only LoRA A/B tensors load), bias "none", r and
lora_alpha present, every adapted module one of the projections vLLM can adapt in a Mistral
model, and a rank within --max-lora-rank. Adapters it refuses serve in vLLM once merged.

LoRA on Mixtral's experts is written anew. We save it as PEFT does for transformers' stacked experts
(target_parameters, one A/B pair per stacked weight), a layout vLLM reads only for models that declare
3D MoE LoRA weights (`is_3d_moe_weight`); its Mixtral does not, and takes one pair per expert and
projection, `model.layers.<L>.block_sparse_moe.experts.<e>.w1` (gate), `.w3` (up) and `.w2` (down), for
every expert of a layer whose experts carry LoRA. `export adapter --out` writes that layout, sliced exactly
from the stacked pairs.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..errors import ModelError
from ..fsutil import check_target, replace_dir
from ..models.lora import expert_factors
from ..models.mistral import Experts
from ..models.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, expert_pair_infixes
from .hf import find_adapter
from .vllm import VLLM_MAX_LORA_RANKS, min_max_lora_rank

#: Projections vLLM's Mistral model exposes to LoRA (q/k/v pack into qkv_proj, gate/up into gate_up_proj).
VLLM_LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Mixtral's experts as vLLM's Mixtral adapts them: per expert, w1 (gate), w2 (down), w3 (up).
VLLM_EXPERT_MODULES = ("w1", "w2", "w3")
_PREFIX = "base_model.model."
# The module of an expert's pair as vLLM's Mixtral names it (its FusedMoE layer is block_sparse_moe.experts).
_VLLM_EXPERT = re.compile(r"model\.layers\.\d+\.block_sparse_moe\.experts\.(\d+)\.(w[123])")
# A pair on a stacked expert weight as PEFT saves it: (layer key, base_layer. nesting, A or B).
_STACKED_EXPERT_KEY = re.compile(r"(.+)\.mlp\.experts\.((?:base_layer\.)*)lora_([AB])\.weight")
_EXPERT_PARAMETERS = {f"mlp.experts.{p}": p for p in Experts.STACKED}


def _read_config(adapter_dir: Path) -> tuple[dict, list[str]]:
    """adapter_config.json as a dict, or ({}, the reason it cannot be read)."""
    try:
        cfg = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return {}, [f"{ADAPTER_CONFIG}: unreadable ({exc})"]
    if not isinstance(cfg, dict):
        return {}, [f"{ADAPTER_CONFIG}: holds a JSON {type(cfg).__name__}, not an object"]
    return cfg, []


def _names(value) -> list[str] | None:
    """A PEFT list of module or parameter names (one name, or a list of names); None if it is neither."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


def vllm_adapter_problems(adapter_dir: Path) -> list[str]:
    """Reasons vLLM would refuse this adapter (empty when it loads)."""
    cfg, unreadable = _read_config(adapter_dir)
    if unreadable:
        return unreadable
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        return _problems(cfg, None)
    with safe_open(str(weights), framework="pt") as f:
        return _problems(cfg, {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})


def _problems(cfg: dict, shapes: dict[str, tuple[int, ...]] | None) -> list[str]:
    """vllm_adapter_problems of a config and its tensors' shapes (None: no safetensors file)."""
    problems: list[str] = []
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
    if "r" in cfg and (not isinstance(r, int) or isinstance(r, bool) or r < 1):
        problems.append(f"r {r!r}: not a positive integer")
    elif isinstance(r, int) and r > max(VLLM_MAX_LORA_RANKS):
        problems.append(f"r={r}: above vLLM's largest --max-lora-rank ({max(VLLM_MAX_LORA_RANKS)})")
    targets = _names(cfg.get("target_modules") or [])
    if targets is None:
        problems.append(f"target_modules {cfg['target_modules']!r}: not a module name or a list of them")
        targets = []
    bad = sorted(set(targets) - set(VLLM_LORA_MODULES) - set(VLLM_EXPERT_MODULES))
    if bad:
        problems.append(f"target_modules {bad}: vLLM adapts only {', '.join(VLLM_LORA_MODULES)} in Mistral models "
                        f"and {', '.join(VLLM_EXPERT_MODULES)} of each expert in Mixtral")

    if cfg.get("target_parameters") and _names(cfg["target_parameters"]) is None:
        problems.append(f"target_parameters {cfg['target_parameters']!r}: not a parameter name or a list of them")
    elif cfg.get("target_parameters"):
        problems.append(f"target_parameters {cfg['target_parameters']} (LoRA on Mixtral's stacked experts): vLLM "
                        "reads this layout only for models with 3D MoE LoRA weights, and its Mixtral expects one "
                        "pair per expert and projection (block_sparse_moe.experts.<e>.w1/w2/w3), which "
                        "`export adapter --out DIR` writes")

    if shapes is None:
        return problems + [f"{ADAPTER_WEIGHTS}: missing (vLLM reads safetensors, not .bin)"]
    halves: dict[str, set[str]] = defaultdict(set)  # module -> the factors it has, A and B
    experts: dict[str, set[tuple[int, str]]] = defaultdict(set)  # a layer's experts module -> (expert, w*)
    for key, shape in shapes.items():
        if cfg.get("target_parameters") and ".experts." in key:
            continue  # refused above
        # vLLM's parse_fine_tuned_lora_name: base_model.model.<module>.lora_{A,B}.weight
        module, _, rest = key.removeprefix(_PREFIX).rpartition(".lora_")
        if not key.startswith(_PREFIX) or rest not in ("A.weight", "B.weight"):
            problems.append(f"tensor {key}: not a PEFT LoRA key (base_model.model.<module>.lora_A/B.weight)")
            break
        name = module.rsplit(".", 1)[-1]
        if ".experts" in module or name in VLLM_EXPERT_MODULES:  # vLLM reads a module under ".experts" as an expert
            if not (m := _VLLM_EXPERT.fullmatch(module)):
                problems.append(f"tensor {key}: vLLM's Mixtral adapts an expert as "
                                "model.layers.<L>.block_sparse_moe.experts.<e>.w1/w2/w3")
                break
            experts[module[:m.start(1) - 1]].add((int(m[1]), m[2]))
        elif name not in VLLM_LORA_MODULES:
            problems.append(f"tensor {key}: module {module} cannot be adapted by vLLM")
            break
        if isinstance(r, int) and (shape[0] if rest == "A.weight" else shape[1]) != r:
            problems.append(f"tensor {key}: shape {shape} does not match r={r}")
            break
        halves[module].add(rest[0])
    problems += [f"module {m}: lora_{'B' if h == {'A'} else 'A'}.weight missing" for m, h in halves.items()
                 if len(h) < 2][:1]
    # vLLM stacks a layer's pairs for w1, w2 and w3 of every expert, each one required.
    n = 1 + max((e for have in experts.values() for e, _ in have), default=-1)
    for layer, have in sorted(experts.items()):
        missing = sorted({(e, w) for e in range(n) for w in VLLM_EXPERT_MODULES} - have)
        if missing:
            problems.append(f"{layer}: no pair for {', '.join(f'{e}.{w}' for e, w in missing[:3])}"
                            f"{' ...' if len(missing) > 3 else ''} ({len(missing)} of {3 * n}): vLLM's Mixtral needs "
                            "w1, w2 and w3 of every expert in a layer whose experts carry LoRA")
            break
    return problems


def vllm_expert_layout(cfg: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """An adapter with LoRA on Mixtral's stacked experts (PEFT's target_parameters) in the layout vLLM's
    Mixtral reads: per layer and expert e, w1 and w3 take the expert's A of the stacked gate_up_proj pair
    and the gate (first) and up (second) halves of its B's rows; w2 takes the down_proj pair. A stacked
    weight without LoRA gets zero pairs (vLLM needs all three). Attention pairs are kept. rsLoRA scales by
    alpha/sqrt(r) and vLLM's experts by alpha/r: with use_rslora every B is multiplied by sqrt(r) and
    use_rslora turned off, the same deltas for every reader. ModelError (the reason) if it cannot be done."""
    params = _names(cfg.get("target_parameters"))
    if params is None:
        raise ModelError(f"target_parameters {cfg.get('target_parameters')!r}: not a parameter name or a list of them")
    unknown = sorted(set(params) - set(_EXPERT_PARAMETERS))
    if unknown:
        raise ModelError(f"target_parameters {unknown}: only LoRA on Mixtral's experts "
                         f"({', '.join(_EXPERT_PARAMETERS)}) is written in vLLM's layout")
    r = cfg.get("r")
    if not isinstance(r, int) or r < 1:
        raise ModelError(f"{ADAPTER_CONFIG}: r {r!r} is not a positive integer")
    infixes = expert_pair_infixes({_EXPERT_PARAMETERS[p] for p in params})
    by_infix = {infix: name for name, infix in infixes.items()}
    rescale = math.sqrt(r) if cfg.get("use_rslora") else 1.0

    def own(t: torch.Tensor) -> torch.Tensor:  # a tensor of its own (safetensors saves no shared storage)
        return t.clone(memory_format=torch.contiguous_format)

    def scaled(b: torch.Tensor) -> torch.Tensor:
        return own(b) if rescale == 1.0 else (b.float() * rescale).to(b.dtype)

    out: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, dict[str, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    for key, t in tensors.items():
        if m := _STACKED_EXPERT_KEY.fullmatch(key):
            if m[2] not in by_infix:
                raise ModelError(f"tensor {key}: no stacked expert weight of target_parameters {params} is kept there")
            layers[m[1]][by_infix[m[2]]][m[3]] = t
        else:
            out[key] = scaled(t) if ".lora_B." in key else t
    for layer, pairs in layers.items():
        factors = {}
        for name, infix in infixes.items():
            where = f"{layer}.mlp.experts.{infix}lora_"
            if set(pairs[name]) != {"A", "B"}:
                raise ModelError(f"tensor {where}{'A' if 'A' not in pairs[name] else 'B'}.weight: missing")
            a, b = pairs[name]["A"], pairs[name]["B"]
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] % r or b.shape[1] != a.shape[0]:
                raise ModelError(f"tensor {where}A/B.weight: shapes {tuple(a.shape)} and {tuple(b.shape)} are not "
                                 f"one rank-{r} pair per expert")
            factors[name] = expert_factors(a, b, a.shape[0] // r)
        per, sizes = {}, set()  # w* -> (A (E, r, in), B (E, out, r)); (experts, hidden, inner)
        if "gate_up_proj" in factors:
            a, b = factors["gate_up_proj"]
            half = b.shape[1] // 2
            per["w1"], per["w3"] = (a, b[:, :half]), (a, b[:, half:])
            sizes.add((a.shape[0], a.shape[2], half if b.shape[1] % 2 == 0 else -1))
        if "down_proj" in factors:
            per["w2"] = a, b = factors["down_proj"]
            sizes.add((a.shape[0], b.shape[1], a.shape[2]))
        if len(sizes) > 1 or -1 in next(iter(sizes)):
            raise ModelError(f"{layer}.mlp.experts: its stacked pairs do not fit one Mixtral layer "
                             f"(experts, hidden, intermediate: {sorted(sizes)})")
        (experts, hidden, inner), = sizes
        fans = {"w1": (hidden, inner), "w2": (inner, hidden), "w3": (hidden, inner)}  # (in, out)
        for w, (fan_in, fan_out) in fans.items():  # a stacked weight without LoRA: zero pairs
            per.setdefault(w, (a.new_zeros(experts, r, fan_in), b.new_zeros(experts, fan_out, r)))
        for e in range(experts):
            for w in VLLM_EXPERT_MODULES:
                module = f"{layer}.block_sparse_moe.experts.{e}.{w}"
                out[f"{module}.lora_A.weight"] = own(per[w][0][e])
                out[f"{module}.lora_B.weight"] = scaled(per[w][1][e])
    targets = _names(cfg.get("target_modules") or [])
    if targets is None:
        raise ModelError(f"target_modules {cfg['target_modules']!r}: not a module name or a list of them")
    cfg = {k: v for k, v in cfg.items() if k != "target_parameters"}
    cfg["target_modules"] = sorted({*targets, *VLLM_EXPERT_MODULES})
    cfg["use_rslora"] = False
    return cfg, out


def vllm_serve_command(adapter: Path, cfg: dict, name: str = "tuned") -> str:
    """The `vllm serve` line for an adapter, as a shell would read it (paths quoted): the base it was
    trained on, LoRA on with a rank that fits, and mistral-common's chat format (docs/deploy.md)."""
    argv = ["vllm", "serve", cfg.get("base_model_name_or_path") or "BASE_MODEL", "--enable-lora",
            "--max-lora-rank", str(min_max_lora_rank(int(cfg["r"]))), "--lora-modules",
            f"{name}={Path(adapter).resolve()}", "--tokenizer-mode", "mistral"]
    return shlex.join(argv)


def export_adapter(run_or_adapter: Path, out_dir: Path | None = None, overwrite: bool = False) -> tuple[Path, dict]:
    """Check the adapter for vLLM; optionally copy it (config, weights, tokenizer) to out_dir, which must be
    new or empty, or (overwrite) an earlier exported adapter (fsutil.check_target). LoRA on Mixtral's stacked
    experts is written in vLLM's per-expert layout (vllm_expert_layout), so it needs out_dir.
    Returns the adapter vLLM should load and its config."""
    adapter = find_adapter(Path(run_or_adapter))
    tensors = None
    cfg, _ = _read_config(adapter)  # an unreadable one: vllm_adapter_problems names it
    if _names(cfg.get("target_parameters") or None) and (adapter / ADAPTER_WEIGHTS).is_file():
        try:
            cfg, tensors = vllm_expert_layout(cfg, load_file(str(adapter / ADAPTER_WEIGHTS)))
        except ModelError as exc:
            problems = [str(exc)]
        else:
            problems = _problems(cfg, {k: tuple(v.shape) for k, v in tensors.items()})
    else:
        problems = vllm_adapter_problems(adapter)
    if problems:
        raise ModelError(f"{adapter}: vLLM would not load this adapter: " + "; ".join(problems)
                         + ". Merge it (mistral-tune merge) and serve the merged model instead")
    if tensors is not None and out_dir is None:
        raise ModelError(f"{adapter}: its LoRA on Mixtral's experts is saved stacked (target_parameters), which "
                         "vLLM's Mixtral does not read; pass --out DIR to write it one pair per expert, as vLLM "
                         "reads it")
    if out_dir is not None:
        out_dir = check_target(out_dir, "adapter", sources=[adapter], overwrite=overwrite)
        source = adapter

        def write(tmp: Path) -> None:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
            if tensors is not None:
                save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
                (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")

        adapter = replace_dir(out_dir, write, "adapter", [source])
    return adapter, cfg
