"""Axolotl configs in: the translation of an Axolotl YAML (as a dict) into mistral-tune's keys.

Every key of the Axolotl file ends in one of three places: translated into our keys, left out with
the reason written next to it (a note), or refused with the reason (a ConfigError listing every such
key, one a line) when leaving it out would train something else than the user asked for (preference
training, images, an optimizer we do not have). Validation of the result and writing it are
config.py's (`convert_axolotl_file`); the names of Axolotl's keys here also give the hints that the
config loader prints when it meets one of them in a mistral-tune config.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .models.families import ATTENTION_PROJECTIONS, EXPERT_TARGETS, MISTRAL

CONVERT_COMMAND = "mistral-tune convert axolotl FILE --out ours.yaml"

# Axolotl keys whose value carries straight over to a key of ours (the same name, or a new one).
SAME = ("base_model", "val_set_size", "sequence_len", "sample_packing", "group_by_length", "train_on_inputs",
        "lora_r", "lora_alpha", "lora_dropout", "lora_modules_to_save", "loraplus_lr_ratio", "learning_rate",
        "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "warmup_steps",
        "warmup_ratio", "micro_batch_size", "gradient_accumulation_steps", "num_epochs", "max_steps", "seed",
        "output_dir", "logging_steps", "save_steps", "eval_steps", "save_total_limit", "neftune_noise_alpha",
        "mlflow_tracking_uri", "mlflow_experiment_name", "wandb_project", "wandb_entity")
RENAMED = {"peft_use_dora": "use_dora", "peft_use_rslora": "use_rslora", "dataset_processes": "dataset_num_workers",
           "dataset_num_proc": "dataset_num_workers", "dataset_prepared_path": "dataset_cache_dir",
           "ddp_timeout": "distributed_timeout", "noisy_embedding_alpha": "neftune_noise_alpha",
           "tokens": "new_special_tokens"}

OPTIMIZERS = {"adamw": "adamw", "adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw",
              "adamw_apex_fused": "adamw", "paged_adamw_32bit": "adamw", "adamw_bnb_8bit": "adamw_8bit",
              "adamw_8bit": "adamw_8bit", "paged_adamw_8bit": "adamw_8bit"}
SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant", "constant_with_warmup": "constant"}

# Keys left out because what they control is mistral-tune's own business; each group gives the reason.
DROPPED_GROUPS: dict[str, tuple[str, ...]] = {
    "mistral-tune chooses attention and fused kernels itself (fast_path)": (
        "flash_attention", "sdp_attention", "xformers_attention", "flex_attention", "flex_attn_compile_kwargs",
        "flash_attn_cross_entropy", "flash_attn_fuse_mlp", "flash_attn_rms_norm", "flash_optimum",
        "sage_attention", "eager_attention", "attn_implementation", "gemma4_hybrid_attn_impl",
        "large_head_attention", "flash_attn_d512", "sdpa_varlen", "fused_attn_kernel", "experts_implementation",
        "lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel", "chunked_cross_entropy",
        "chunked_cross_entropy_num_chunks", "tiled_mlp", "tiled_mlp_num_shards", "tiled_mlp_use_original_mlp",
        "use_kernels", "use_sonicmoe", "torch_compile", "torch_compile_backend", "torch_compile_mode",
        "torch_compile_options", "plugins", "cut_cross_entropy", "liger_rope", "liger_rms_norm", "liger_glu_activation",
        "liger_layer_norm", "liger_cross_entropy", "liger_fused_linear_cross_entropy", "batch_flattening",
        "llama4_linearized_experts", "quantize_moe_experts", "fp8_enable_fsdp_float8_all_gather", "deepcompile"),
    "mistral-tune reads the architecture from the model's config.json and tokenizes with mistral-common": (
        "model_type", "type_of_model", "tokenizer_type", "tokenizer_use_fast", "tokenizer_legacy",
        "tokenizer_use_mistral_common", "tokenizer_save_jinja_files", "tokenizer_config", "base_model_config",
        "cls_model_config", "revision_of_model", "is_falcon_derived_model", "is_llama_derived_model",
        "is_mistral_derived_model", "is_qwen_derived_model", "processor_kwargs", "model_quantization_config",
        "model_quantization_config_kwargs", "bnb_config_kwargs", "resize_token_embeddings_to_32x",
        "mean_resizing_embeddings", "shrink_embeddings", "embeddings_skip_upcast", "fix_untrained_tokens",
        "experimental_skip_move_to_device", "lora_on_cpu", "qlora_sharded_model_loading", "gptq",
        "peft_autocast_adapter_dtype", "peft_ensure_weight_tying", "lora_fan_in_fan_out"),
    "mistral-tune never runs code from the hub": ("trust_remote_code",),
    "precision is mistral-tune's: bf16 autocast over float32 trained weights (bf16: auto), norms in float32": (
        "tf32", "bfloat16", "float16", "float32", "fp32_norms", "fp32_norm_classes", "fp8"),
    "mistral-tune places and launches its processes itself (train --gpus N, distributed:)": (
        "ddp", "ddp_bucket_cap_mb", "ddp_broadcast_buffers", "ddp_find_unused_parameters", "world_size",
        "local_rank", "device", "device_map", "max_memory", "gpu_memory_limit", "low_cpu_mem_usage",
        "dp_shard_size", "dp_replicate_size", "fsdp_final_state_dict_type", "accelerator_config",
        "use_ray", "ray_run_name", "ray_num_workers", "resources_per_worker"),
    "mistral-tune reads, caches and shuffles the data itself (tokenized once, by seed)": (
        "dataloader_pin_memory", "dataloader_num_workers", "dataloader_prefetch_factor", "dataloader_drop_last",
        "dataset_keep_in_memory", "num_dataset_shards_to_save", "dataset_shard_num", "dataset_shard_idx",
        "shuffle_merged_datasets", "shuffle_before_merging_datasets", "is_preprocess", "preprocess_iterable",
        "skip_prepare_dataset", "remove_unused_columns", "push_dataset_to_hub", "streaming",
        "streaming_multipack_buffer_size", "pretrain_multipack_buffer_size", "pretrain_multipack_attn",
        "pretraining_sample_concatenation", "sample_packing_group_size", "sample_packing_bin_size",
        "sample_packing_sequentially", "sample_packing_mp_start_method", "sample_packing_eff_est",
        "multipack_real_batches", "total_num_tokens", "total_supervised_tokens", "min_sample_len",
        "max_packed_sequence_len"),
    "held-out rows are packed and batched as the training rows are (packed samples never see each other)": (
        "eval_sample_packing", "pad_to_sequence_len", "pad_to_multiple_of", "eval_sequence_len", "eval_batch_size"),
    "checkpoints are written every save_steps and at each epoch end; evaluations at each checkpoint or every "
    "eval_steps; the best adapter (by eval.metric) is always kept": (
        "saves_per_epoch", "evals_per_epoch", "save_strategy", "eval_strategy", "evaluation_strategy",
        "save_first_step", "save_only_model", "load_best_model_at_end", "metric_for_best_model",
        "greater_is_better"),
    "mistral-tune writes safetensors only": ("save_safetensors",),
    "mistral-tune does not upload; push output_dir with `huggingface-cli upload`": (
        "hub_model_id", "hub_strategy", "hub_revision", "hf_use_auth_token"),
    "mistral-tune's bad-step guard watches the loss (bad_step_zscore, rollbacks)": (
        "loss_watchdog_threshold", "loss_watchdog_patience"),
    "trackers here are tensorboard, wandb and mlflow (report_to)": (
        "use_comet", "comet_api_key", "comet_workspace", "comet_project_name", "comet_experiment_key", "comet_mode",
        "comet_online", "comet_experiment_config", "use_trackio", "trackio_project_name", "trackio_run_name",
        "trackio_space_id", "use_otel_metrics", "otel_metrics_host", "otel_metrics_port", "wandb_watch",
        "wandb_run_id", "hf_mlflow_log_artifacts"),
    "the final adapter is sent to every tracker in report_to": ("wandb_log_model",),
    "task metrics come from the eval: section (eval.tasks); Axolotl's samples and benchmarks have no "
    "counterpart": (
        "do_causal_lm_eval", "eval_causal_lm_metrics", "do_bench_eval", "bench_dataset", "bench_split",
        "eval_table_size", "eval_max_new_tokens", "generate_samples", "num_generation_samples",
        "generation_max_new_tokens", "generation_temperature", "generation_top_p", "generation_top_k",
        "generation_prompt_ratio", "generation_do_sample"),
    "a serving or profiling setting; use mistral-tune serve / chat": (
        "gradio_title", "gradio_share", "gradio_server_name", "gradio_server_port", "gradio_max_new_tokens",
        "gradio_temperature", "profiler_steps", "profiler_steps_start", "include_tokens_per_second",
        "include_tkps", "gc_steps", "torch_empty_cache_steps", "gc_collect_steps", "dynamic_checkpoint"),
    "Axolotl's own bookkeeping": ("strict", "debug", "axolotl_config_path", "capabilities", "env_capabilities",
                                  "merge_lora", "merge_method", "lora_target_parameters", "overrides_of_model_config",
                                  "overrides_of_model_kwargs"),
    "conversations are rendered in the model's own format by mistral-common, with its own BOS/EOS": (
        "chat_template", "chat_template_jinja", "chat_template_kwargs", "eot_tokens", "special_tokens",
        "added_tokens_overrides"),
    "preference and RL settings; they only apply with rl:, which has no counterpart yet": (
        "trl", "vllm", "dpo_use_weighting", "dpo_label_smoothing", "precompute_ref_log_probs",
        "dpo_use_liger_kernel", "dpo_padding_free", "dpo_loss_type", "dpo_loss_weights", "orpo_alpha",
        "simpo_gamma", "cpo_alpha", "kto_desirable_weight", "kto_undesirable_weight", "rl_beta", "dpo_beta",
        "rpo_alpha", "dpo_use_logits_to_keep", "dpo_generate_during_eval", "dpo_norm_loss", "max_prompt_len",
        "center_rewards_coefficient", "num_labels"),
}
DROPPED = {key: why for why, keys in DROPPED_GROUPS.items() for key in keys}

# Keys refused when set: leaving them out would train something else than the file asks for.
REFUSED_GROUPS: dict[str, tuple[str, ...]] = {
    "preference and RL training (rl: dpo, orpo, kto, grpo...) are not supported yet; mistral-tune trains "
    "supervised (SFT) only": ("rl", "reward_model", "process_reward_model", "ebft"),
    "images and audio are not read: mistral-tune trains the text model on text data only": (
        "processor_type", "image_size", "image_resize_algorithm", "role_boundaries", "freeze_mm_modules"),
    "has no counterpart here (it changes what is trained)": (
        "relora", "relora_prune_ratio", "relora_prune_method", "relora_cpu_offload", "qat", "quantization",
        "use_pose", "pose_split_on_token_ids", "pose_max_context_len", "pose_num_chunks", "peft_layers_to_transform",
        "peft_layers_pattern", "peft_layer_replication", "lora_rank_pattern", "lora_alpha_pattern",
        "peft_trainable_token_indices", "loftq_config", "peft", "reinit_weights", "trainer_cls", "lisa_n_layers",
        "lisa_step_interval", "lisa_layers_attribute", "use_eaft", "eaft_alpha", "eaft_k", "scaling_softmax",
        "scaling_softmax_factor", "scaling_softmax_bias", "rope_scaling", "lr_groups", "embedding_lr",
        "embedding_lr_scale", "loraplus_lr_embedding", "optim_args", "optim_target_modules", "torchdistx_path",
        "lr_scheduler_kwargs", "lr_quadratic_warmup", "lr_div_factor", "cosine_constant_lr_ratio",
        "jagged_restart_steps", "jagged_restart_warmup_steps", "jagged_restart_anneal_steps", "adam_epsilon2",
        "adam_beta3", "selective_checkpointing", "layer_offloading", "use_onebitllms", "peft_init_lora_weights",
        "default_system_message", "curriculum_sampling", "auto_find_batch_size"),
    "needs more than one GPU per model copy (tensor, context or sequence parallelism), which mistral-tune "
    "does not do": ("sequence_parallel_degree", "context_parallel_size", "tensor_parallel_size", "heads_k_stride",
                    "ring_attn_func"),
}
REFUSED = {key: why for why, keys in REFUSED_GROUPS.items() for key in keys}

# Keys translate() handles in code (beyond SAME and RENAMED).
HANDLED = ("datasets", "test_datasets", "pretraining_dataset", "adapter", "load_in_4bit", "load_in_8bit",
           "lora_target_modules", "lora_target_linear", "lora_model_dir", "optimizer", "lr_scheduler",
           "cosine_min_lr_ratio", "batch_size", "bf16", "fp16", "gradient_checkpointing",
           "gradient_checkpointing_kwargs", "activation_offloading", "resume_from_checkpoint",
           "auto_resume_from_checkpoints", "early_stopping_patience", "use_wandb",
           "wandb_name", "wandb_mode", "use_mlflow", "mlflow_run_name", "use_tensorboard",
           "deepspeed", "fsdp", "fsdp_config", "fsdp_version", "unfrozen_parameters", "model_config",
           "excess_length_strategy", "dataset_exact_deduplication")

KNOWN = set(SAME) | set(RENAMED) | set(DROPPED) | set(REFUSED) | set(HANDLED)

# What the config loader says when a mistral-tune config holds one of Axolotl's keys.
HINTS = {"load_in_4bit": "use adapter: qlora (LoRA over a 4-bit NF4 base)",
         "load_in_8bit": "no 8-bit base here; use adapter: qlora (4-bit NF4) or base_precision: fp8",
         "lora_target_linear": "lora_target_modules defaults to every projection of the model",
         "fp16": "use bf16 (auto: bf16 where the GPU has it, float32 otherwise)",
         "resume_from_checkpoint": "use resume (a checkpoint path, or auto)",
         "auto_resume_from_checkpoints": "use resume: auto",
         "activation_offloading": "use offload_activations (with gradient_checkpointing)",
         "batch_size": "use gradient_accumulation_steps (batch = micro_batch_size x gradient_accumulation_steps)",
         "use_wandb": "use report_to: [wandb]", "use_mlflow": "use report_to: [mlflow]",
         "use_tensorboard": "use report_to: [tensorboard]",
         "excess_length_strategy": "use on_too_long (drop or truncate)",
         "dataset_exact_deduplication": "use cleaning.dedup",
         "fsdp": "use distributed: fsdp (full fine-tuning) with train --gpus N",
         "early_stopping_patience": "use eval.early_stopping_patience",
         "test_datasets": "use val_datasets", "rl": "preference training is not supported yet"}
DATASET_HINTS = {"type": "use format (alpaca, sharegpt, messages, prompt_completion, text)",
                 "field_messages": "use field_map: {messages: NAME}",
                 "message_property_mappings": "use field_map: {role: NAME, content: NAME}",
                 "field": "use format: text with field_map: {text: NAME}",
                 "ds_type": "use source (jsonl, json, parquet, csv, hf)",
                 "data_files": "give the file in path"}


def axolotl_hint(key: str, in_dataset: bool = False) -> str | None:
    """The hint for an unknown key of a mistral-tune config that is one of Axolotl's, or None."""
    if in_dataset:
        hint = DATASET_HINTS.get(key)
        return f"Axolotl's key: {hint}" if hint else None
    if key in HINTS:
        return f"Axolotl's key: {HINTS[key]}"
    if key in RENAMED:
        return f"Axolotl's key: use {RENAMED[key]}"
    if key in DROPPED:
        return f"Axolotl's key: remove it ({DROPPED[key]})"
    if key in REFUSED:
        return f"Axolotl's key: {REFUSED[key]}"
    return "Axolotl's key" if key in KNOWN else None


def axolotl_value_hint(key: str, value: Any) -> str | None:
    """The hint for a value of ours that is Axolotl's name for something we call otherwise."""
    for table, name in ((OPTIMIZERS, "optimizer"), (SCHEDULERS, "lr_scheduler")):
        if key == name and isinstance(value, str) and value in table and table[value] != value:
            return f"Axolotl's {value} is {table[value]} here"
    return None


@dataclass
class Translation:
    """Our config keys, and what became of the Axolotl keys that have no direct counterpart."""

    config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # "key: what was done and why", one per key
    problems: list[str] = field(default_factory=list)  # keys refused, one line each

    def note(self, key: str, text: str) -> None:
        self.notes.append(f"{key}: {text}")

    def refuse(self, key: str, text: str) -> None:
        self.problems.append(f"{key}: {text}")


def translate(data: dict, source: str = "config") -> Translation:
    """An Axolotl config (parsed YAML) as mistral-tune keys; ConfigError lists every key that cannot be."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, not {type(data).__name__}")
    t = Translation()
    unset = sorted(k for k, v in data.items() if v is None)
    if unset:
        t.notes.append(f"{', '.join(map(str, unset))}: no value in the file (Axolotl's default applies), left out")
    given = {str(k): v for k, v in data.items() if v is not None}
    for key, value in given.items():
        if key in SAME:
            t.config[key] = _number(value) if key in ("learning_rate", "weight_decay", "adam_epsilon") else value
        elif key in RENAMED:
            t.config[RENAMED[key]] = value
        elif key in REFUSED and _truthy(value):
            t.refuse(key, f"{value!r}: {REFUSED[key]}")
        elif key in DROPPED or key in REFUSED:
            t.note(key, f"left out: {DROPPED.get(key) or 'off in the file'}")
        elif key not in HANDLED:
            close = difflib.get_close_matches(key, sorted(KNOWN), n=1, cutoff=0.75)
            t.refuse(key, "not an Axolotl key mistral-tune knows" + (f"; did you mean '{close[0]}'?" if close else
                                                                      "; remove it or set its counterpart by hand"))
    _model_keys(given, t)
    _adapter_keys(given, t)
    _optimizer_keys(given, t)
    _run_keys(given, t)
    if not _truthy(given.get("rl")):  # preference datasets have keys of their own; rl is refused already
        _data_keys(given, t)
        if not given.get("datasets") and not given.get("pretraining_dataset"):
            t.refuse("datasets", "missing: the training data (or pretraining_dataset)")
    if t.problems:
        raise ConfigError("\n".join(f"{source}: {p}" for p in t.problems))
    t.notes = _grouped(t.notes)
    return t


# The key of ours each key translated in code lands in (what `unexplained` checks).
COUNTERPART = {"datasets": "datasets", "test_datasets": "val_datasets", "pretraining_dataset": "datasets",
               "adapter": "adapter", "optimizer": "optimizer", "lr_scheduler": "lr_scheduler", "bf16": "bf16",
               "gradient_checkpointing": "gradient_checkpointing", "activation_offloading": "offload_activations",
               "resume_from_checkpoint": "resume", "auto_resume_from_checkpoints": "resume",
               "early_stopping_patience": "eval", "excess_length_strategy": "on_too_long",
               "dataset_exact_deduplication": "cleaning", "batch_size": "gradient_accumulation_steps",
               "lora_target_modules": "lora_target_modules"}


def unexplained(data: dict, t: Translation) -> list[str]:
    """The top-level keys of `data` that `t` neither carries into a key of ours nor names in a note."""
    named = {k for note in t.notes for k in note.split(": ", 1)[0].split(", ")}
    carried = set(SAME) | set(RENAMED) | {k for k, ours in COUNTERPART.items() if ours in t.config}
    return [k for k in map(str, data) if k not in named and k not in carried]


def _truthy(value: Any) -> bool:
    return value is not None and value not in (False, 0, "", [], {}, "none", "None")


def _grouped(notes: list[str]) -> list[str]:
    """Notes that give the same reason, as one line naming all their keys."""
    keys: dict[str, list[str]] = {}
    for note in notes:
        key, text = note.split(": ", 1)
        keys.setdefault(text, []).append(key)
    return [f"{', '.join(k)}: {text}" for text, k in keys.items()]


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _number(value: Any) -> Any:
    """`2e-5` is a string to YAML 1.1 (no dot); Axolotl reads it as a number, so do we."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _model_keys(given: dict, t: Translation) -> None:
    model_config = given.get("model_config")
    if isinstance(model_config, dict) and model_config:
        extra = sorted(set(model_config) - {"output_router_logits"})
        if extra:
            t.refuse("model_config", f"overrides {extra} of the model's config.json have no counterpart")
        else:
            t.note("model_config", "left out: Mixtral's router load-balancing loss is added when the router trains "
                   "(adapter: none); set router_aux_loss_coef to add it with adapters too")
    if "unfrozen_parameters" in given:
        t.note("unfrozen_parameters", "left out, and this differs: full fine-tuning here trains every weight "
               "(more memory than training only the listed ones)")


def _adapter_keys(given: dict, t: Translation) -> None:
    adapter = given.get("adapter")
    four, eight = given.get("load_in_4bit") is True, given.get("load_in_8bit") is True
    if adapter not in (None, "lora", "qlora"):
        t.refuse("adapter", f"{adapter!r}: mistral-tune trains lora or qlora adapters, or the whole model")
        return
    if adapter is None:
        t.config["adapter"] = "none"
        t.note("adapter", "not set: Axolotl trains the whole model, so adapter: none")
        for key in ("load_in_4bit", "load_in_8bit"):
            if given.get(key) is True:
                t.refuse(key, "a quantized base needs an adapter: set adapter: qlora (4-bit) or lora")
            elif key in given:
                t.note(key, "false: nothing to carry")
        for key in ("lora_target_modules", "lora_target_linear", "lora_model_dir"):
            if key in given:
                t.note(key, "left out: no adapter (the whole model trains)")
        return
    t.config["adapter"] = "qlora" if four or adapter == "qlora" else "lora"
    if four and adapter == "lora":
        t.note("load_in_4bit", "true with adapter: lora is QLoRA, so adapter: qlora")
    elif "load_in_4bit" in given:
        t.note("load_in_4bit", f"{_show(given['load_in_4bit'])}: carried by adapter: {t.config['adapter']}")
    if eight:
        t.note("load_in_8bit", "no 8-bit base here; the base stays in bf16 (twice the memory); for less use "
               "adapter: qlora (4-bit NF4) or base_precision: fp8")
    elif "load_in_8bit" in given:
        t.note("load_in_8bit", "false: nothing to carry")
    if given.get("lora_model_dir"):
        t.refuse("lora_model_dir", "starting from a saved adapter is not supported; mistral-tune trains a new one")
    _targets(given, t)


def _targets(given: dict, t: Translation) -> None:
    linear = given.get("lora_target_linear") is True
    modules = given.get("lora_target_modules")
    if "lora_target_linear" in given:
        t.note("lora_target_linear", "true: every projection is mistral-tune's default (on Mixtral: attention "
               "and experts, not the router)" if linear else f"{_show(given['lora_target_linear'])}: nothing to carry")
    if linear:
        if modules:
            t.note("lora_target_modules", "left out: lora_target_linear already takes every projection")
        return
    if not modules:
        t.config["lora_target_modules"] = ["q_proj", "v_proj"]
        t.note("lora_target_modules", "not set: PEFT's default for Mistral models, [q_proj, v_proj]")
        return
    known = list(MISTRAL.projections) + [k for k in EXPERT_TARGETS if k not in MISTRAL.projections]
    if isinstance(modules, str):
        chosen = [name for name in known if any(re.fullmatch(modules, c) for c in _module_names(name))]
        if not chosen:
            t.refuse("lora_target_modules", f"{modules!r} matches none of the model's projections ({known})")
            return
        t.config["lora_target_modules"] = chosen
        t.note("lora_target_modules", f"the pattern selects {chosen} of the text model (only it is trained here)")
        return
    names = [str(m) for m in modules]
    if "gate" in names:
        t.note("lora_target_modules", "gate (Mixtral's router) left out: mistral-tune does not adapt the router")
    unknown = [m for m in names if m not in known and m != "gate"]
    if unknown:
        hint = " (to train them whole: lora_modules_to_save)" if set(unknown) <= {"lm_head", "embed_tokens"} else ""
        t.refuse("lora_target_modules", f"{unknown}: not projections mistral-tune adapts; known: {known}{hint}")
        return
    t.config["lora_target_modules"] = [m for m in names if m != "gate"]


def _module_names(projection: str) -> list[str]:
    """Full module names one projection has in the checkpoints Axolotl's patterns are written for."""
    if projection in ATTENTION_PROJECTIONS:
        parents = ["self_attn"]
    elif projection in MISTRAL.feed_forward:
        parents = ["mlp"]
    else:  # Mixtral's experts, by their hub names
        hub = {"w1": "w1", "w3": "w3", "w2": "w2", "gate_up_proj": "w1", "down_proj": "w2", "experts": "w1"}
        parents, projection = ["block_sparse_moe.experts.0"], hub[projection]
    prefixes = ("model.layers.0", "model.language_model.layers.0", "language_model.model.layers.0")
    return [f"{p}.{parent}.{projection}" for p in prefixes for parent in parents]


def _optimizer_keys(given: dict, t: Translation) -> None:
    name = given.get("optimizer")
    if name is not None:
        if name not in OPTIMIZERS:
            t.refuse("optimizer", f"{name!r}: mistral-tune has AdamW (adamw) and 8-bit AdamW (adamw_8bit); "
                     f"known Axolotl names: {', '.join(OPTIMIZERS)}")
        else:
            t.config["optimizer"] = OPTIMIZERS[name]
            if name.startswith("paged_"):
                t.note("optimizer", f"{name}: {OPTIMIZERS[name]} (its state is not paged to CPU memory)")
    sched = given.get("lr_scheduler")
    if sched is not None:
        if sched not in SCHEDULERS:
            t.refuse("lr_scheduler", f"{sched!r}: mistral-tune has {', '.join(sorted(set(SCHEDULERS.values())))} "
                     "after a linear warm-up")
        else:
            t.config["lr_scheduler"] = SCHEDULERS[sched]
    if given.get("cosine_min_lr_ratio"):
        t.refuse("cosine_min_lr_ratio", "the cosine schedule here decays to zero; there is no floor")
    elif "cosine_min_lr_ratio" in given:
        t.note("cosine_min_lr_ratio", "0: the cosine schedule here decays to zero")
    if "batch_size" in given:
        micro = given.get("micro_batch_size") or 1
        total = given["batch_size"]
        if "gradient_accumulation_steps" in given or not isinstance(total, int) or total % micro:
            t.refuse("batch_size", "give gradient_accumulation_steps instead (batch = micro_batch_size x "
                     "gradient_accumulation_steps)")
        else:
            t.config["gradient_accumulation_steps"] = total // micro
    for key in ("save_steps", "eval_steps"):
        value = given.get(key)
        if isinstance(value, float) and value < 1:
            t.refuse(key, f"{value}: a share of the run; give a number of optimizer steps")


def _run_keys(given: dict, t: Translation) -> None:
    bf16, fp16 = given.get("bf16"), given.get("fp16")
    if bf16 is not None:
        t.config["bf16"] = "auto" if bf16 == "auto" else bool(bf16)
    if fp16:
        t.config["bf16"] = "auto"
        t.note("fp16", "no fp16 autocast here; bf16: auto (bf16 where the GPU has it, float32 otherwise)")
    elif "fp16" in given:
        t.note("fp16", "false: nothing to carry")
    checkpointing = given.get("gradient_checkpointing")
    if checkpointing is not None:
        t.config["gradient_checkpointing"] = bool(checkpointing)
        if checkpointing == "offload":
            t.config["offload_activations"] = True
    if given.get("activation_offloading"):
        t.config["gradient_checkpointing"] = t.config["offload_activations"] = True
    if "gradient_checkpointing_kwargs" in given:
        t.note("gradient_checkpointing_kwargs", "left out: recompute is mistral-tune's own (no reentrant variant)")
    if given.get("resume_from_checkpoint"):
        t.config["resume"] = str(given["resume_from_checkpoint"])
    elif given.get("auto_resume_from_checkpoints"):
        t.config["resume"] = "auto"
    if "early_stopping_patience" in given:
        t.config["eval"] = {"early_stopping_patience": given["early_stopping_patience"]}
    if "excess_length_strategy" in given:
        strategy = given["excess_length_strategy"]
        t.config["on_too_long"] = "truncate" if strategy == "truncate" else "drop"
        if strategy not in ("drop", "truncate"):
            t.note("excess_length_strategy", f"{strategy}: no counterpart; too long samples are dropped and counted")
    if "dataset_exact_deduplication" in given:
        t.config["cleaning"] = {"dedup": bool(given["dataset_exact_deduplication"])}
    _trackers(given, t)
    _distributed(given, t)


def _trackers(given: dict, t: Translation) -> None:
    trackers = ["tensorboard"] if given.get("use_tensorboard") is not False else []
    for name, keys in (("wandb", ("use_wandb", "wandb_project", "wandb_entity", "wandb_name", "wandb_mode")),
                       ("mlflow", ("use_mlflow", "mlflow_experiment_name", "mlflow_run_name", "mlflow_tracking_uri"))):
        if any(given.get(k) for k in keys) and given.get(f"use_{name}") is not False:
            trackers.append(name)
    t.config["report_to"] = trackers
    env = {"wandb_name": "WANDB_NAME", "wandb_mode": "WANDB_MODE", "mlflow_run_name": "MLFLOW_RUN_NAME"}
    for key, var in env.items():
        if key in given:
            t.note(key, f"no config key; set {var}={given[key]} in the environment of the run")
    for key in ("use_wandb", "use_mlflow", "use_tensorboard"):
        if key in given:
            t.note(key, f"{_show(given[key])}: carried by report_to: {trackers}")


def _distributed(given: dict, t: Translation) -> None:
    fsdp = given.get("fsdp") or given.get("fsdp_config") or given.get("fsdp_version")
    adapter = t.config.get("adapter")
    if fsdp:
        if adapter == "none":
            t.config["distributed"] = "fsdp"
            cfg = given.get("fsdp_config") or {}
            reshard = cfg.get("reshard_after_forward") if isinstance(cfg, dict) else None
            if isinstance(reshard, bool):
                t.config["fsdp_reshard_after_forward"] = reshard
            if isinstance(cfg, dict) and any(cfg.get(k) for k in ("activation_checkpointing",
                                                                  "fsdp_activation_checkpointing")):
                t.config["gradient_checkpointing"] = True
        else:
            t.config["distributed"] = "ddp"
        how = "fsdp (FSDP2)" if adapter == "none" else "ddp (with adapters each GPU holds the frozen base)"
        for key in ("fsdp", "fsdp_config", "fsdp_version"):
            if key in given:
                t.note(key, f"distributed: {how}; the wrapping, offload and state-dict settings are mistral-tune's; "
                       "run with train --gpus N")
    if "deepspeed" in given:
        how = "fsdp shards weights, gradients and optimizer state" if adapter == "none" else "ddp for adapters"
        t.note("deepspeed", f"left out: mistral-tune uses PyTorch's DDP or FSDP2 instead of DeepSpeed "
               f"(distributed: auto; {how}); run with train --gpus N")


# ----------------------------------------------------------------------------------------------- data

DATASET_KEYS = ("path", "type", "split", "name", "ds_type", "data_files", "field_messages",
                "message_property_mappings", "message_field_role", "message_field_content", "field", "roles",
                "roles_to_train", "train_on_eos", "train_on_eot", "field_human", "field_model", "conversation",
                "chat_template", "chat_template_jinja", "drop_system_message", "trust_remote_code", "revision",
                "shards", "shards_idx", "preprocess_shards", "field_tools", "field_thinking", "template_thinking_key",
                "split_thinking", "text_column", "skip", "input_transform", "input_format", "message_field_training",
                "message_field_training_detail", "logprobs_field", "temperature")
ALPACA_TYPES = ("alpaca", "alpaca_chat", "alpaca_w_system", "alpaca_instruct")
# Axolotl's default speaker names per role; mistral-tune's readers know each of them.
DEFAULT_ROLES = {"user": {"human", "user"}, "assistant": {"gpt", "assistant", "model"}, "system": {"system"},
                 "tool": {"tool"}}


def _data_keys(given: dict, t: Translation) -> None:
    for key, ours in (("datasets", "datasets"), ("test_datasets", "val_datasets"), ("pretraining_dataset", "datasets")):
        entries = given.get(key)
        if entries is None:
            continue
        if isinstance(entries, dict):
            entries = [entries]
        if not isinstance(entries, list):
            t.refuse(key, f"expected a list of datasets, got {type(entries).__name__}")
            continue
        out = [_dataset(f"{key}.{i}", ds, t, pretraining=key == "pretraining_dataset") for i, ds in enumerate(entries)]
        t.config.setdefault(ours, []).extend(d for d in out if d is not None)
    if "pretraining_dataset" in given:
        t.note("pretraining_dataset", "read as text datasets, downloaded whole (not streamed)")
    if t.config.get("val_datasets") and t.config.get("val_set_size"):
        t.refuse("test_datasets", "with val_set_size: give one of them")


def _dataset(where: str, ds: Any, t: Translation, pretraining: bool = False) -> dict | None:
    if not isinstance(ds, dict) or not isinstance(ds.get("path"), str):
        t.refuse(where, "expected a mapping with a path")
        return None
    out: dict[str, Any] = {"path": ds["path"]}
    for key in ("split", "name"):
        if ds.get(key) is not None:
            out[key] = str(ds[key])
    for key in ds:
        if key not in DATASET_KEYS:
            t.refuse(f"{where}.{key}", "not an Axolotl dataset key mistral-tune knows")
    _dataset_source(where, ds, out, t)
    kind = ds.get("type")
    if pretraining or kind in ("completion", "pretrain"):
        out["format"] = "text"
        column = ds.get("text_column") or ds.get("field") or "text"
        if column != "text":
            out["field_map"] = {"text": column}
    elif isinstance(kind, dict):
        _custom_alpaca(where, kind, out, t)
    elif isinstance(kind, str) and kind.split(":")[0].split(".")[0] in ALPACA_TYPES:
        out["format"] = "alpaca"
        t.note(f"{where}.type", f"{kind}: format alpaca, as a user/assistant conversation in the model's chat "
               "format (not Alpaca's prompt text)")
    elif isinstance(kind, str) and kind.split(":")[0].split(".")[0] in ("chat_template", "sharegpt"):
        if kind not in ("chat_template", "chat_template.default", "sharegpt") and not kind.startswith("sharegpt:"):
            t.refuse(f"{where}.type", f"{kind}: a preference or custom variant with no counterpart; "
                     "chat_template (default) and sharegpt convert")
        _chat(where, ds, out, t)
    elif kind == "input_output":
        t.refuse(f"{where}.type", "input_output (segments, each trained or not) has no counterpart; write the data "
                 "as prompt/completion or messages records")
    else:
        t.refuse(f"{where}.type", f"{kind!r} has no counterpart; alpaca, chat_template, sharegpt, completion and "
                 "pretraining datasets convert")
    return out


def _dataset_source(where: str, ds: dict, out: dict, t: Translation) -> None:
    kind = ds.get("ds_type")
    if kind in ("parquet", "csv", "json"):
        out["source"] = kind if kind != "json" else "auto"  # Axolotl's json is JSON or JSON lines: by extension
    elif kind is not None:
        t.refuse(f"{where}.ds_type", f"{kind!r}: mistral-tune reads jsonl, json, parquet, csv and hub datasets")
    if ds.get("data_files"):
        t.refuse(f"{where}.data_files", "give the file (or a glob) in path instead")
    if ds.get("shards"):
        t.note(f"{where}.shards", "left out: the whole dataset is read (num_samples takes a fixed count)")
    if ds.get("revision"):
        t.note(f"{where}.revision", "left out: the hub's current version is read")
    for key in ("trust_remote_code", "preprocess_shards", "skip", "shards_idx"):
        if key in ds:
            t.note(f"{where}.{key}", "left out: mistral-tune reads the data itself, and never runs code from the hub")


def _custom_alpaca(where: str, kind: dict, out: dict, t: Translation) -> None:
    out["format"] = "alpaca"
    names = {"field_instruction": "instruction", "field_input": "input", "field_output": "output",
             "field_system": "system"}
    field_map = {ours: kind[theirs] for theirs, ours in names.items() if kind.get(theirs)}
    if field_map:
        out["field_map"] = field_map
    unknown = sorted(set(kind) - set(names) - {"format", "no_input_format", "system_format", "system_prompt"})
    if unknown:
        t.refuse(f"{where}.type", f"{unknown}: not keys of Axolotl's custom prompt format")
    if kind.get("system_prompt"):
        t.refuse(f"{where}.type.system_prompt", "a fixed system prompt has no counterpart; put it in the data")
    if any(kind.get(k) for k in ("format", "no_input_format", "system_format")):
        t.note(f"{where}.type", "the prompt text templates are left out: records become a user/assistant "
               "conversation in the model's chat format")


def _chat(where: str, ds: dict, out: dict, t: Translation) -> None:
    """chat_template / sharegpt: OpenAI role/content messages, or ShareGPT from/value turns."""
    mapping = ds.get("message_property_mappings") or {}
    role = mapping.get("role") or ds.get("message_field_role") or ("from" if ds.get("type", "").startswith("sharegpt")
                                                                    else "role")
    content = mapping.get("content") or ds.get("message_field_content") or (
        "value" if ds.get("type", "").startswith("sharegpt") else "content")
    extra = sorted(set(mapping) - {"role", "content"})
    if extra:
        t.refuse(f"{where}.message_property_mappings", f"{extra}: only role and content can be renamed")
    messages = ds.get("field_messages") or ("conversations" if role == "from" else "messages")
    if (role, content) == ("role", "content"):
        out["format"] = "messages"
        field_map = {"messages": messages}
    else:
        out["format"] = "sharegpt"  # reads human/gpt and user/assistant speakers alike
        field_map = {"conversations": messages, "from": role, "value": content}
    if ds.get("field_tools"):
        field_map["tools"] = ds["field_tools"]
    default = {"messages": "messages", "conversations": "conversations", "from": "from", "value": "value",
               "tools": "tools"}
    field_map = {k: v for k, v in field_map.items() if default[k] != v}
    if field_map:
        out["field_map"] = field_map
    roles = ds.get("roles")
    if roles:
        odd = {r: sorted(set(names) - DEFAULT_ROLES.get(r, set())) for r, names in roles.items()}
        odd = {r: n for r, n in odd.items() if n}
        if odd:
            t.refuse(f"{where}.roles", f"speaker names {odd} have no counterpart; mistral-tune reads "
                     f"{', '.join(sorted(set().union(*DEFAULT_ROLES.values())))}")
        else:
            t.note(f"{where}.roles", "left out: Axolotl's default speaker names, which mistral-tune reads")
    trained = ds.get("roles_to_train")
    if trained and set(trained) - DEFAULT_ROLES["assistant"]:
        t.refuse(f"{where}.roles_to_train", f"{trained}: set train_on_inputs: true to train on every turn")
    for key, why in (("roles_to_train", "assistant turns are trained"),
                     ("train_on_eos", "each assistant turn's end token is trained"),
                     ("train_on_eot", "each assistant turn's end token is trained"),
                     ("chat_template", "rendered in the model's own format by mistral-common"),
                     ("chat_template_jinja", "rendered in the model's own format by mistral-common"),
                     ("conversation", "rendered in the model's own format by mistral-common"),
                     ("field_thinking", "thinking is read from content parts or reasoning_content"),
                     ("template_thinking_key", "thinking is read from content parts or reasoning_content"),
                     ("split_thinking", "thinking is read from content parts or reasoning_content"),
                     ("field_human", "ShareGPT speakers are read by name"), ("field_model", "as field_human")):
        if key in ds:
            t.note(f"{where}.{key}", f"left out: {why}")
    if ds.get("drop_system_message"):
        t.refuse(f"{where}.drop_system_message", "has no counterpart: system messages are kept")
