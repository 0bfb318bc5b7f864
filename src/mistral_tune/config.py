"""The run config: schema, YAML loading, `key=value` overrides, and one-line error messages."""

from __future__ import annotations

import copy
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .config_axolotl import CONVERT_COMMAND, Translation, axolotl_hint, axolotl_value_hint, translate
from .errors import ConfigError, OutputError
from .fsutil import atomic_write_text, expand_path
from .models.families import EXPERT_TARGETS, MISTRAL

ALL_PROJECTIONS = list(MISTRAL.projections)  # the seven of a dense family (models/families.py)


# Presets: starting points by memory budget and method. The memory figures are the recorded runs' (7B,
# 8k tokens a micro-batch; docs/benchmarks.md) or, for 12B, `mistral-tune plan`'s. A preset fills the
# keys a config leaves out; the config's own win.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "qlora-24gb": ("QLoRA on a 24 GB GPU: a 7B model peaks near 6 GiB, a 12B one near 11 GiB",
                   dict(adapter="qlora", lora_r=16, lora_alpha=16, learning_rate=2e-4, sequence_len=4096,
                        sample_packing=True, micro_batch_size=2, gradient_accumulation_steps=8,
                        gradient_checkpointing=True, offload_activations=True)),
    "lora-24gb": ("LoRA over a bf16 base on a 24 GB GPU, up to 8B: a 7B model peaks near 15.5 GiB",
                  dict(adapter="lora", lora_r=16, lora_alpha=16, learning_rate=2e-4, sequence_len=4096,
                       sample_packing=True, micro_batch_size=2, gradient_accumulation_steps=8,
                       gradient_checkpointing=True, offload_activations=True)),
    "lora-80gb": ("LoRA without recompute on an 80 GB GPU (fastest): 7B peaks near 49 GiB, 12B near 70",
                  dict(adapter="lora", lora_r=16, lora_alpha=16, learning_rate=2e-4, sequence_len=4096,
                       sample_packing=True, micro_batch_size=2, gradient_accumulation_steps=8,
                       gradient_checkpointing=False, offload_activations=False)),
    "full-fsdp": ("full fine-tuning sharded over several GPUs (train --gpus N): a 7B model took 82 GiB per GPU on two",
                  dict(adapter="none", distributed="fsdp", learning_rate=1e-5, weight_decay=0.0, sequence_len=4096,
                       sample_packing=True, micro_batch_size=2, gradient_accumulation_steps=8,
                       gradient_checkpointing=True, offload_activations=False)),
}


#: The kinds of PII the cleaning step (data/clean.py) can redact: what pii_kinds accepts and defaults to.
PII_KINDS = ("email", "phone", "ip_address", "credit_card", "secret")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


FIELD_NAMES = (
    "messages",
    "conversations",
    "tools",
    "instruction",
    "input",
    "output",
    "prompt",
    "completion",
    "system",
    "text",
    "role",
    "content",
    "from",
    "value",
)


class DatasetConfig(_Strict):
    path: str = Field(
        description="A .jsonl/.json/.parquet/.csv file, a glob, a directory of such files, a directory "
        "written by datasets' save_to_disk, or a Hugging Face dataset name (owner/name)."
    )
    source: Literal["auto", "jsonl", "json", "parquet", "csv", "hf"] = Field(
        "auto", description="How to read path; auto goes by the file extension (hf: a Hugging Face dataset)."
    )
    name: str | None = Field(None, description="Hugging Face dataset subset (configuration) name.")
    split: str | None = Field(None, description="Hugging Face dataset split; default train.")
    format: Literal["auto", "messages", "sharegpt", "alpaca", "instruction", "prompt_completion", "text"] = Field(
        "auto",
        description="Record format; auto detects it from the dataset's first record. instruction is an "
        "alias of alpaca.",
    )
    field_map: dict[str, str] = Field(
        default_factory=dict,
        description="Renamed columns: {canonical name: the data's name}, e.g. {instruction: question}. "
        f"Canonical names: {', '.join(FIELD_NAMES)}.",
    )
    weight: float = Field(
        1.0,
        gt=0,
        description="Mixing weight: the share of this dataset's samples in each epoch "
        "(2.0 repeats every sample twice, 0.5 takes a random half).",
    )
    num_samples: int | None = Field(
        None,
        ge=1,
        description="Take exactly this many samples per epoch (repeating if there are fewer); instead of weight.",
    )

    @model_validator(mode="after")
    def _check(self) -> DatasetConfig:
        unknown = sorted(set(self.field_map) - set(FIELD_NAMES))
        if unknown:
            raise ValueError(f"field_map: unknown field name(s) {unknown}; allowed: {list(FIELD_NAMES)}")
        if self.num_samples is not None and self.weight != 1.0:
            raise ValueError(f"dataset {self.path}: set weight or num_samples, not both")
        return self


class CleaningConfig(_Strict):
    unicode: bool = Field(
        True,
        description="Repair text: undo mojibake (ftfy), replace lone surrogates, remove control characters, "
        "normalise to NFC; each repair is counted.",
    )
    dedup: bool = Field(True, description="Drop exact duplicate samples (after cleaning), across all datasets.")
    near_dedup: bool = Field(
        False,
        description="Drop near-duplicates (MinHash/LSH over word 5-grams) within each dataset; off by "
        "default because it also removes templated records that differ only in a few words.",
    )
    near_dedup_threshold: float = Field(
        0.85, gt=0, le=1, description="Estimated Jaccard similarity at or above which a record is a near-duplicate."
    )
    redact_pii: bool = Field(
        False,
        description="Replace e-mails, phone numbers, public IP addresses, card numbers and API keys/secrets "
        "by placeholders like [EMAIL] (versions, URLs, git remotes and code keep theirs; secrets are "
        "replaced everywhere).",
    )
    pii_kinds: list[Literal[PII_KINDS]] = Field(
        default_factory=lambda: list(PII_KINDS), description="Which kinds redact_pii replaces."
    )
    prompt_injection: Literal["flag", "drop", "off"] = Field(
        "flag",
        description="Records with prompt-injection phrases or chat-template markers as text: flag "
        "(count and list them), drop (reject them), off.",
    )


TASK_METRICS = ("exact_match", "token_f1", "rouge_l", "bleu", "chrf", "labels", "json_valid", "json_schema",
                "regex", "function")


class TaskEvalConfig(_Strict):
    dataset: DatasetConfig = Field(
        description="Prompts with reference answers: conversations whose last message is the assistant's answer "
        "(any format and source the training data takes)."
    )
    metrics: list[Literal[TASK_METRICS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["exact_match", "token_f1"],
        description=f"Any of {', '.join(TASK_METRICS)}. labels gives accuracy, precision, recall and f1 (macro).",
    )
    normalize: list[Literal["strip", "lower", "punctuation", "articles", "whitespace"]] = Field(
        default_factory=lambda: ["strip"], description="Normalisations before exact_match and labels."
    )
    labels: list[str] | None = Field(None, description="The label set for labels; default: the references' values.")
    json_schema: str | None = Field(None, description="JSON Schema file that json_schema checks answers against.")
    regex: str | None = Field(None, description="Pattern the whole (stripped) answer must match, for regex.")
    function: str | None = Field(
        None, description="module:function or file.py:function, called as f(prediction, reference) -> number."
    )
    max_samples: int | None = Field(200, ge=1, description="Evaluate at most this many examples (null: all).")
    max_new_tokens: int = Field(64, ge=1, description="Longest answer generated.")
    temperature: float = Field(0.0, ge=0, description="0: greedy; above 0: sampled (with top_p and seed).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling share, when temperature > 0.")
    seed: int = Field(0, description="Sampling seed.")
    batch_size: int = Field(16, ge=1, description="Prompts generated together.")

    @model_validator(mode="after")
    def _check(self) -> TaskEvalConfig:
        for metric, key in (("json_schema", "json_schema"), ("regex", "regex"), ("function", "function")):
            if metric in self.metrics and getattr(self, key) is None:
                raise ValueError(f"eval.tasks: metric {metric} needs eval.tasks.{key}")
        if self.regex is not None:
            import re

            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"eval.tasks.regex: {self.regex!r} is not a valid pattern ({exc})") from None
        return self


class ForgettingConfig(_Strict):
    dataset: DatasetConfig = Field(
        description="General reference texts (or conversations), e.g. {path: wikitext, source: hf, name: "
        "wikitext-2-raw-v1, split: test}; every token is scored."
    )
    max_samples: int = Field(64, ge=1, description="Texts taken from the dataset.")
    max_tokens: int = Field(512, ge=16, description="Tokens scored per text (longer texts are cut).")
    kl: bool = Field(True, description="Also measure KL(tuned || base) per token (needs a base).")
    max_kl: float | None = Field(
        0.2, gt=0, description="Warn when KL from the base exceeds this many nats per token (null: never)."
    )
    max_ppl_increase: float | None = Field(
        0.1, gt=0, description="Warn when perplexity rises by more than this share over the base's (0.1 = 10%)."
    )
    lm_eval_tasks: list[str] = Field(
        default_factory=list,
        description="lm-evaluation-harness tasks to run (pip install 'mistral-tune[eval]'), e.g. [hellaswag].",
    )
    lm_eval_include_path: str | None = Field(None, description="A folder of extra lm-evaluation-harness task YAMLs.")
    lm_eval_limit: int | None = Field(None, ge=1, description="Examples per lm-evaluation-harness task.")


class NeedleConfig(_Strict):
    lengths: list[int] | None = Field(
        None, description="Context lengths in tokens; default: four doubling up to twice sequence_len."
    )
    depths: list[float] = Field(
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0],
        description="Where the needle sits, as a share of the context (0: start, 1: just before the question).",
    )
    trials: int = Field(2, ge=1, description="Probes (different keys) per length and depth.")
    token_budget: int = Field(
        2_000_000, ge=1, description="Most prompt tokens one model's probes may take; the longest lengths go first."
    )
    batch_tokens: int = Field(32768, ge=256, description="Prompt tokens per generation batch.")
    needle: str = Field("The pass key is {key}. Remember it.", description="The hidden sentence; {key} is the number.")
    question: str = Field("What is the pass key? Answer with the number only.", description="Asked after the text.")
    key_digits: int = Field(5, ge=1, le=12, description="Digits of the pass key.")
    seed: int = Field(0, description="Seed for the keys.")
    documents: DatasetConfig | None = Field(
        None, description="Long documents for a perplexity-by-position curve (null: no curve)."
    )
    documents_max_samples: int = Field(16, ge=1, description="Documents taken for the curve.")
    documents_max_tokens: int | None = Field(
        None, ge=16, description="Tokens per document for the curve; default: the longest probe length."
    )
    position_buckets: int = Field(32, ge=2, description="Points on the perplexity-by-position curve.")

    @model_validator(mode="after")
    def _check(self) -> NeedleConfig:
        if self.lengths is not None and (not self.lengths or min(self.lengths) < 16):
            raise ValueError("eval.needle.lengths: give context lengths of at least 16 tokens")
        if not self.depths or any(not 0 <= d <= 1 for d in self.depths):
            raise ValueError("eval.needle.depths: give depths between 0 and 1")
        if "{key}" not in self.needle:
            raise ValueError("eval.needle.needle: the sentence must contain {key}")
        return self


class EvalConfig(_Strict):
    tasks: TaskEvalConfig | None = Field(None, description="Task metrics on your evaluation set (see eval.tasks).")
    forgetting: ForgettingConfig | None = Field(
        None, description="Perplexity and KL on general text, base vs tuned (see eval.forgetting)."
    )
    needle: NeedleConfig | None = Field(None, description="Long-context pass-key probe (see eval.needle).")
    metric: str = Field(
        "loss",
        description="What picks the best adapter and drives early stopping: loss (held-out loss), or an "
        "evaluation's metric, e.g. tasks.exact_match, forgetting.kl (preference.accuracy: a preference method's "
        "held-out pairs).",
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many evaluations in a row without a better eval.metric."
    )
    during_training: bool = Field(True, description="Run the evaluations every eval_steps, not only at the end.")

    @property
    def requested(self) -> bool:
        """Whether the section asks for anything beyond the held-out loss (an evaluation or early stopping)."""
        return any(x is not None for x in (self.tasks, self.forgetting, self.needle, self.early_stopping_patience)) \
            or self.metric.startswith("preference.")  # a preference run's held-out pairs, evaluated by the run

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        kind = self.metric.split(".", 1)[0]
        if self.metric != "loss" and (kind not in ("tasks", "forgetting", "needle", "long_ppl", "loss", "preference")
                                      or "." not in self.metric):
            raise ValueError(f"eval.metric: {self.metric!r}; use loss or EVALUATION.METRIC, e.g. tasks.exact_match")
        if kind in ("tasks", "forgetting", "needle") and getattr(self, kind) is None:
            raise ValueError(f"eval.metric: {self.metric} needs an eval.{kind} section")
        return self


PREFERENCE_METHODS = ("dpo", "ipo", "orpo", "simpo", "kto")
# beta's default per method: SimPO's margins are mean per-token log-probabilities, hence a larger scale
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "orpo": 0.1, "simpo": 2.0, "kto": 0.1}
# The preference keys each method reads (beta: all of them)
METHOD_KEYS = {"dpo": {"loss_type", "label_smoothing"}, "ipo": set(), "orpo": set(),
               "simpo": {"gamma", "label_smoothing"}, "kto": {"desirable_weight", "undesirable_weight"}}


class PreferenceConfig(_Strict):
    beta: float | None = Field(
        None, gt=0, description="Strength of the preference: the scale of the log-ratio margins (dpo, ipo, kto: "
        "the pull towards the reference; orpo: the weight of the odds-ratio term; simpo: the reward scale). "
        "Default: 0.1, or 2.0 for simpo."
    )
    loss_type: Literal["sigmoid", "hinge", "robust"] = Field(
        "sigmoid", description="dpo: sigmoid (the DPO loss), hinge (SLiC), robust (rDPO, unbiased under flipped "
        "labels, with label_smoothing their share); method: ipo for IPO."
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="dpo, simpo: the share of pairs assumed to have their labels flipped "
        "(conservative DPO with loss_type sigmoid)."
    )
    gamma: float = Field(0.5, ge=0, description="simpo: the target margin between chosen and rejected rewards.")
    desirable_weight: float = Field(1.0, gt=0, description="kto: weight of the desirable answers' loss.")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of the undesirable answers' loss.")


#: The built-in reward functions of method grpo (train/rewards.py); a config may also name its own
#: `module:function`.
REWARD_BUILTINS = ("exact_match", "token_f1", "rouge_l", "regex", "json_valid", "json_schema", "length")


class RewardConfig(_Strict):
    name: str | None = Field(None, description=f"A built-in reward: {', '.join(REWARD_BUILTINS)}.")
    function: str | None = Field(
        None, description="Your own reward, `package.module:function` or `path/to/file.py:function`, called as "
        "function(prompt=messages, completion=text, record=the record's fields, **args) -> float (None: not scored)."
    )
    weight: float = Field(1.0, description="Its weight in the summed reward (negative: a penalty).")
    args: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments: exact_match / token_f1 / rouge_l: field (the record's "
        "reference answer, default answer), normalize (exact_match); regex: pattern, full (whole answer); "
        "json_schema: schema (a file or an inline schema); length: max_chars."
    )

    @model_validator(mode="after")
    def _check(self) -> RewardConfig:
        if (self.name is None) == (self.function is None):
            raise ValueError("a reward names either name (a built-in) or function (module:function), not both")
        if self.name is not None and self.name not in REWARD_BUILTINS:
            raise ValueError(f"reward name {self.name!r}: not a built-in ({', '.join(REWARD_BUILTINS)}); your own "
                             "goes in function: module:function")
        return self

    @property
    def label(self) -> str:
        """Its name in the logs: the built-in's, or the function's."""
        return self.name or self.function.rpartition(":")[2]


class GRPOConfig(_Strict):
    num_generations: int = Field(4, ge=2, description="Completions sampled per prompt (the group, G).")
    max_new_tokens: int = Field(64, ge=1, description="Longest completion, in tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the rollouts.")
    top_k: int = Field(0, ge=0, description="Top-k sampling of the rollouts (0: no limit).")
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = Field(
        "grpo", description="grpo: each completion's token mean, averaged over completions; dapo: the mean over "
        "every completion token of the step; dr_grpo: the token sum over max_new_tokens per completion (Dr. GRPO)."
    )
    scale_rewards: Literal["group", "none"] = Field(
        "group", description="Advantages: (reward - group mean) / group std (group), or without the std (none, "
        "Dr. GRPO)."
    )
    beta: float = Field(0.0, ge=0, description="Weight of the KL term to the reference (the base with the adapter "
                        "off); 0: none, and no reference pass.")
    epsilon: float = Field(0.2, gt=0, lt=1, description="The ratio's clip range, [1 - epsilon, 1 + epsilon_high].")
    epsilon_high: float | None = Field(None, gt=0, description="Upper clip (DAPO's clip-higher); default epsilon.")
    num_iterations: int = Field(1, ge=1, description="Optimizer steps per rollout batch (its log-probabilities at "
                                "rollout kept as the old policy's).")
    rewards: list[RewardConfig] = Field(
        default_factory=list, description="The reward functions, summed with their weights: each {name or function, "
        "weight, args}."
    )
    batch_size: int = Field(64, ge=1, description="Completions decoded together during rollouts.")


class Config(_Strict):
    # model and tokenizer
    base_model: str | None = Field(
        None,
        description="Local HF model directory or a hub id; needed to train and by validate (the data "
        "commands need only tokenizer).",
    )
    tokenizer: str | None = Field(
        None,
        description="v1 | v3 | v7 | tekken (bundled with mistral-common), a tokenizer file (any version "
        "mistral-common knows, up to v15: tekken.json names its own), or a directory; default: the base "
        "model's own tokenizer file.",
    )
    preset: str | None = Field(
        None, description=f"Fill the keys this config leaves out from a preset: {', '.join(PRESETS)} "
        "(docs/config.md lists each preset's keys; validate shows which values came from it)."
    )
    # data
    datasets: list[DatasetConfig] = Field(min_length=1, description="Training data; see the dataset keys below.")
    val_datasets: list[DatasetConfig] = Field(
        default_factory=list, description="Held-out data given as its own datasets (instead of val_set_size)."
    )
    val_set_size: float = Field(0.0, ge=0, description="Held-out share (0 < x < 1) or count (x >= 1) of samples.")
    sequence_len: int = Field(2048, ge=16, le=1_048_576, description="Tokens per row (a packed row or one sample).")
    sample_packing: bool = Field(True, description="Pack samples into full rows; they never attend to each other.")
    group_by_length: bool = Field(
        False, description="Without packing: put rows of similar length in the same micro-batch (less padding)."
    )
    train_on_inputs: bool = Field(
        False, description="Also train on user/system tokens (default: assistant tokens only)."
    )
    train_on_thinking: bool = Field(
        True, description="Train on the assistant's thinking ([THINK]...[/THINK], v13+ tokenizers); "
        "false: keep it as context only."
    )
    on_bad_record: Literal["error", "skip"] = Field(
        "error",
        description="error: stop and list the bad records; skip: leave them out (each is written, "
        "with its reason, to the rejects file named in the data report).",
    )
    on_too_long: Literal["drop", "truncate"] = Field(
        "drop",
        description="Conversations longer than sequence_len: drop them, or truncate (keep the start "
        "and cut inside the last assistant turn that fits). Counted either way. Texts are always split.",
    )
    cleaning: CleaningConfig = Field(
        default_factory=CleaningConfig, description="Cleaning steps, each on/off (see docs/data.md)."
    )
    dataset_cache: bool = Field(True, description="Keep tokenized datasets on disk and reuse them.")
    dataset_cache_dir: str | None = Field(
        None, description="Token cache folder; default $MISTRAL_TUNE_CACHE/datasets or ~/.cache/mistral-tune/datasets."
    )
    dataset_num_workers: int | None = Field(
        None, ge=1, description="Processes that tokenize; default: the CPU count, at most 8."
    )
    method: Literal["sft", "dpo", "ipo", "orpo", "simpo", "kto", "grpo"] = Field(
        "sft",
        description="sft: supervised fine-tuning; dpo, ipo, orpo, simpo: preference pairs (prompt, chosen, "
        "rejected); kto: judged answers (prompt, completion, label). Their settings: the preference section. "
        "grpo: prompts, sampled completions and reward functions (the grpo section).",
    )
    preference: PreferenceConfig = Field(
        default_factory=PreferenceConfig, description="Settings of the preference methods (method: dpo, ipo, orpo, "
        "simpo, kto)."
    )
    grpo: GRPOConfig = Field(default_factory=GRPOConfig, description="Settings of method grpo.")
    # adapter
    adapter: Literal["lora", "qlora", "none"] = Field(
        "lora",
        description="lora: train adapters; qlora: adapters over an NF4 base (bitsandbytes); none: full fine-tuning.",
    )
    init_from: str | None = Field(
        None, description="Start from an earlier run's LoRA adapter: its run directory or adapter directory (e.g. "
        "an SFT run before dpo). Its weights are the adapter's starting values; its LoRA settings (lora_r, "
        "lora_alpha, targets, use_rslora, use_dora) and base model must be this config's. The reference of "
        "dpo, ipo and kto is then the model it starts from: the base with that adapter. adapter: lora or qlora.",
    )
    base_precision: Literal["bf16", "fp8"] = Field(
        "bf16",
        description="The frozen base under LoRA: bf16 (float32 on CPU), or fp8: its projections held in e4m3 "
        "with a scale per row (half the memory) and their matmuls in FP8 (GPU of compute capability 8.9+, "
        "or CPU); adapter: lora only. The adapter merges into the original weights.",
    )
    lora_r: int = Field(16, ge=1, le=4096, description="LoRA rank.")
    lora_alpha: float = Field(
        16, gt=0, description="LoRA scale numerator: scaling = alpha / r (alpha / sqrt(r) with rsLoRA)."
    )
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    lora_target_modules: list[str] = Field(
        default_factory=lambda: list(ALL_PROJECTIONS),
        description="Projections that get adapters (default: every projection of the model's family: the seven "
        "of a dense model; on Mixtral the four of attention and experts). Mixtral: the attention projections, and "
        "on the experts gate_up_proj (or w1 + w3) and down_proj (or w2), or experts for both: one low-rank pair "
        "per expert, no dropout or DoRA there.",
    )
    router_aux_loss_coef: float | None = Field(
        None,
        ge=0,
        description="Mixtral: weight of the router load-balancing loss (Switch Transformer's, over the real tokens) "
        "added to the training objective; null: config.json's router_aux_loss_coef when the router trains "
        "(adapter: none), else 0. Logged each step as router_aux_loss, apart from loss (the token loss alone).",
    )
    use_rslora: bool = Field(False, description="Scale adapters by alpha/sqrt(r) (rank-stabilised LoRA).")
    use_dora: bool = Field(
        False,
        description="DoRA: a trained magnitude per output row rescales each adapted weight (Liu et al., 2024). "
        "PEFT loads it; vLLM does not, so merge it for vLLM.",
    )
    lora_init: str = Field(
        "kaiming",
        pattern=r"^(kaiming|olora|pissa(_niter_[1-9][0-9]*)?)$",
        description="How adapters start. kaiming: A Kaiming-uniform, B zero (PEFT's init_lora_weights: true). "
        "pissa: A, B from each base weight's top lora_r singular values and vectors (Meng et al., 2024; "
        "pissa_niter_N: by N iterations of randomized SVD, much faster on large weights); olora: from its QR "
        "factors (Büyükakyüz, 2024). These take B A out of the base weight, so training starts at the base "
        "model, and save the adapter for the original base at twice the rank (as PEFT converts it). Not with "
        "adapter: qlora or none, base_precision: fp8, or on Mixtral's experts.",
    )
    loraplus_lr_ratio: float | None = Field(
        None,
        gt=0,
        description="LoRA+: lora_B (and DoRA magnitudes) learn at learning_rate times this, as PEFT's "
        "create_loraplus_optimizer does (the paper suggests 16); null: one learning rate.",
    )
    lora_modules_to_save: list[Literal["embed_tokens", "lm_head"]] = Field(
        default_factory=list,
        description="Also train these whole; the adapter holds them in full (PEFT's modules_to_save). vLLM "
        "does not load such adapters, so merge it for vLLM.",
    )
    new_special_tokens: list[str] = Field(
        default_factory=list,
        description="Names for the tokenizer's reserved control-token slots (v3+ and tekken; not v1), e.g. "
        "['<think>', '</think>']: read out of the data's text as one token each, with their embedding and "
        "output rows trained (README: adapter variants).",
    )
    neftune_noise_alpha: float | None = Field(
        None,
        gt=0,
        description="NEFTune: while training, add uniform noise of size alpha/sqrt(tokens x hidden) to the "
        "input embeddings of each row (Jain et al., 2023; 5 is usual); null: off.",
    )
    # optimisation
    optimizer: Literal["adamw", "adamw_8bit"] = Field(
        "adamw",
        description="adamw: torch's AdamW (fused on a GPU), float32 moments, 8 bytes a trained parameter; "
        "adamw_8bit: bitsandbytes' AdamW8bit, moments in 8 bits with a scale per block of 256, about 2 bytes "
        "(not with distributed: fsdp).",
    )
    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on matrices (not on norms or biases).")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float = Field(1.0, ge=0, description="0 disables clipping.")
    lr_scheduler: Literal["cosine", "constant", "linear"] = Field("cosine", description="Decay after warm-up.")
    warmup_steps: int | None = Field(None, ge=0, description="Linear warm-up length in optimizer steps.")
    warmup_ratio: float | None = Field(
        None, ge=0, lt=1, description="Warm-up as a share of all steps (instead of warmup_steps)."
    )
    micro_batch_size: int = Field(1, ge=1, description="Rows per forward/backward pass.")
    gradient_accumulation_steps: int = Field(
        1,
        ge=1,
        description="Micro-batches per optimizer step; the loss is normalised by the trained tokens of all of them.",
    )
    num_epochs: float = Field(1.0, gt=0, description="Passes over the training rows (fractions allowed).")
    max_steps: int | None = Field(None, ge=1, description="Overrides num_epochs when set.")
    gradient_checkpointing: bool = Field(False, description="Recompute each layer in backward to save memory.")
    offload_activations: bool = Field(
        False,
        description="With gradient_checkpointing on a GPU: keep the saved layer inputs in CPU memory (copied "
        "while the GPU computes) and run each layer's backward one batch row at a time; about 1 GiB less at 8k "
        "tokens a step, a few percent slower.",
    )
    fast_path: Literal["auto"] | bool = Field(
        "auto",
        description="FlexAttention block masks (SDPA's causal kernel for unpacked rows), compiled "
        "decoder layers and the fused loss; auto: on with a GPU. "
        "The maths is the plain path's.",
    )
    # precision and run
    bf16: Literal["auto"] | bool = Field(
        "auto", description="auto: bf16 autocast on a GPU that supports it, float32 on CPU."
    )
    seed: int = Field(42, description="Seeds LoRA init, dropout, the validation split and the row order.")
    output_dir: str = Field(
        "outputs/run",
        description="Where metrics, checkpoints, the adapter and the merged model go (`~` and $VARIABLES "
        "expanded): a new or empty directory, or a run of mistral-tune's to continue (resume) or replace "
        "(overwrite_output_dir).",
    )
    logging_steps: int = Field(
        1, ge=1, description="Write a metrics line every N optimizer steps: the token-weighted mean loss and the "
        "mean gradient norm of those steps.")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        ["tensorboard"],
        description="Experiment trackers that get the config, data report, every metrics line (held-out loss and "
        "evaluations, base and tuned, included) and the final and best weights, besides metrics.jsonl ([]: "
        "metrics.jsonl only). wandb and mlflow are extras: pip install 'mistral-tune[wandb]' / '[mlflow]'; "
        "WANDB_MODE=offline keeps the W&B run in output_dir/wandb. Names, run status and failures: see "
        "'Experiment trackers' below.",
    )
    wandb_project: str | None = Field(
        None, description="W&B project (report_to: wandb); default WANDB_PROJECT, else mistral-tune.")
    wandb_entity: str | None = Field(
        None, description="W&B entity (user or team) that owns the project; default WANDB_ENTITY, else your "
        "W&B default entity.")
    wandb_group: str | None = Field(
        None, description="W&B group the run joins (e.g. one sweep or experiment); default WANDB_RUN_GROUP.")
    wandb_tags: list[str] = Field(
        [], description="W&B tags of the run (1 to 64 characters each); default WANDB_TAGS (comma-separated).")
    mlflow_tracking_uri: str | None = Field(
        None,
        description="The MLflow store (report_to: mlflow), e.g. sqlite:///mlflow.db or http://host:5000; default "
        "MLFLOW_TRACKING_URI, else output_dir/mlflow.db (artifacts in output_dir/mlartifacts). A file store "
        "(file:./mlruns) needs MLFLOW_ALLOW_FILE_STORE=true with MLflow 3.",
    )
    mlflow_experiment_name: str | None = Field(
        None, description="The MLflow experiment the run goes to (created when missing); default "
        "MLFLOW_EXPERIMENT_NAME, else mistral-tune.")
    eval_steps: int | None = Field(
        None,
        ge=1,
        description="Evaluate the held-out set every this many steps and at the end. Unset: at each "
        "checkpoint and at the end. Pruning keeps the best of the checkpoints evaluated at their step.",
    )
    eval: EvalConfig = Field(
        default_factory=EvalConfig,
        description="Evaluations besides the held-out loss: task metrics, forgetting, long context (see below).",
    )
    save_steps: int | None = Field(
        None,
        ge=1,
        description="Write a checkpoint every this many optimizer steps; checkpoints are also written at "
        "each epoch end and at the last step.",
    )
    save_total_limit: int = Field(
        3,
        ge=1,
        description="Keep this many newest checkpoints, plus the one with the best held-out loss.",
    )
    overwrite_output_dir: bool = Field(
        False,
        description="Replace an output_dir that holds an earlier run of mistral-tune's (never another "
        "directory, nor one holding the run's inputs).",
    )
    resume: str | None = Field(
        None,
        description="auto: continue from the newest valid checkpoint in output_dir (start fresh if there "
        "is none); or the path of a checkpoint directory (or of a run's output_dir) to continue from.",
    )
    # reliability
    bad_step_zscore: float | None = Field(
        8.0,
        gt=0,
        description="Skip a step whose loss is more than this many robust standard deviations (median/MAD "
        "of recent good steps) above the median; null disables spike detection.",
    )
    bad_step_window: int = Field(32, ge=8, description="How many recent good losses the spike test looks at.")
    bad_step_rollback_after: int = Field(
        5,
        ge=1,
        description="After this many consecutive skipped steps, roll back to the last good checkpoint.",
    )
    bad_step_lr_factor: float = Field(
        0.5, gt=0, le=1, description="Multiply the learning rate by this at each rollback."
    )
    bad_step_max_rollbacks: int = Field(
        3, ge=0, description="Stop the run with a report when one more rollback would be needed."
    )
    auto_micro_batch: bool = Field(
        False,
        description="On GPU out-of-memory, halve micro_batch_size and double gradient_accumulation_steps "
        "(same effective batch) and retry, until it fits or micro_batch_size is 1.",
    )
    # several processes (torchrun, --gpus; docs/distributed.md)
    distributed: Literal["auto", "ddp", "fsdp"] = Field(
        "auto",
        description="With several processes: ddp replicates the model and sums gradients once per step; "
        "fsdp shards weights, gradients and optimizer state (FSDP2; full fine-tuning only); auto: fsdp for "
        "adapter: none, ddp for adapters.",
    )
    fsdp_reshard_after_forward: Literal["auto"] | bool = Field(
        "auto",
        description="fsdp: free each decoder layer's gathered weights after its forward and gather them again "
        "for its backward (true), or keep them until the backward (false: one all-gather less per layer, the "
        "whole model's compute-dtype weights held during the step); auto: keep them when those weights take at "
        "most a quarter of the GPU's memory (always true on CPU processes, which share the host's memory).",
    )
    overlap_gradient_sync: bool = Field(
        True,
        description="ddp with gradient_aggregation: mean: send each bucket of gradients while the step's last "
        "backward pass still runs, rather than all after it (false: after it; the same sums, bit for bit).",
    )
    gradient_aggregation: Literal["mean", "median", "trimmed_mean", "centered_clip"] = Field(
        "mean",
        description="How the processes' adapter gradients combine: mean (all-reduce), or a robust rule that "
        "a process sending corrupt gradients cannot steer (median, trimmed_mean, centered_clip).",
    )
    byzantine_tolerance: int = Field(
        1, ge=0, description="Faulty processes a robust gradient_aggregation must withstand; needs 2f + 1 processes."
    )
    distributed_timeout: float = Field(
        1800, gt=0, description="Seconds a process waits for the others at a collective before it gives up."
    )

    _from_preset: dict[str, Any] = PrivateAttr(default_factory=dict)  # the keys the preset filled

    def preset_lines(self) -> list[str]:
        """What the preset set and which of its keys the config's own values replaced (validate prints it)."""
        if self.preset is None:
            return []
        kept = sorted(set(PRESETS[self.preset][1]) - set(self._from_preset))
        filled = ", ".join(f"{k}={v}" for k, v in self._from_preset.items()) or "nothing"
        return [f"preset {self.preset} set: {filled}" + (f" (your own: {', '.join(kept)})" if kept else "")]

    @field_validator("output_dir")
    @classmethod
    def _expand_output_dir(cls, value: str) -> str:
        try:
            return str(expand_path(value))  # `~` and $VARS, as a shell would (not a literal ./~ directory)
        except OutputError as exc:
            raise ValueError(f"output_dir: {exc}") from None

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("set warmup_steps or warmup_ratio, not both")
        allowed = ALL_PROJECTIONS + [k for k in EXPERT_TARGETS if k not in ALL_PROJECTIONS]
        unknown = sorted(set(self.lora_target_modules) - set(allowed))
        if unknown:
            raise ValueError(f"lora_target_modules: unknown module(s) {unknown}; allowed: {allowed}")
        if self.resume is not None and self.overwrite_output_dir:
            raise ValueError("set resume or overwrite_output_dir, not both (overwriting would delete the checkpoints)")
        if not self.lora_target_modules and self.adapter in ("lora", "qlora"):
            raise ValueError("lora_target_modules: empty; name at least one projection")
        if self.adapter == "none":
            lora_only = [k for k in ("use_dora", "loraplus_lr_ratio", "lora_modules_to_save") if getattr(self, k)]
            if lora_only:
                raise ValueError(f"{', '.join(lora_only)}: for adapter lora or qlora; with adapter: none every "
                                 "weight trains at learning_rate")
        if self.lora_init != "kaiming" and (self.adapter != "lora" or self.base_precision != "bf16"):
            raise ValueError(f"lora_init: {self.lora_init} needs adapter: lora with base_precision: bf16 (it takes "
                             "the initial adapter out of the base weights; an NF4 or FP8 base would have to be "
                             f"quantized again), not adapter: {self.adapter}, base_precision: {self.base_precision}")
        if self.init_from is not None and (self.adapter == "none" or self.lora_init != "kaiming"):
            raise ValueError("init_from: starts a LoRA adapter from an earlier run's; it needs adapter: lora or qlora "
                             "and lora_init: kaiming (for full fine-tuning set base_model to the earlier run's "
                             "model/ or merged/ directory)")
        if self.base_precision == "fp8" and self.adapter != "lora":
            raise ValueError(f"base_precision: fp8 is for adapter: lora (a frozen base), not adapter: {self.adapter}")
        names = self.new_special_tokens
        if len(set(names)) != len(names) or not all(n.strip() == n and n for n in names):
            raise ValueError(f"new_special_tokens: {names}: expected distinct names without surrounding spaces")
        if len(set(self.report_to)) != len(self.report_to):
            raise ValueError(f"report_to: {self.report_to} names a tracker twice")
        if self.val_datasets and self.val_set_size:
            raise ValueError("set val_set_size or val_datasets, not both")
        self._check_method()
        return self

    def _check_method(self) -> None:
        given = _changed(self.preference)
        if self.eval.metric.startswith("preference.") and (self.method == "sft" or not (self.val_set_size
                                                                                        or self.val_datasets)):
            raise ValueError(f"eval.metric: {self.eval.metric} is measured on a preference method's held-out pairs; "
                             + ("method is sft" if self.method == "sft" else "give val_set_size or val_datasets"))
        if _changed(self.grpo) and self.method != "grpo":
            raise ValueError(f"grpo: {', '.join(sorted(_changed(self.grpo)))} set, but method is {self.method}")
        if self.method == "grpo":
            self._check_grpo(given)
            return
        if self.method == "sft":
            if given:
                raise ValueError(f"preference: {', '.join(sorted(given))} set, but method is sft; set method: dpo, "
                                 "ipo, orpo, simpo or kto")
            return
        foreign = sorted(given - METHOD_KEYS[self.method] - {"beta"})
        if foreign:
            users = {k: [m for m, keys in METHOD_KEYS.items() if k in keys] for k in foreign}
            raise ValueError("; ".join(f"preference.{k}: for method {' or '.join(users[k])}, not {self.method}"
                                       for k in foreign))
        if self.on_too_long == "truncate":
            raise ValueError(f"on_too_long: truncate is for sft; method {self.method} drops answers longer than "
                             "sequence_len (on_too_long: drop)")

    def _check_grpo(self, preference_keys: set) -> None:
        if preference_keys:
            raise ValueError(f"preference: {', '.join(sorted(preference_keys))} set, but method grpo reads the grpo "
                             "section")
        if not self.grpo.rewards:
            raise ValueError("grpo.rewards: empty; name at least one reward function ({name: exact_match} ...)")
        if self.grpo.beta and self.adapter == "none":
            raise ValueError("grpo.beta > 0 needs adapter: lora or qlora (the reference is the base with the adapter "
                             "off); with adapter: none set grpo.beta: 0")
        labels = [r.label for r in self.grpo.rewards]
        if len(set(labels)) != len(labels):
            raise ValueError(f"grpo.rewards: {labels} names a reward twice; each is logged under its own name")

    @property
    def beta(self) -> float:
        """The preference method's beta: the preference section's, or the method's default."""
        return self.preference.beta if self.preference.beta is not None else DEFAULT_BETA[self.method]


def _changed(section: BaseModel) -> set[str]:
    """The keys of a method's section set to other than their defaults (a run's own config.yaml holds
    every key, at its default when the method did not use it)."""
    fields = type(section).model_fields
    return {k for k in section.model_fields_set
            if getattr(section, k) != fields[k].get_default(call_default_factory=True)}


def _describe_allowed(field_path: tuple, err: dict) -> str:
    ctx = err.get("ctx") or {}
    if "expected" in ctx:
        return f"allowed: {ctx['expected']}"
    for bound, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if bound in ctx:
            return f"allowed: {word} {ctx[bound]}"
    return err["msg"].lower()


def _model_in(annotation) -> type[BaseModel] | None:
    """The config model inside an annotation (X, X | None, list[X]), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _owner(loc: tuple) -> type[BaseModel]:
    """The config model that holds the key at `loc` (for the nearest-key hint)."""
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        inner = _model_in(field.annotation) if field is not None else None
        if inner is not None:
            model = inner
        elif field is not None:
            break
    return model


def _nearest_key(key: str, model: type[BaseModel]) -> str:
    if model in (Config, DatasetConfig):  # Axolotl's names get the counterpart, not a look-alike of ours
        hint = axolotl_hint(key, in_dataset=model is DatasetConfig)
        if hint:
            return f"; {hint}"
    close = difflib.get_close_matches(key, list(model.model_fields), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _format_error(exc: ValidationError, source: str) -> str:
    lines = []
    unions: dict[str, tuple[int, list[str]]] = {}  # field -> (its line, what each member allows)
    for err in exc.errors():
        loc = err["loc"]
        key = ".".join(str(p) for p in loc) or "(top level)"
        nested = ("datasets", "val_datasets", "cleaning", "eval", "preference")  # models of their own, not unions
        if len(loc) == 2 and loc[0] in Config.model_fields and loc[0] not in nested and isinstance(loc[1], str):
            # A value that fits no member of a union (bf16: 'auto' | bool) gives one error per member,
            # located at `field.<member>`; report the field once, listing what each member allows.
            field_name = str(loc[0])
            if field_name not in unions:
                unions[field_name] = (len(lines), [])
                lines.append(f"{source}: key '{field_name}' has value {err.get('input')!r}; allowed: ")
            unions[field_name][1].append(str((err.get("ctx") or {}).get("expected", loc[1])))
        elif err["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}'{_nearest_key(str(loc[-1]), _owner(loc))}")
        elif err["type"] == "missing":
            lines.append(f"{source}: missing required key '{key}'")
        elif err["type"] == "value_error":
            lines.append(f"{source}: {err['msg'].removeprefix('Value error, ')}")
        else:
            value = err.get("input")
            hint = axolotl_value_hint(key, value)
            lines.append(f"{source}: key '{key}' has value {value!r}; {_describe_allowed(loc, err)}"
                         + (f" ({hint})" if hint else ""))
    for i, allowed in unions.values():
        lines[i] += " or ".join(allowed)
    if sum("Axolotl's key" in line for line in lines) >= 2:
        lines.append(f"{source}: this looks like an Axolotl config; {CONVERT_COMMAND.replace('FILE', source)} "
                     "converts it")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a","b"], parsed value); the value is read as YAML (numbers, bools, null)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not key=value")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _takes_text_only(path: list[str]) -> bool:
    """Whether the key at `path` holds text and nothing else YAML could read a value as (a number, a
    bool): such an override keeps the text as typed."""
    annotation: Any = Config
    for part in path:
        kinds = _kinds(annotation) - {type(None)}
        annotation = kinds.pop() if len(kinds) == 1 else annotation  # `X | None`: X
        if typing.get_origin(annotation) is list and part.isdigit():
            annotation = typing.get_args(annotation)[0]
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel) and part in annotation.model_fields:
            annotation = annotation.model_fields[part].annotation
        else:
            return False
    kinds = _kinds(annotation)
    return str in kinds and not kinds & {int, float, bool}


def _kinds(annotation: Any) -> set:
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return set(typing.get_args(annotation)) if union else {annotation}


def _apply_override(data: dict, path: list[str], value: Any) -> None:
    node: Any = data
    for part in path[:-1]:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise ConfigError(f"override '{'.'.join(path)}': cannot descend into '{part}'")
    last = path[-1]
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"override '{'.'.join(path)}': cannot set '{last}'")


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Set the `key=value` (or `section.key=value`) overrides in a config's dict of keys, in place."""
    for text in overrides:
        keys, value = parse_override(text)
        if not isinstance(value, str) and value is not None and _takes_text_only(keys):
            value = text.split("=", 1)[1]  # output_dir=2024 names a folder, not a number
        _apply_override(data, keys, value)
    return data


def config_from_dict(data: dict, source: str = "config") -> Config:
    filled = preset_keys(data, source)
    try:
        cfg = Config.model_validate({**filled, **data})
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from None
    cfg._from_preset = filled
    return cfg


def preset_keys(data: dict, source: str = "config") -> dict[str, Any]:
    """The keys a config's preset fills: the preset's keys that the config does not set itself."""
    name = data.get("preset")
    if name is None:
        return {}
    if name not in PRESETS:
        raise ConfigError(f"{source}: key 'preset' has value {name!r}; known presets: {', '.join(PRESETS)}")
    return {k: v for k, v in PRESETS[name][1].items() if k not in data}


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply `key=value` overrides, validate.

    Relative dataset and model paths are resolved against the config file's folder when they
    exist there, so a config can be run from any working directory.
    """
    path = Path(path)
    data = read_yaml(path)
    apply_overrides(data, overrides)
    base = path.resolve().parent
    entries = [ds for key in ("datasets", "val_datasets") if isinstance(data.get(key), list) for ds in data[key]]
    entries += _eval_datasets(data.get("eval"))
    for ds in entries:
        if isinstance(ds, dict) and isinstance(ds.get("path"), str):
            ds["path"] = _resolve_near(ds["path"], base)
    for key in ("base_model", "tokenizer", "init_from"):
        if isinstance(data.get(key), str):
            data[key] = _resolve_near(data[key], base)
    tasks = data.get("eval", {}).get("tasks") if isinstance(data.get("eval"), dict) else None
    if isinstance(tasks, dict) and isinstance(tasks.get("json_schema"), str):
        tasks["json_schema"] = _resolve_near(tasks["json_schema"], base)
    return config_from_dict(data, str(path))


class _Loader(yaml.SafeLoader):
    """YAML's safe loader that refuses a key given twice in one mapping (YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line)
            except TypeError:  # a list or mapping as a key: construct_mapping says so below
                continue
            if first != key_node.start_mark.line:
                mark = key_node.start_mark
                raise ConfigError(f"{self.name}, line {mark.line + 1}, column {mark.column + 1}: key '{key}' is "
                                  f"given twice (first on line {first + 1}); keep one")
        return super().construct_mapping(node, deep)


# What YAML's parser says, in plain words; `opened`: the message points at where the thing began.
_YAML_PROBLEMS = (
    ("character '\\t'", False, "a tab character; YAML indents with spaces only"),
    ("cannot start any token", False, "a value cannot begin with this character; put the value in quotes"),
    ("mapping values are not allowed here", False, "an unexpected ':' (this line is indented deeper than the key "
     "above it, or a value holds ': ' and needs quotes)"),
    ("could not find expected ':'", True, "a line without ':' after its key"),
    ("expected ',' or ']'", True, "a list opened here with '[' is not closed with ']'"),
    ("expected ',' or '}'", True, "a mapping opened here with '{' is not closed with '}'"),
    ("unexpected end of stream", True, "a quote opened here is never closed"),
    ("undefined alias", False, "'*NAME' refers to an anchor '&NAME' that is not defined"),
    ("unhashable key", False, "a key that is a list or a mapping; keys are plain names"),
    ("expected <block end>", False, "the indentation does not line up with the lines above (the keys of one "
     "mapping start in the same column; list items start with '- ')"),
)


def read_yaml(path: str | Path) -> dict:
    """A config file's top-level mapping; a ConfigError names the file, line and column of any problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text file in UTF-8 (byte {exc.start})") from None
    loader = _Loader(text)
    loader.name = str(path)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_problem(path, exc)) from None
    finally:
        loader.dispose()
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, not {type(data).__name__}")
    return data


def _yaml_problem(path: Path, exc: yaml.YAMLError) -> str:
    problem = str(getattr(exc, "problem", "") or "")
    mark = getattr(exc, "problem_mark", None)
    plain = "YAML cannot read the text here (check the indentation, the quotes and the brackets)"
    for needle, opened, words in _YAML_PROBLEMS:
        if needle in problem:
            plain = words
            if opened and getattr(exc, "context_mark", None) is not None:
                mark = exc.context_mark
            break
    where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{path}{where}: not valid YAML: {plain}"


_CONVERTED = "# mistral-tune config converted from the Axolotl config"


def convert_axolotl(data: dict, source: str = "config") -> Translation:
    """An Axolotl config (parsed YAML) translated into our keys, in our schema's order, and validated as
    `load_config` validates (the schema: no model or data is read); ConfigError otherwise."""
    result = translate(data, source)
    order = list(Config.model_fields)
    result.config = dict(sorted(result.config.items(),
                                key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    try:
        config_from_dict(copy.deepcopy(result.config), f"{source} (converted)")
    except ConfigError as exc:
        raise ConfigError(f"{exc}\n{source}: the converted config does not pass validation") from None
    return result


def convert_axolotl_file(source: str | Path, out: str | Path, overwrite: bool = False) -> Translation:
    """Translate an Axolotl config file into a mistral-tune config at `out`, checked by our own validation
    (the schema: no model or data is read) and written whole or not at all; the notes go in as comments."""
    source, out = Path(source), Path(out)
    data = read_yaml(source)
    if out.exists() and out.resolve() == source.resolve():
        raise ConfigError(f"--out {out}: that is the Axolotl config itself; give a new file")
    if out.exists() and not overwrite:
        raise ConfigError(f"--out {out}: exists; pass --overwrite to replace it")
    if out.exists() and not (out.is_file() and out.read_bytes().startswith(_CONVERTED.encode())):
        raise ConfigError(f"--out {out}: not a config that mistral-tune converted, so it is not replaced")
    result = convert_axolotl(data, str(source))
    header = [f"{_CONVERTED} {source}", "#", "# Axolotl keys without a "
              "direct counterpart:"] + [f"#   {note}" for note in result.notes]
    text = "\n".join(header) + "\n\n" + yaml.safe_dump(result.config, sort_keys=False, allow_unicode=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, text)
    return result


def _eval_datasets(section) -> list:
    """The dataset entries inside an eval: section (their paths are resolved like the training data's)."""
    if not isinstance(section, dict):
        return []
    found = []
    for name, key in (("tasks", "dataset"), ("forgetting", "dataset"), ("needle", "documents")):
        sub = section.get(name)
        if isinstance(sub, dict) and isinstance(sub.get(key), dict):
            found.append(sub[key])
    return found


def _resolve_near(value: str, base: Path) -> str:
    """A relative path that exists next to the config wins; otherwise it is left as written
    (relative to the working directory, or a hub id / bundled tokenizer name)."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    if any(ch in value for ch in "*?["):  # a glob: resolve it where it matches something
        import glob

        return str(base / p) if not glob.glob(value) and glob.glob(str(base / p)) else value
    candidate = base / p
    return str(candidate) if candidate.exists() else value
