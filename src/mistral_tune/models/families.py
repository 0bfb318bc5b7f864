"""The facts that differ between Mistral model families, stated once.

The loader reads a checkpoint's family from its config.json here; LoRA targeting, the exporters,
the benchmark and `validate` ask the family instead of restating projection names or layouts.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ModelError

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class Family:
    name: str
    architecture: str  # config.json "architectures"[0]
    model_type: str  # config.json "model_type"
    feed_forward: tuple[str, ...]  # the feed-forward projections LoRA may target, by their HF names
    moe: bool = False
    gguf_arch: str = "llama"  # llama.cpp's converter writes every Mistral text model as "llama"
    # A vision-language checkpoint whose text model we train: its config.json nests the text
    # model's in text_config; the other towers are carried through unchanged.
    wraps_text_model: bool = False

    @property
    def projections(self) -> tuple[str, ...]:
        return ATTENTION_PROJECTIONS + self.feed_forward

    @property
    def default_targets(self) -> tuple[str, ...]:
        """lora_target_modules when a config names none: every projection (Mixtral: attention and experts)."""
        return (ATTENTION_PROJECTIONS + ("experts",)) if self.moe else self.projections


MISTRAL = Family("Mistral", "MistralForCausalLM", "mistral", ("gate_proj", "up_proj", "down_proj"))
# Ministral: Mistral's layers, each with its own attention type (layer_types: sliding or full).
MINISTRAL = Family("Ministral", "MinistralForCausalLM", "ministral", MISTRAL.feed_forward)
# Mixtral's experts hold w1 (gate), w3 (up) and w2 (down) in the hub's checkpoints; the router is
# "gate". Our model (as transformers') keeps them stacked: gate_up_proj (E, 2I, H), down_proj (E, H, I).
# LoRA on the experts is one low-rank pair per expert on a stacked weight (PEFT's target_parameters);
# a target name adapts these stacked weights. w1 and w3 live in one tensor, so they adapt together.
EXPERT_TARGETS = {"experts": ("gate_up_proj", "down_proj"), "gate_up_proj": ("gate_up_proj",),
                  "w1": ("gate_up_proj",), "w3": ("gate_up_proj",), "down_proj": ("down_proj",), "w2": ("down_proj",)}
MIXTRAL = Family("Mixtral", "MixtralForCausalLM", "mixtral", tuple(EXPERT_TARGETS), moe=True)

# Mistral Small 3.x, Magistral Small: a Mistral text model beside a Pixtral vision tower.
MISTRAL3 = Family("Mistral 3 (text model of a vision-language checkpoint)", "Mistral3ForConditionalGeneration",
                  "mistral3", MISTRAL.feed_forward, wraps_text_model=True)

FAMILIES = (MISTRAL, MINISTRAL, MIXTRAL, MISTRAL3)


def family_of(config: dict, where: str = "config.json") -> Family:
    """The family a config.json describes, or a ModelError naming what is supported."""
    arch = (config.get("architectures") or [None])[0]
    model_type = config.get("model_type")
    for family in FAMILIES:
        if arch == family.architecture or (arch is None and model_type == family.model_type):
            if model_type not in (None, family.model_type):
                break
            return family
    supported = ", ".join(f.architecture for f in FAMILIES)
    raise ModelError(f"{where}: model_type {model_type!r} / {arch} is not supported; supported: {supported}")


def describe(cfg) -> str:
    """One line naming the family and the shape, as `validate` prints it."""
    family = family_of({"architectures": [cfg.wrapper["architectures"][0]]}) if cfg.wrapper else cfg.family
    parts = [f"{cfg.num_hidden_layers} layers", f"hidden {cfg.hidden_size}",
             f"{cfg.num_attention_heads} heads / {cfg.num_key_value_heads} KV heads", f"head_dim {cfg.head_dim}"]
    if family.moe:
        parts.append(f"{cfg.num_local_experts} experts, top-{cfg.num_experts_per_tok}, "
                     f"expert width {cfg.intermediate_size}")
    else:
        parts.append(f"MLP width {cfg.intermediate_size}")
    parts.append(f"vocab {cfg.vocab_size}")
    if cfg.layer_types is not None and cfg.sliding_window:
        n = cfg.layer_types.count("sliding_attention")
        parts.append(f"sliding window {cfg.sliding_window} in {n} of {cfg.num_hidden_layers} layers")
    else:
        parts.append(f"sliding window {cfg.sliding_window}" if cfg.sliding_window else "no sliding window")
    return f"{family.name} ({', '.join(parts)})"
