"""`mistral-tune plan`: a run's peak GPU memory, tokens/s and wall time, predicted before any weight
is loaded (config.json, the tokenizer and the data's token counts only), and settings that fit.

The model follows how training allocates (train/loop.py, models/, kernels/):
- weights: bf16 base under LoRA; NF4 (4 bits + double-quantized block scales, bitsandbytes'
  blocksize 64 over 256-block groups) for QLoRA's target projections (Mixtral's targeted stacked
  expert weights one matrix per expert), plus a few bf16 copies of a matrix dequantized at a time;
  float32 for full fine-tuning (adapter: none), with its bf16 autocast copies. Trained parameters
  are float32 with float32 gradients and two AdamW states: float32, or (optimizer: adamw_8bit) a
  byte each with a float32 scale per block of 256.
- activations, per token per layer, counted from the decoder layer's saved tensors: the two norm
  inputs and outputs (4 x hidden), q and the attention output (2 x heads x head_dim), k and v
  (2 x KV heads x head_dim), and gate, up and their product (3 x MLP width; top-k experts for MoE).
  Without checkpointing every layer keeps them; with it a layer keeps its input (or, offloaded,
  nothing on the GPU) and the backward of one layer (one row at a time when offloaded) holds
  BACKWARD_PEAK_ATTN and BACKWARD_PEAK_MLP layers' worth of its attention and MLP parts, the MLP's
  for at most MLP_CHUNK_TOKENS tokens (a dense MLP's re-run and backward go chunk by chunk). The
  fused loss holds one chunk of logits (kernels/loss.py chunk_bytes: 2,048 x 32,768 logits whatever
  the vocabulary, 6 bytes each with a bf16 product: the float32 logits and the product), measured
  exact on the CPU allocator (tests/test_kernels.py).
- time: matrix FLOPs per token (4N with a frozen base, 6N full; + the re-run's forward less the down
  projection, which the re-run skips, when checkpointed), LoRA's 6 x its parameters, lm_head on
  trained tokens only, attention 4 x heads x head_dim per (query, key) pair a layer, x3 for forward +
  backward (x4 with the re-run); divided by the GPU's bf16 peak x MFU. QLoRA adds the dequantization,
  a memory-bound pass over its NF4 weights per micro-batch; an FP8 base's products run FP8_SPEEDUP
  faster. Full fine-tuning has an MFU of its own (MFU_FULL, fitted on a one-GPU full step; higher
  than LoRA's).
- several GPUs (`--gpus N`, one process each, as train/runtime.py runs them): ddp keeps one process's
  memory (robust aggregation adds every rank's gathered, sorted adapter gradients after the backward)
  and runs at one GPU's speed times the efficiency measured on two; fsdp shards the float32 weights,
  gradients and AdamW state N ways, gathers two decoder layers (every one, held all step, when
  fsdp_reshard_after_forward keeps them gathered, as runtime.resolve_reshard decides for the GPU) and
  the embeddings and head in bf16, holds one layer's whole gradient in the backward and peaks at the
  optimizer step; its forward and backward run at one GPU's speed times the efficiency measured on two
  (resharded or kept gathered), its AdamW step on 1/N.

Calibration constants are few and named below; docs/benchmarks.md says which recorded runs fitted
which and gives predicted against measured for every recorded configuration.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import numpy as np

from .errors import ConfigError
from .kernels.loss import chunk_bytes
from .models.families import EXPERT_TARGETS, MISTRAL
from .models.mistral import MLP_CHUNK_TOKENS
from .models.quant import BLOCKSIZE as NF4_BLOCK
from .train.gpus import GPU

GIB = 1024**3

# --- calibration (fitted on bench/results/2026-11-23-h100-main.json; docs/benchmarks.md) -------------
MFU = 0.50  # counted FLOPs / (bf16 peak x time), fast path: fit on ours_fast and ours_lean
NF4_DEQUANT_PASSES = 4.8  # memory-bound passes over QLoRA's weights per micro-batch: ours_qlora - ours_lean
# Layers' worth of activations alive in one layer's checkpointed backward, its attention part and its MLP's:
# fitted together on ours_lean(_batched) and ours_qlora at 4096 x 2 and rows of 16k-256k tokens (H200).
BACKWARD_PEAK_ATTN = 1.56
BACKWARD_PEAK_MLP = 1.2
BATCH_HIDDEN_COPIES = 5.0  # hidden-size vectors per token held for the whole step: ours_lean vs _batched
QLORA_DEQUANT_BUFFERS = 3  # bf16 copies of the largest NF4 projection alive at once: ours_qlora
# --- fitted and measured on bench/results/2026-11-30-h200x2-distributed.json (two H200s; docs/benchmarks.md) --
MFU_FULL = 0.59  # the same for full fine-tuning, forward + backward: full_1gpu_compute
# ddp: tokens/s per GPU on 2 GPUs against one GPU, measured by gradient_aggregation (lora_2gpu*; trimmed_mean
# sorts as median does and takes its figure); assumed to hold on more GPUs.
DDP_EFFICIENCY = {"mean": 0.980, "median": 0.951, "trimmed_mean": 0.951, "centered_clip": 0.945}
# fsdp: the one-GPU forward + backward time / FSDP2's (full_1gpu_compute / fsdp_2gpu: the all-gathers and
# reduce-scatters the step waits for), by whether the decoder layers are resharded after their forward
# (fsdp_reshard_after_forward; kept gathered: 2026-11-30-h200x2-distributed-2.json, one all-gather less a
# layer); assumed to hold on more GPUs.
FSDP_EFFICIENCY = {True: 0.856, False: 0.901}
# fsdp: bytes per parameter per GPU beyond the sharded state alive during the optimizer step, where the
# peak is (fsdp_2gpu: 27.7 GiB above the 54 GiB of state, as much as two float32 shards; what holds them is
# not identified; assumed to shard with the state on more GPUs).
FSDP_STEP_BYTES = 8
# --- fitted on bench/results/2026-11-30-h200-fp8.json (one H200) ---------------------------------------
# base_precision: fp8: how much faster the FP8 projections' products run than bf16's, their quantization
# included: fitted on the compiled LoRA step's 1.22x (2 layers of 7B shapes, no checkpointing)
FP8_SPEEDUP = 1.35
# --- read off the code, not fitted --------------------------------------------------------------------
FSDP_GATHERED_LAYERS = 2  # bf16 decoder layers gathered at once: the running one and the next (prefetched)
ROBUST_BYTES = 20  # per rank per trained parameter, robust aggregation: the gathered float32 gradients, the
#                    finite rows' copy, the sort's values and int64 indices (runtime.aggregate)
# --- assumed, not fitted (max_memory_allocated, which the records give, counts neither) ----------------
CUDA_CONTEXT_GIB = 0.75  # CUDA context and kernels
ALLOCATOR_SLACK = 0.05  # the caching allocator's fragmentation, as a share of the peak

# AdamW's two moments per trained parameter: float32, or bitsandbytes' 8 bits with a float32 scale per
# block of 256 values (float32 for the input embedding, and for tensors under 4,096 values: norms, which
# this ignores; train/optim.py make_optimizer)
STATE_BYTES = {"adamw": 8, "adamw_8bit": 2 * (1 + 4 / 256)}
# Bytes the optimizer step reads and writes per trained parameter: the weight and gradient read, the
# weight written (12), the moments read and written. Fitted for fused AdamW (28) only.
STEP_TRAFFIC = 12








@dataclass(frozen=True)
class Setup:
    """What decides memory and time, as the trainer turns it on from the config."""

    adapter: str = "lora"  # lora | qlora | none
    lora_r: int = 16
    targets: tuple[str, ...] = MISTRAL.projections  # every projection of a dense model
    whole_modules: int = 0  # lora_modules_to_save trained in full (embed_tokens, lm_head)
    checkpointing: bool = False
    offload: bool = False
    by_row: bool = False  # the trainer sets it with offload_activations
    fast: bool = True
    bf16: bool = True
    fp8: bool = False  # base_precision: fp8 (the dense projections held in e4m3 with a float32 scale a row)
    optimizer: str = "adamw"  # adamw | adamw_8bit: the bytes of its states (STATE_BYTES)
    micro_batch_size: int = 1
    accumulation: int = 1
    gpus: int = 1  # processes, one a GPU
    strategy: str = "ddp"  # with several: ddp (replicated) or fsdp (sharded), as runtime.resolve_strategy says
    aggregation: str = "mean"  # gradient_aggregation (ddp)
    reshard: str | bool = "auto"  # fsdp_reshard_after_forward, resolved by runtime.resolve_reshard (resharded)

    @property
    def sharded(self) -> bool:
        return self.gpus > 1 and self.strategy == "fsdp"

    def label(self) -> str:
        mode = (("gradient_checkpointing + offload_activations" if self.offload else "gradient_checkpointing")
                if self.checkpointing else "no checkpointing")
        gpus = ""
        if self.gpus > 1:
            how = self.strategy + (f", {self.aggregation}" if self.aggregation != "mean" else "")
            gpus = f" on {self.gpus} GPUs ({how})"
        optimizer = "" if self.optimizer == "adamw" else f", optimizer {self.optimizer}"
        return (f"{self.adapter}, {mode}{optimizer}, micro_batch_size {self.micro_batch_size} x {self.accumulation} "
                f"accumulation{gpus}")


@dataclass
class MicroBatch:
    rows: int  # rows in the tensor (a short batch is filled with padding rows on the fast path)
    length: int  # padded row length
    real: int  # real tokens
    trained: int  # tokens that reach lm_head
    pairs: float  # attended (query, key) pairs per layer, summed over rows


@dataclass
class Prediction:
    setup: Setup
    weights_gib: float
    trained_gib: float  # trained parameters with their gradients and optimizer states
    activations_gib: float
    peak_gib: float  # as torch.cuda.max_memory_allocated counts it, on each GPU
    tokens_per_s: float | None  # real tokens, on each GPU; None when not predicted (float32)
    step_s: float | None
    trained_params: int

    @property
    def device_gib(self) -> float:
        """What the GPU must hold: the peak, the allocator's slack and the CUDA context."""
        return self.peak_gib * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT_GIB

    @property
    def all_tokens_per_s(self) -> float:
        """Real tokens a second over all the GPUs."""
        return (self.tokens_per_s or 0.0) * self.setup.gpus


def _sizes(m) -> dict:
    """Parameter counts of one layer's parts and of the whole model (models/mistral.py's shapes)."""
    d, hd, i = m.hidden_size, m.head_dim, m.intermediate_size
    experts = m.num_local_experts if m.moe else 1
    proj = {"q_proj": (d, m.num_attention_heads * hd), "k_proj": (d, m.num_key_value_heads * hd),
            "v_proj": (d, m.num_key_value_heads * hd), "o_proj": (m.num_attention_heads * hd, d),
            "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}
    mlp = MISTRAL.feed_forward
    per = {k: a * b * (experts if k in mlp else 1) for k, (a, b) in proj.items()}
    router = d * experts if m.moe else 0
    layer = sum(per.values()) + router + 2 * d
    embed = m.vocab_size * d
    total = m.num_hidden_layers * layer + embed * (1 if m.tie_word_embeddings else 2) + d
    return dict(proj=proj, per=per, layer=layer, embed=embed, total=total, mlp=mlp)


def trained_params(m, s: Setup) -> int:
    sz = _sizes(m)
    if s.adapter == "none":
        return sz["total"]
    # Mixtral: the feed-forward names adapt the stacked expert weights, one low-rank pair per expert
    # (models/lora.py ExpertLora); gate_proj and up_proj name nothing there.
    stacked = {"gate_up_proj": (m.hidden_size, 2 * m.intermediate_size),
               "down_proj": (m.intermediate_size, m.hidden_size)}
    expert_params = {p for k in s.targets if m.moe and k in EXPERT_TARGETS for p in EXPERT_TARGETS[k]}
    lora = sum(s.lora_r * sum(sz["proj"][k]) for k in s.targets
               if not (m.moe and (k in sz["mlp"] or k in EXPERT_TARGETS)))
    lora += sum(m.num_local_experts * s.lora_r * sum(stacked[p]) for p in expert_params)
    return m.num_hidden_layers * lora + s.whole_modules * sz["embed"]


def nf4_matrices(m, targets) -> dict[int, int]:
    """The matrices QLoRA quantizes for these target names (models/quant.py): {weights in one: how many}.
    A dense model's named projections are a matrix a layer; on Mixtral the attention's are, and an expert
    target names a stacked expert weight, quantized one matrix per expert (its feed-forward has no
    gate_proj or up_proj)."""
    sz, out = _sizes(m), {}
    names = [k for k in targets if k in sz["proj"] and not (m.moe and k in sz["mlp"])]
    sizes = [sz["proj"][k][0] * sz["proj"][k][1] for k in names]
    counts = [m.num_hidden_layers] * len(names)
    if m.moe:
        stacked = {"gate_up_proj": 2 * m.hidden_size * m.intermediate_size,
                   "down_proj": m.hidden_size * m.intermediate_size}
        for p in sorted({p for k in targets for p in EXPERT_TARGETS.get(k, ())}):
            sizes.append(stacked[p])
            counts.append(m.num_hidden_layers * m.num_local_experts)
    for n, c in zip(sizes, counts):
        out[n] = out.get(n, 0) + c
    return out


def nf4_bytes(n: int) -> int:
    """What bitsandbytes keeps for one NF4 matrix of n weights: the 4-bit codes, a uint8 scale per block
    of 64, a float32 per 256 of those scales, their 256-entry float32 code book and a float32 offset."""
    blocks = -(-n // NF4_BLOCK)
    return -(-n // 2) + blocks + 4 * -(-blocks // 256) + 4 * 256 + 4


def _fp8_projections(m, s: Setup) -> list[str]:
    """base_precision: fp8 holds every projection that is a plain linear layer (all seven; Mixtral's
    experts stay bf16)."""
    return [k for k in _sizes(m)["proj"] if s.fp8 and not (m.moe and k in _sizes(m)["mlp"])]


def base_bytes(m, s: Setup, act: int = 2) -> float:
    """The frozen base under LoRA or QLoRA as the loader holds it: `act`-byte weights (bf16), NF4 for
    QLoRA's targets, one byte a weight and a float32 scale a row for the FP8 projections."""
    sz, L = _sizes(m), m.num_hidden_layers
    quantized = nf4_matrices(m, s.targets) if s.adapter == "qlora" else {}
    fp8 = _fp8_projections(m, s)
    codes = L * sum(sz["per"][k] for k in fp8)
    plain = sz["total"] - sum(n * c for n, c in quantized.items()) - codes
    return (act * plain + sum(nf4_bytes(n) * c for n, c in quantized.items()) + codes
            + 4 * L * sum(sz["proj"][k][1] for k in fp8))


def resharded(m, s: Setup, gpu: GPU | None) -> tuple[bool, str]:
    """Whether fsdp reshards each decoder layer after its forward on this GPU, as the trainer decides
    (runtime.resolve_reshard on the whole model's bf16 weights), and why."""
    from .train.runtime import resolve_reshard

    return resolve_reshard(s.reshard, 2 * _sizes(m)["total"], round(gpu.memory_gib * GIB) if gpu else None)


def predict(m, s: Setup, batches: list[MicroBatch], gpu: GPU | None) -> Prediction:
    """Peak memory and speed of training model shape `m` as `s` says on these micro-batches."""
    sz, L, d = _sizes(m), m.num_hidden_layers, m.hidden_size
    act = 2 if s.bf16 else 4  # bytes of an activation
    n_train = trained_params(m, s)
    active_mlp = m.num_experts_per_tok if m.moe else 1
    transient = 0.0  # held in one layer's backward besides the activations
    reshard = resharded(m, s, gpu)[0] if s.sharded else True
    all_layers = 0 if reshard else 2 * L * sz["layer"]  # every decoder layer's bf16 weights, gathered until backward
    if s.sharded:  # FSDP2 (runtime.shard): each GPU holds 1/N of the float32 weights, gradients and AdamW states
        shard = sz["total"] / s.gpus
        root = sz["total"] - L * sz["layer"]  # embeddings, final norm and head: gathered from forward to backward
        gathered = FSDP_GATHERED_LAYERS * sz["layer"] if reshard else 0
        weights = 4 * shard + 2 * (gathered + root) + all_layers  # + the gathered bf16 copies
        trained = (4 + STATE_BYTES[s.optimizer]) * shard  # gradients and states (train refuses adamw_8bit)
        transient = (2 + 4) * sz["layer"]  # a layer's whole gradient: bf16, then float32 for the reduce-scatter
    elif s.adapter == "none":
        weights = 4 * sz["total"] + (2 * L * sz["layer"] if s.bf16 else 0)  # float32 + autocast's bf16 copies
        trained = (4 + STATE_BYTES[s.optimizer]) * n_train  # gradients and states; the weights are counted above
        trained += (STATE_BYTES["adamw"] - STATE_BYTES[s.optimizer]) * sz["embed"]  # its moments: float32
    else:
        weights = base_bytes(m, s, act)
        quantized = nf4_matrices(m, s.targets)
        if s.adapter == "qlora" and quantized:
            weights += QLORA_DEQUANT_BUFFERS * 2 * max(quantized)
        trained = (8 + STATE_BYTES[s.optimizer]) * n_train  # float32 weights and gradients, and the states
    attn_layer = act * (4 * d + 2 * m.num_attention_heads * m.head_dim + 2 * m.num_key_value_heads * m.head_dim)
    mlp_layer = act * 3 * m.intermediate_size * active_mlp
    whole = BATCH_HIDDEN_COPIES * act * d
    peak_act = 0.0
    for b in batches:
        tokens = b.rows * b.length
        unit = b.length if s.by_row else tokens  # tokens whose layer backward runs at once
        loss = chunk_bytes(b.trained, m.vocab_size, product_bytes=act) if s.fast else 8 * m.vocab_size * b.trained
        if not s.checkpointing:
            need = tokens * (L * (attn_layer + mlp_layer) + whole) + loss
        else:
            kept = 0 if s.offload else tokens * L * act * d
            # A dense MLP's re-run and backward go MLP_CHUNK_TOKENS tokens at a time (models/mistral.py).
            mlp_tokens = unit if m.moe else min(unit, MLP_CHUNK_TOKENS)
            layer = BACKWARD_PEAK_ATTN * unit * attn_layer + BACKWARD_PEAK_MLP * mlp_tokens * mlp_layer
            need = kept + tokens * whole + max(layer, loss)
        peak_act = max(peak_act, need)
    peak = weights + trained + peak_act + transient
    if s.sharded:  # the optimizer step: the sharded state and what the step holds besides
        # (layers kept gathered from forward to backward are resharded after their backward: not held here)
        peak = max(peak, (8 + STATE_BYTES[s.optimizer] + FSDP_STEP_BYTES) * sz["total"] / s.gpus)
    elif s.gpus > 1 and s.aggregation != "mean":  # after the backward: every rank's gradient, gathered and sorted
        peak = max(peak, weights + trained + (ROBUST_BYTES * s.gpus + 4) * n_train)

    tokens_per_s = step_s = None
    if gpu is not None and s.bf16:
        experts = m.num_local_experts if m.moe else 1
        attn = sum(v for k, v in sz["per"].items() if k not in sz["mlp"])
        lin = L * (attn + sum(sz["per"][k] for k in sz["mlp"]) * active_mlp / experts)  # matrices a token meets
        down = L * sz["per"]["down_proj"] * active_mlp / experts  # the checkpointed re-run skips it
        base = (6 if s.adapter == "none" else 4) * lin + (2 * lin - 2 * down if s.checkpointing else 0)
        fp8_share = L * sum(sz["per"][k] for k in _fp8_projections(m, s)) / lin  # of the base's products
        base *= 1 - fp8_share * (1 - 1 / FP8_SPEEDUP)
        head = (6 if s.adapter == "none" or s.whole_modules else 4) * sz["embed"]
        lora = 0 if s.adapter == "none" else 6 * (n_train - s.whole_modules * sz["embed"])
        attn_pair = 4 * m.num_attention_heads * m.head_dim * L * (4 if s.checkpointing else 3)
        rate = gpu.bf16_tflops * 1e12 * (MFU_FULL if s.adapter == "none" else MFU)
        dequant = 0.0
        if s.adapter == "qlora":
            nf4 = sum(n * count for n, count in nf4_matrices(m, s.targets).items())
            dequant = NF4_DEQUANT_PASSES * nf4 * (0.5 + 2) / (gpu.bandwidth_tbs * 1e12)
        seconds = sum(((b.rows * b.length) * (base + lora) + b.trained * head + b.pairs * attn_pair) / rate
                      + dequant for b in batches)
        steps = max(len(batches) / s.accumulation, 1e-9)  # each GPU's steps, were one GPU to take every batch
        optimizer = (STEP_TRAFFIC + 2 * STATE_BYTES[s.optimizer]) * n_train / (gpu.bandwidth_tbs * 1e12)
        if s.sharded:  # the step waits for the gathers and reduce-scatters; AdamW updates one shard
            step_s = seconds / steps / FSDP_EFFICIENCY[reshard] + optimizer / s.gpus
        else:
            step_s = (seconds / steps + optimizer) / (DDP_EFFICIENCY[s.aggregation] if s.gpus > 1 else 1.0)
        tokens_per_s = sum(b.real for b in batches) / (steps * step_s)
    return Prediction(s, weights / GIB, trained / GIB, peak_act / GIB, peak / GIB, tokens_per_s, step_s, n_train)


def attended_pairs(n: int, window: int | None) -> float:
    """(query, key) pairs causal attention computes over a span of n tokens, with a sliding window."""
    if window is None or n <= window:
        return n * (n + 1) / 2
    return window * (window + 1) / 2 + (n - window) * window


def micro_batches(rows: list[list[int]], lengths, trained, micro_batch_size: int, seed: int, sequence_len: int,
                  packing: bool, fast: bool, window: int | None, one_sample: bool) -> list[MicroBatch]:
    """One epoch's micro-batches as the trainer cuts and pads them (schedule.row_padding, pack.collate)."""
    from .data.pack import group_rows

    out = []
    for group in group_rows(rows, micro_batch_size, seed):
        row_lens = [sum(int(lengths[i]) for i in r) for r in group]
        if packing or (fast and not one_sample):
            length = sequence_len
        else:
            length = max(row_lens)
            if fast:
                length = -(-length // 128) * 128
        n_rows = max(len(group), micro_batch_size) if fast else len(group)
        if packing:  # block mask: a sample attends within itself
            pairs = sum(attended_pairs(int(lengths[i]), window) for r in group for i in r)
        else:  # the causal kernel (or a dense mask) runs over the padded row
            pairs = n_rows * attended_pairs(length, window) if fast else sum(
                attended_pairs(n, window) for n in row_lens)
        out.append(MicroBatch(n_rows, length, sum(row_lens), sum(int(trained[i]) for r in group for i in r), pairs))
    return out


# --------------------------------------------------------------------------- the command
@dataclass
class Plan:
    lines: list[str]
    predicted: Prediction
    options: list[tuple[str, Prediction, float | None]]  # (settings, prediction, wall seconds)


def setup_from_config(cfg, fast: bool = True, gpus: int = 1) -> Setup:
    from .train.runtime import resolve_strategy

    return Setup(cfg.adapter, cfg.lora_r, tuple(cfg.lora_target_modules), len(cfg.lora_modules_to_save),
                 cfg.gradient_checkpointing, cfg.offload_activations, cfg.offload_activations,
                 fast if cfg.fast_path == "auto" else bool(cfg.fast_path), cfg.bf16 is not False,
                 cfg.base_precision == "fp8", cfg.optimizer, cfg.micro_batch_size, cfg.gradient_accumulation_steps,
                 gpus, resolve_strategy(cfg), cfg.gradient_aggregation, cfg.fsdp_reshard_after_forward)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def _size(gib: float) -> str:
    return f"{gib:.1f} GiB" if gib >= 1 else f"{gib * 1024:.0f} MiB"




def _several_gpus_lines(m, s: Setup, gpu: GPU | None) -> list[str]:
    """What a run on several GPUs is predicted from."""
    if s.gpus == 1:
        if s.adapter != "none":
            return []
        return [f"adapter: none on one GPU: the whole model in float32 with its gradients and AdamW state "
                f"({8 + STATE_BYTES[s.optimizer]:g} bytes a parameter) and bf16 autocast copies; --gpus N plans it "
                "sharded over N GPUs (FSDP2)"]
    source = "measured on 2 H200s (docs/benchmarks.md, Several GPUs); assumed the same on more"
    if s.sharded:
        reshard, why = resharded(m, s, gpu)
        layers = f"{FSDP_GATHERED_LAYERS} decoder layers" if reshard else "every decoder layer"
        return [f"fsdp on {s.gpus} GPUs: {why}; each holds 1/{s.gpus} of the float32 weights, gradients and AdamW "
                f"state, {layers} and the embeddings and head gathered in bf16, and the activations as one "
                f"process; the peak comes at the optimizer step, {FSDP_STEP_BYTES} bytes a parameter above the "
                f"state, and tokens/s per GPU is one GPU's forward + backward x {FSDP_EFFICIENCY[reshard]}, then a "
                f"sharded AdamW step: both {source}"]
    how = f"gradient_aggregation: {s.aggregation}"
    lines = [f"ddp on {s.gpus} GPUs: memory per GPU as one process"
             + (" and, after the backward, every rank's adapter gradients gathered and sorted"
                if s.aggregation != "mean" else "")
             + f"; tokens/s per GPU is one GPU's x {DDP_EFFICIENCY[s.aggregation]}, the efficiency of {how} "
             + source + "; each optimizer step takes micro_batch_size x accumulation rows from each GPU"]
    if s.adapter == "none":
        lines.append("adapter: none under distributed: ddp replicates the whole float32 model on every GPU; its "
                     "efficiency was measured with adapter gradients (168 MB), not a whole model's")
    return lines


def make_plan(cfg, model_cfg, data, gpu: GPU | None, memory_gib: float | None, gpus: int = 1) -> Plan:
    """Predict the configured run on `gpus` GPUs and propose settings that fit `memory_gib` (default: the GPU's)."""
    from .data.pack import pack_rows, sample_lengths
    from .train.runtime import check_distributed_config
    from .train.schedule import count_steps, one_sample_rows

    if gpus < 1:
        raise ConfigError(f"--gpus {gpus}: must be 1 or more")
    check_distributed_config(cfg, gpus)  # what train refuses on this many processes, plan refuses too
    budget = memory_gib if memory_gib is not None else gpu.memory_gib
    lengths = np.asarray(sample_lengths(data.train))
    trained = np.asarray([s.n_trained for s in data.train] if getattr(data.train, "trained", None) is None
                         else data.train.trained)
    s0 = setup_from_config(cfg, gpus=gpus)
    window = model_cfg.sliding_window

    @functools.cache
    def rows_of(sequence_len: int) -> list[list[int]]:  # the training rows, were rows this long
        keep = [k for k in range(len(lengths)) if lengths[k] <= sequence_len]
        if not cfg.sample_packing:
            return [[k] for k in keep]
        return [[keep[j] for j in r] for r in pack_rows([int(lengths[k]) for k in keep], sequence_len)]

    @functools.cache
    def batches_of(sequence_len: int, micro_batch_size: int) -> list[MicroBatch]:
        one_sample = one_sample_rows(cfg.model_copy(update={"sequence_len": sequence_len}), model_cfg)
        return micro_batches(rows_of(sequence_len), lengths, trained, micro_batch_size, cfg.seed, sequence_len,
                             cfg.sample_packing, s0.fast, window, one_sample)

    def run(s: Setup, sequence_len: int):
        rows = rows_of(sequence_len)
        p = predict(model_cfg, s, batches_of(sequence_len, s.micro_batch_size), gpu)
        steps = count_steps(len(rows), s.micro_batch_size, s.micro_batch_size * s.accumulation * s.gpus,
                            cfg.num_epochs, cfg.max_steps)
        wall = steps * p.step_s if p.step_s is not None else None
        dropped = len(lengths) - sum(len(r) for r in rows)
        return p, wall, steps, dropped

    p0, wall0, steps0, _ = run(s0, cfg.sequence_len)
    rows_per_step = s0.micro_batch_size * s0.accumulation * gpus
    rows0 = rows_of(cfg.sequence_len)
    lines = [
        f"an epoch: {len(lengths):,} training samples, {int(lengths.sum()):,} tokens ({int(trained.sum()):,} trained; "
        "after dataset weights, held-out samples not counted) -> "
        f"{len(rows0):,} rows of up to {cfg.sequence_len} ({'packed' if cfg.sample_packing else 'one sample each'}); "
        f"{steps0:,} optimizer steps of {rows_per_step} rows" + (f" ({gpus} GPUs)" if gpus > 1 else ""),
        f"trained parameters: {p0.trained_params:,} ({cfg.adapter})",
        ("GPU " + (f"{gpu.name}: {gpu.memory_gib:.1f} GiB, {gpu.bf16_tflops:,.0f} TFLOP/s bf16" if gpu else "unknown")
         + (f" (x {gpus})" if gpus > 1 else "") + (f"; budget {budget:.1f} GiB" if memory_gib is not None else "")
         + (" per GPU" if gpus > 1 and memory_gib is not None else "")),
    ]
    if not s0.fast:
        lines.append("fast_path: false: the plain path is modelled with the fast path's speed (not measured)")
    if s0.fp8:
        lines.append(f"base_precision: fp8: a byte a weight; the projections' products {FP8_SPEEDUP}x faster than "
                     "bf16's, fitted on the one FP8 record (a compiled 2-layer LoRA step 1.22x faster, "
                     "docs/benchmarks.md), not checked on a whole model")
    lines += _several_gpus_lines(model_cfg, s0, gpu)

    def row(label: str, p: Prediction, wall: float | None) -> str:
        per_gpu = f" ({p.tokens_per_s:,.0f} per GPU)" if p.setup.gpus > 1 else ""
        speed = (f"{p.all_tokens_per_s:,.0f}{per_gpu} | {p.step_s:.2f} | {_duration(wall)}" if p.tokens_per_s
                 else "not predicted (float32 or an unknown GPU) | |")
        return (f"| {label} | {_size(p.peak_gib)} | {_size(p.weights_gib)} + {_size(p.trained_gib)} + "
                f"{_size(p.activations_gib)} | {_size(p.device_gib)} | {'yes' if p.device_gib <= budget else 'NO'} "
                f"| {speed} |")

    header = ["| settings | peak per GPU (max_memory_allocated) | weights + trained/AdamW + activations "
              "| with CUDA context and slack | fits | tokens/s (all GPUs) | s/step | wall |",
              "|---|---|---|---|---|---|---|---|"]
    lines += header + [row("as configured: " + s0.label(), p0, wall0)]
    # Candidates: recompute modes, QLoRA, smaller micro-batches (same rows per step), shorter rows; for a full
    # fine-tune that does not fit, the fastest setting on the fewest more GPUs that shard it (fsdp).
    adapters = [cfg.adapter] + (["qlora"] if cfg.adapter == "lora" else ["lora", "qlora"] if cfg.adapter == "none"
                                else [])
    more_gpus = [n for n in (2, 4, 8) if n > gpus] if cfg.adapter == "none" and p0.device_gib > budget else []
    sizes = sorted({max(1, s0.micro_batch_size >> k) for k in range(8)}, reverse=True)
    seq_lens = [cfg.sequence_len] + [cfg.sequence_len >> k for k in range(1, 4) if cfg.sequence_len >> k >= 256]

    def fitting(adapter: str, n: int, strategy: str, seq: int) -> list[tuple[str, Prediction, float | None]]:
        found = []
        for ckpt, off in ((False, False), (True, False), (True, True)):
            for mbs in (k for k in sizes if rows_per_step % (k * n) == 0):  # the same rows per step
                s = replace(s0, adapter=adapter, checkpointing=ckpt, offload=off, by_row=off, gpus=n,
                            strategy=strategy, micro_batch_size=mbs, accumulation=rows_per_step // (mbs * n))
                p, wall, _, dropped = run(s, seq)
                if p.device_gib <= budget:
                    label = s.label() + (f", sequence_len {seq} ({dropped:,} longer samples dropped)"
                                         if seq != cfg.sequence_len else "")
                    found.append((label, p, wall))
                    break  # the largest micro-batch that fits is the fastest of this kind
        return found

    options = []
    for seq in seq_lens:
        for adapter in adapters:
            options += fitting(adapter, gpus, s0.strategy if adapter == "none" else "ddp", seq)
        for n in more_gpus:
            sharded = fitting("none", n, "fsdp", seq)
            if sharded:
                options.append(max(sharded, key=lambda o: o[1].all_tokens_per_s))
                break
        if options:
            break  # shorter rows only when nothing fits at the configured length
    options.sort(key=lambda o: -o[1].all_tokens_per_s)
    if options:
        lines.append(f"settings that fit in {budget:.1f} GiB, fastest first (the largest micro-batch of each kind; "
                     "the same rows per optimizer step):")
        lines += header + [row(*option) for option in options[:6]]
    else:
        lines.append(f"nothing fits in {budget:.1f} GiB, even at micro-batch 1, QLoRA with offload and rows of "
                     f"{seq_lens[-1]}" + (f", or full fine-tuning sharded over {more_gpus[-1]} GPUs" if more_gpus
                                          else "") + ": use a GPU with more memory")
    return Plan(lines, p0, options)
