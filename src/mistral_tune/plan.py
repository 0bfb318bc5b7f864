"""`mistral-tune plan`: a run's peak GPU memory, tokens/s and wall time, predicted before any weight
is loaded (config.json, the tokenizer and the data's token counts only), and settings that fit.

The model follows how training allocates (train/loop.py, models/, kernels/):
- weights: bf16 base under LoRA; NF4 (4 bits + double-quantized block scales, bitsandbytes'
  blocksize 64 over 256-block groups) for QLoRA's target projections (Mixtral's targeted stacked
  expert weights one matrix per expert), plus a few bf16 copies of a matrix dequantized at a time;
  float32 for full fine-tuning (adapter: none), with its bf16 autocast copies. Trained parameters
  are float32 with float32 gradients and two AdamW states.
- activations, per token per layer, counted from the decoder layer's saved tensors: the two norm
  inputs and outputs (4 x hidden), q and the attention output (2 x heads x head_dim), k and v
  (2 x KV heads x head_dim), and gate, up and their product (3 x MLP width; top-k experts for MoE).
  Without checkpointing every layer keeps them; with it a layer keeps its input (or, offloaded,
  nothing on the GPU) and the backward of one layer (one row at a time when offloaded) holds
  BACKWARD_PEAK_LAYERS layers' worth. The fused loss holds one chunk of 2,048 tokens' float32 logits.
- time: matrix FLOPs per token (4N with a frozen base, 6N full; + the re-run's forward less the down
  projection, which the re-run skips, when checkpointed), LoRA's 6 x its parameters, lm_head on
  trained tokens only, attention 4 x heads x head_dim per (query, key) pair a layer, x3 for forward +
  backward (x4 with the re-run); divided by the GPU's bf16 peak x MFU. QLoRA adds the dequantization,
  a memory-bound pass over its NF4 weights per micro-batch.

Calibration constants are few and named below; docs/benchmarks.md says which recorded runs fitted
which and gives predicted against measured for every recorded configuration.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import numpy as np

from .errors import ConfigError
from .models.families import EXPERT_TARGETS
from .models.quant import BLOCKSIZE as NF4_BLOCK

GIB = 1024**3

# --- calibration (fitted on bench/results/2026-11-23-h100-main.json; docs/benchmarks.md) -------------
MFU = 0.50  # counted FLOPs / (bf16 peak x time), fast path: fit on ours_fast and ours_lean
NF4_DEQUANT_PASSES = 4.8  # memory-bound passes over QLoRA's weights per micro-batch: ours_qlora - ours_lean
BACKWARD_PEAK_LAYERS = 1.96  # layers' worth of activations alive in one layer's backward: ours_lean(_batched)
BATCH_HIDDEN_COPIES = 5.0  # hidden-size vectors per token held for the whole step: ours_lean vs _batched
QLORA_DEQUANT_BUFFERS = 3  # bf16 copies of the largest NF4 projection alive at once: ours_qlora
# --- assumed, not fitted (max_memory_allocated, which the records give, counts neither) ----------------
CUDA_CONTEXT_GIB = 0.75  # CUDA context and kernels
ALLOCATOR_SLACK = 0.05  # the caching allocator's fragmentation, as a share of the peak

LOSS_CHUNK = 2048  # tokens per chunk of the fused loss (kernels/loss.py's default)
ADAMW_BYTES = 16  # float32 weight, gradient and two states per trained parameter
OPTIMIZER_TRAFFIC = 28  # bytes read and written per trained parameter by the fused AdamW step


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float  # as torch reports the device's total memory
    bf16_tflops: float  # dense bf16 tensor-core peak (vendor figure)
    bandwidth_tbs: float  # memory bandwidth, TB/s
    match: tuple[str, ...]  # all of these in the lower-cased device name, without spaces and dashes


GPUS = [
    GPU("H200", 140.4, 989.4, 4.8, ("h200",)),
    GPU("H100-PCIe", 79.6, 756.0, 2.0, ("h100", "pcie")),
    GPU("H100", 79.6, 989.4, 3.35, ("h100",)),
    GPU("A100-80GB", 79.3, 312.0, 2.04, ("a100", "80g")),
    GPU("A100-40GB", 39.4, 312.0, 1.555, ("a100",)),
    GPU("L40S", 44.4, 362.1, 0.864, ("l40s",)),
    GPU("A10", 22.1, 125.0, 0.6, ("a10",)),
    GPU("L4", 22.0, 121.0, 0.3, ("l4",)),
    GPU("RTX4090", 23.6, 165.2, 1.008, ("4090",)),
    GPU("RTX3090", 23.6, 71.0, 0.936, ("3090",)),
]


def find_gpu(name: str) -> GPU:
    """A GPU of the table by its name (case and dashes ignored) or by a device name torch reports."""
    key = name.lower().replace(" ", "").replace("-", "")
    for gpu in GPUS:
        if key == gpu.name.lower().replace("-", "") or all(m in key for m in gpu.match):
            return gpu
    raise ConfigError(f"--gpu {name}: unknown GPU; known: {', '.join(g.name for g in GPUS)} "
                      "(or give --memory-gib for a memory-only plan)")


@dataclass(frozen=True)
class Setup:
    """What decides memory and time, as the trainer turns it on from the config."""

    adapter: str = "lora"  # lora | qlora | none
    lora_r: int = 16
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    whole_modules: int = 0  # lora_modules_to_save trained in full (embed_tokens, lm_head)
    checkpointing: bool = False
    offload: bool = False
    by_row: bool = False  # the trainer sets it with offload_activations
    fast: bool = True
    bf16: bool = True
    fp8: bool = False  # base_precision: fp8 (the dense projections held in e4m3 with a float32 scale a row)
    micro_batch_size: int = 1
    accumulation: int = 1

    def label(self) -> str:
        mode = (("gradient_checkpointing + offload_activations" if self.offload else "gradient_checkpointing")
                if self.checkpointing else "no checkpointing")
        return f"{self.adapter}, {mode}, micro_batch_size {self.micro_batch_size} x {self.accumulation} accumulation"


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
    trained_gib: float  # trained parameters with their gradients and AdamW states
    activations_gib: float
    peak_gib: float  # as torch.cuda.max_memory_allocated counts it
    tokens_per_s: float | None  # real tokens; None when not predicted (float32)
    step_s: float | None
    trained_params: int

    @property
    def device_gib(self) -> float:
        """What the GPU must hold: the peak, the allocator's slack and the CUDA context."""
        return self.peak_gib * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT_GIB


def _sizes(m) -> dict:
    """Parameter counts of one layer's parts and of the whole model (models/mistral.py's shapes)."""
    d, hd, i = m.hidden_size, m.head_dim, m.intermediate_size
    experts = m.num_local_experts if m.moe else 1
    proj = {"q_proj": (d, m.num_attention_heads * hd), "k_proj": (d, m.num_key_value_heads * hd),
            "v_proj": (d, m.num_key_value_heads * hd), "o_proj": (m.num_attention_heads * hd, d),
            "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}
    mlp = ("gate_proj", "up_proj", "down_proj")
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
    # (lora.py ExpertLora); gate_proj and up_proj name nothing there.
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


def base_bytes(m, s: Setup, act: int = 2) -> float:
    """The frozen base under LoRA or QLoRA as the loader holds it: `act`-byte weights (bf16), NF4 for
    QLoRA's targets, one byte a weight and a float32 scale a row for the FP8 projections."""
    sz, L = _sizes(m), m.num_hidden_layers
    quantized = nf4_matrices(m, s.targets) if s.adapter == "qlora" else {}
    # FP8: every projection that is a plain linear layer (all seven; Mixtral's experts stay bf16)
    fp8 = [k for k in sz["proj"] if s.fp8 and not (m.moe and k in sz["mlp"])]
    codes = L * sum(sz["per"][k] for k in fp8)
    plain = sz["total"] - sum(n * c for n, c in quantized.items()) - codes
    return (act * plain + sum(nf4_bytes(n) * c for n, c in quantized.items()) + codes
            + 4 * L * sum(sz["proj"][k][1] for k in fp8))


def predict(m, s: Setup, batches: list[MicroBatch], gpu: GPU | None) -> Prediction:
    """Peak memory and speed of training model shape `m` as `s` says on these micro-batches."""
    sz, L, d = _sizes(m), m.num_hidden_layers, m.hidden_size
    act = 2 if s.bf16 else 4  # bytes of an activation
    n_train = trained_params(m, s)
    active_mlp = m.num_experts_per_tok if m.moe else 1
    if s.adapter == "none":
        weights = 4 * sz["total"] + (2 * L * sz["layer"] if s.bf16 else 0)  # float32 + autocast's bf16 copies
        trained = (ADAMW_BYTES - 4) * n_train  # the float32 weights are counted above
    else:
        weights = base_bytes(m, s, act)
        quantized = nf4_matrices(m, s.targets)
        if s.adapter == "qlora" and quantized:
            weights += QLORA_DEQUANT_BUFFERS * 2 * max(quantized)
        trained = ADAMW_BYTES * n_train
    per_layer = act * (4 * d + 2 * m.num_attention_heads * m.head_dim + 2 * m.num_key_value_heads * m.head_dim
                       + 3 * m.intermediate_size * active_mlp)
    whole = BATCH_HIDDEN_COPIES * act * d
    peak_act = 0.0
    for b in batches:
        tokens = b.rows * b.length
        unit = b.length if s.by_row else tokens  # tokens whose layer backward runs at once
        loss = 4 * m.vocab_size * (min(LOSS_CHUNK, b.trained) if s.fast else 2 * b.trained)
        if not s.checkpointing:
            need = tokens * (L * per_layer + whole) + loss
        else:
            kept = 0 if s.offload else tokens * L * act * d
            need = kept + tokens * whole + max(unit * BACKWARD_PEAK_LAYERS * per_layer, loss)
        peak_act = max(peak_act, need)

    tokens_per_s = step_s = None
    if gpu is not None and s.bf16:
        experts = m.num_local_experts if m.moe else 1
        attn = sum(v for k, v in sz["per"].items() if k not in sz["mlp"])
        lin = L * (attn + sum(sz["per"][k] for k in sz["mlp"]) * active_mlp / experts)  # matrices a token meets
        down = L * sz["per"]["down_proj"] * active_mlp / experts  # the checkpointed re-run skips it
        base = (6 if s.adapter == "none" else 4) * lin + (2 * lin - 2 * down if s.checkpointing else 0)
        head = (6 if s.adapter == "none" or s.whole_modules else 4) * sz["embed"]
        lora = 0 if s.adapter == "none" else 6 * (n_train - s.whole_modules * sz["embed"])
        attn_pair = 4 * m.num_attention_heads * m.head_dim * L * (4 if s.checkpointing else 3)
        rate = gpu.bf16_tflops * 1e12 * MFU
        dequant = 0.0
        if s.adapter == "qlora":
            nf4 = sum(n * count for n, count in nf4_matrices(m, s.targets).items())
            dequant = NF4_DEQUANT_PASSES * nf4 * (0.5 + 2) / (gpu.bandwidth_tbs * 1e12)
        seconds = sum(((b.rows * b.length) * (base + lora) + b.trained * head + b.pairs * attn_pair) / rate
                      + dequant for b in batches)
        optimizer = OPTIMIZER_TRAFFIC * n_train / (gpu.bandwidth_tbs * 1e12)
        steps = max(len(batches) / s.accumulation, 1e-9)
        seconds += optimizer * steps
        real = sum(b.real for b in batches)
        tokens_per_s = real / seconds
        step_s = seconds / steps
    return Prediction(s, weights / GIB, trained / GIB, peak_act / GIB, (weights + trained + peak_act) / GIB,
                      tokens_per_s, step_s, n_train)


def attended_pairs(n: int, window: int | None) -> float:
    """(query, key) pairs causal attention computes over a span of n tokens, with a sliding window."""
    if window is None or n <= window:
        return n * (n + 1) / 2
    return window * (window + 1) / 2 + (n - window) * window


def micro_batches(rows: list[list[int]], lengths, trained, micro_batch_size: int, seed: int, sequence_len: int,
                  packing: bool, fast: bool, window: int | None, one_sample: bool) -> list[MicroBatch]:
    """One epoch's micro-batches as the trainer cuts and pads them (loop.row_padding, pack.collate)."""
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


def setup_from_config(cfg, fast: bool = True) -> Setup:
    return Setup(cfg.adapter, cfg.lora_r, tuple(cfg.lora_target_modules), len(cfg.lora_modules_to_save),
                 cfg.gradient_checkpointing, cfg.offload_activations, cfg.offload_activations,
                 fast if cfg.fast_path == "auto" else bool(cfg.fast_path), cfg.bf16 is not False,
                 cfg.base_precision == "fp8", cfg.micro_batch_size, cfg.gradient_accumulation_steps)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def _size(gib: float) -> str:
    return f"{gib:.1f} GiB" if gib >= 1 else f"{gib * 1024:.0f} MiB"


def detect_gpu() -> tuple[GPU | None, str]:
    import torch

    if not torch.cuda.is_available():
        return None, ""
    name = torch.cuda.get_device_name(0)
    try:
        return find_gpu(name), name
    except ConfigError:
        return None, name


def make_plan(cfg, model_cfg, data, gpu: GPU | None, memory_gib: float | None) -> Plan:
    """Predict the configured run and propose settings that fit `memory_gib` (default: the GPU's)."""
    from .data.pack import pack_rows, sample_lengths
    from .train.loop import count_steps, one_sample_rows

    budget = memory_gib if memory_gib is not None else gpu.memory_gib
    lengths = np.asarray(sample_lengths(data.train))
    trained = np.asarray([s.n_trained for s in data.train] if getattr(data.train, "trained", None) is None
                         else data.train.trained)
    s0 = setup_from_config(cfg)
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
        steps = count_steps(len(rows), s.micro_batch_size, s.micro_batch_size * s.accumulation, cfg.num_epochs,
                            cfg.max_steps)
        wall = steps * p.step_s if p.step_s is not None else None
        dropped = len(lengths) - sum(len(r) for r in rows)
        return p, wall, steps, dropped

    p0, wall0, steps0, _ = run(s0, cfg.sequence_len)
    rows0 = rows_of(cfg.sequence_len)
    lines = [
        f"{len(lengths):,} training samples, {int(lengths.sum()):,} tokens ({int(trained.sum()):,} trained) -> "
        f"{len(rows0):,} rows of up to {cfg.sequence_len} ({'packed' if cfg.sample_packing else 'one sample each'}); "
        f"{steps0:,} optimizer steps of {s0.micro_batch_size * s0.accumulation} rows",
        f"trained parameters: {p0.trained_params:,} ({cfg.adapter})",
        ("GPU " + (f"{gpu.name}: {gpu.memory_gib:.1f} GiB, {gpu.bf16_tflops:,.0f} TFLOP/s bf16" if gpu else "unknown")
         + (f"; budget {budget:.1f} GiB" if memory_gib is not None else "")),
    ]
    if not s0.fast:
        lines.append("fast_path: false: the plain path is modelled with the fast path's speed (not measured)")
    if s0.fp8:
        lines.append("base_precision: fp8: the base's memory is modelled (a byte a weight); its speed is the bf16 "
                     "base's (the FP8 step measured 1.22x faster on 7B shapes, docs/benchmarks.md)")
    if cfg.adapter == "none":
        lines.append("adapter: none is planned for one process holding the whole model; train --gpus N shards its "
                     "weights, gradients and AdamW state over the N (FSDP), which this plan does not model")

    def row(label: str, p: Prediction, wall: float | None) -> str:
        speed = (f"{p.tokens_per_s:,.0f} | {p.step_s:.2f} | {_duration(wall)}" if p.tokens_per_s
                 else "not predicted (float32 or an unknown GPU) | |")
        return (f"| {label} | {_size(p.peak_gib)} | {_size(p.weights_gib)} + {_size(p.trained_gib)} + "
                f"{_size(p.activations_gib)} | {_size(p.device_gib)} | {'yes' if p.device_gib <= budget else 'NO'} "
                f"| {speed} |")

    header = ["| settings | peak (max_memory_allocated) | weights + trained/AdamW + activations "
              "| with CUDA context and slack | fits | tokens/s | s/step | wall |", "|---|---|---|---|---|---|---|---|"]
    lines += header + [row("as configured: " + s0.label(), p0, wall0)]
    # Candidates: recompute modes, QLoRA, smaller micro-batches (same rows per step), shorter rows.
    options = []
    adapters = [cfg.adapter] + (["qlora"] if cfg.adapter == "lora" else ["lora", "qlora"] if cfg.adapter == "none"
                                else [])
    effective = s0.micro_batch_size * s0.accumulation
    sizes = sorted({max(1, s0.micro_batch_size >> k) for k in range(8)}, reverse=True)
    seq_lens = [cfg.sequence_len] + [cfg.sequence_len >> k for k in range(1, 4) if cfg.sequence_len >> k >= 256]
    for seq in seq_lens:
        for adapter in adapters:
            for ckpt, off in ((False, False), (True, False), (True, True)):
                for mbs in sizes:
                    s = replace(s0, adapter=adapter, checkpointing=ckpt, offload=off, by_row=off,
                                micro_batch_size=mbs, accumulation=max(1, effective // mbs))
                    p, wall, _, dropped = run(s, seq)
                    if p.device_gib <= budget:
                        label = s.label() + (f", sequence_len {seq} ({dropped:,} longer samples dropped)"
                                             if seq != cfg.sequence_len else "")
                        options.append((label, p, wall))
                        break  # the largest micro-batch that fits is the fastest of this kind
        if options:
            break  # shorter rows only when nothing fits at the configured length
    options.sort(key=lambda o: -(o[1].tokens_per_s or 0))
    if options:
        lines.append(f"settings that fit in {budget:.1f} GiB, fastest first (the largest micro-batch of each kind; "
                     "the same rows per optimizer step):")
        lines += header + [row(*option) for option in options[:6]]
    else:
        lines.append(f"nothing fits in {budget:.1f} GiB, even at micro-batch 1, QLoRA with offload and rows of "
                     f"{seq_lens[-1]}: use a GPU with more memory")
    return Plan(lines, p0, options)
