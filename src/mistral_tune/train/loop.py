"""The training run, top to bottom: check inputs, build, resume, loop, evaluate, checkpoint, save.

Everything a user can get wrong (config, model path, tokenizer, data) is checked before anything
is written, so a bad run leaves no output directory behind. Final artifacts are written to a
temporary directory and renamed into place. What makes a run survive (exact resume, stop on
SIGTERM/SIGINT, the bad-step guard, out-of-memory handling) is called from the loop in plain sight;
docs/reliability.md lists the guarantees and the tests that prove them.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import random
import resource
import shutil
import time
from array import array
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from pydantic import TypeAdapter

from ..chat import ChatTokenizer, find_tokenizer_file, load_tokenizer
from ..config import ALL_PROJECTIONS, Config
from ..data.build import Dataset, build_dataset
from ..data.pack import Batch, collate, group_rows, length_grouped, make_rows, sample_lengths
from ..errors import CheckpointError, ConfigError, ModelError, OutOfMemory, OutputError, TrainingHalted
from ..evaluate.run import TrainingEvals
from ..fsutil import check_target, mark_output, replace_dir
from ..models.families import EXPERT_TARGETS, family_of
from ..models.fp8 import check_fp8_device, fp8_model
from ..models.load import is_bnb_4bit, load_model, read_config, resolve_model_dir
from ..models.lora import WHOLE_MODULES, LoraSpec, apply_lora, lora_init_tensors
from ..models.mistral import count_params, flops_per_token, router_balance
from ..models.peft_format import restore_lora_init, save_adapter, save_lora_init
from ..models.quant import quantize_model
from .checkpoint import MANIFEST, Checkpoint, CheckpointManager, checkpoint_step, save_shards
from .guard import StepGuard
from .logs import MetricsLog
from .oom import OOM_ERRORS, free_memory, oom_advice, smaller_micro_batch
from .optim import eight_bit_adamw, lr_factor, make_optimizer, token_loss_sum, warmup_steps
from .report import write_run_report
from .runtime import REPORT_OUTLIER_AFTER, Runtime
from .signals import StopRequest
from .trackers import Trackers, check_trackers, run_files, run_params


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path | None
    model_dir: Path | None
    steps: int
    final_train_loss: float
    eval_loss: float | None
    stopped_by: str | None = None  # SIGTERM / SIGINT when the run stopped early on request
    checkpoint_dir: Path | None = None  # the last checkpoint written
    best: dict | None = None  # the best evaluation (step, metric, value, dir) when an eval: section ran
    report: Path | None = None  # the evaluation report (report.html)


class RowStream:
    """The training rows in a per-epoch shuffled order (seed + epoch), taken a micro-batch at a time.

    Its whole state is the position (epoch, offset into that epoch's order): a resumed run goes on
    with exactly the rows an uninterrupted run would see, without replaying. The micro-batches are
    cut from the order one after another (the last of an epoch may be short; the next starts the
    next epoch), and each round of `world_size` of them gives rank r the r-th: whatever the number
    of processes, a step with micro_batch x accumulation x world_size rows trains on the same rows,
    and within an epoch every row is seen exactly once. For one process the micro-batches equal
    group_rows(rows, size, seed + epoch).
    """

    def __init__(self, rows: list[list[int]], seed: int, rank: int = 0, world_size: int = 1,
                 row_lengths: list[int] | None = None, group_size: int = 1) -> None:
        self.rows, self.seed, self.rank, self.world_size = rows, seed, rank, world_size
        self.row_lengths, self.group_size = row_lengths, group_size  # group_by_length
        self.epoch, self.offset = 0, 0
        self._order: tuple[int, list[int]] | None = None

    def order(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            order = list(range(len(self.rows)))
            rng = random.Random(self.seed + epoch)
            rng.shuffle(order)
            if self.row_lengths is not None:
                order = length_grouped(order, self.row_lengths, self.group_size, rng)
            self._order = (epoch, order)
        return self._order[1]

    def next(self, size: int) -> tuple[int, list[list[int]]]:
        """(epoch, rows) of this rank's next micro-batch of at most `size` rows; the epoch is that of
        the round's last micro-batch, the same on every rank."""
        mine: list[list[int]] = []
        for r in range(self.world_size):
            order, epoch = self.order(self.epoch), self.epoch
            if r == self.rank:
                mine = [self.rows[j] for j in order[self.offset:self.offset + size]]
            self.offset += size
            if self.offset >= len(order):
                self.epoch, self.offset = self.epoch + 1, 0
        return epoch, mine

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "rows": len(self.rows)}

    def load_state_dict(self, state: dict, source: Path) -> None:
        if state["rows"] != len(self.rows) or state["seed"] != self.seed:
            raise CheckpointError(f"{source}: data position is for {state['rows']} rows shuffled with seed "
                                  f"{state['seed']}, this run has {len(self.rows)} rows and seed {self.seed}")
        self.epoch, self.offset = state["epoch"], state["offset"]


@dataclass
class Progress:
    """Counters a checkpoint carries besides weights, optimizer, data position and guard."""

    micro_batch_size: int  # may be smaller than the config's after auto_micro_batch
    gradient_accumulation_steps: int
    world_size: int = 1
    step: int = 0
    tokens_seen: int = 0
    train_loss: float = float("nan")
    eval_loss: float | None = None

    @property
    def rows_per_step(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * self.world_size

    def rescale_to(self, world_size: int, source: Path, echo) -> None:
        """Go on with another number of processes: the same rows per step, through the accumulation."""
        if world_size == self.world_size:
            return
        rows, per_pass = self.rows_per_step, self.micro_batch_size * world_size
        if rows % per_pass:
            raise CheckpointError(
                f"{source}: written by {self.world_size} process(es) with {rows} rows per step (micro_batch_size "
                f"{self.micro_batch_size} x gradient_accumulation_steps {self.gradient_accumulation_steps}); "
                f"{world_size} processes cannot take {rows} rows per step. Use a number of processes that divides "
                f"{rows // self.micro_batch_size}")
        echo(f"resuming {self.world_size} process(es)' run on {world_size}: gradient_accumulation_steps "
             f"{self.gradient_accumulation_steps} -> {rows // per_pass}, the same {rows} rows per step")
        self.gradient_accumulation_steps, self.world_size = rows // per_pass, world_size

    def to_dict(self) -> dict:
        d = asdict(self)
        d["train_loss"] = _finite(self.train_loss)
        d["eval_loss"] = _finite(self.eval_loss) if self.eval_loss is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Progress:
        return cls(**{**d, "train_loss": float("nan") if d["train_loss"] is None else d["train_loss"]})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_output_dir(cfg: Config) -> Path:
    """output_dir must be new, empty, or a run of ours (continued by resume, replaced by
    overwrite_output_dir), and never hold the run's inputs or the working directory (fsutil's rule)."""
    return check_target(cfg.output_dir, "run", sources=run_inputs(cfg),
                        overwrite=cfg.overwrite_output_dir or cfg.resume is not None, label="output_dir",
                        hint="continue it with resume: auto, or set overwrite_output_dir: true")


def run_inputs(cfg: Config) -> list[str | None]:
    return [ds.path for ds in [*cfg.datasets, *cfg.val_datasets]] + [cfg.base_model, cfg.tokenizer]


# Lints: ranges outside which a setting is unusual enough to mention (never an error).
USUAL_LEARNING_RATE = {"adapter": (2e-5, 5e-3), "full": (1e-6, 1e-4)}  # LoRA/QLoRA, full fine-tuning
USUAL_LORA_SCALING = (0.25, 8.0)  # lora_alpha / lora_r (/ sqrt(r) with rsLoRA)
SHORT_SAMPLES = 0.25  # without packing: mean sample below this share of sequence_len


def model_fit_warnings(cfg: Config, model_dir: Path, model_cfg, tokenizer, lengths=None) -> list[str]:
    """What in the config fits the model or the data badly without being an error (printed by
    validate, plan and train). lengths: the training samples' token counts."""
    out = []
    kind, (low, high) = (("full fine-tuning", USUAL_LEARNING_RATE["full"]) if cfg.adapter == "none"
                         else (cfg.adapter.upper(), USUAL_LEARNING_RATE["adapter"]))
    if not low <= cfg.learning_rate <= high:
        below = cfg.learning_rate < low
        out.append(f"learning_rate {cfg.learning_rate:g} is far {'below' if below else 'above'} the usual range for "
                   f"{kind} ({low:g} to {high:g}; full fine-tuning takes about 10x less than adapters): expect "
                   + ("little learning" if below else "divergence or forgetting"))
    if cfg.adapter != "none":
        scaling = cfg.lora_alpha / (math.sqrt(cfg.lora_r) if cfg.use_rslora else cfg.lora_r)
        if not USUAL_LORA_SCALING[0] <= scaling <= USUAL_LORA_SCALING[1]:
            rule = "lora_alpha / sqrt(lora_r) (use_rslora)" if cfg.use_rslora else "lora_alpha / lora_r"
            out.append(f"lora_alpha {cfg.lora_alpha:g} with lora_r {cfg.lora_r}: the adapter's scale {rule} is "
                       f"{scaling:.3g}, outside the usual {USUAL_LORA_SCALING[0]:g} to {USUAL_LORA_SCALING[1]:g} "
                       "(alpha = r or 2r is common): the effective learning rate moves with it")
    if cfg.sequence_len > model_cfg.max_position_embeddings:
        out.append(f"sequence_len {cfg.sequence_len} is more than the model's max_position_embeddings "
                   f"{model_cfg.max_position_embeddings} ({model_dir / 'config.json'}): it has not learnt positions "
                   "that far")
    window = model_cfg.sliding_window
    if window and cfg.sequence_len > window:
        out.append(f"sequence_len {cfg.sequence_len} is more than the model's sliding_window {window} "
                   f"({model_dir / 'config.json'}): a token attends to the {window} before it only, and rows of one "
                   "sample are padded to sequence_len")
    if lengths is not None and len(lengths) and not cfg.sample_packing:
        mean = float(np.mean(lengths))
        if mean < SHORT_SAMPLES * cfg.sequence_len:
            out.append(f"sample_packing is off and samples average {mean:.0f} tokens against sequence_len "
                       f"{cfg.sequence_len}: a micro-batch of {cfg.micro_batch_size} row(s) holds about "
                       f"{mean * cfg.micro_batch_size:.0f} tokens; sample_packing: true fills rows (samples never "
                       "attend to each other)")
    if cfg.adapter == "qlora" and model_cfg.moe and not set(cfg.lora_target_modules) & set(EXPERT_TARGETS):
        out.append("adapter qlora: the experts are not in lora_target_modules, so they stay in full precision "
                   "(QLoRA holds in NF4 what it adapts); add experts to hold them in 4 bits")
    if cfg.tokenizer is not None:
        try:
            own = ChatTokenizer(find_tokenizer_file(model_dir))
        except ModelError:  # the folder ships none (or several): nothing to compare with
            return out
        def kind_of(t: ChatTokenizer) -> str:
            return f"{'tekken' if t.is_tekken else 'SentencePiece'} {t.version}"

        if kind_of(own) != kind_of(tokenizer):
            out.append(f"tokenizer: {cfg.tokenizer} is {kind_of(tokenizer)}, but the model folder ships "
                       f"{own.source_file.name} ({kind_of(own)}): the prompt format differs from the one the model "
                       "knows; leave tokenizer out to use the model's own")
    return out


def prepare(cfg: Config, check_output: bool = True):
    """Load and check tokenizer, model and data. Writes nothing.

    Cheap checks come first (config.json, tokenizer, data) so a bad dataset is reported before
    gigabytes of weights are read.
    """
    if check_output:
        check_output_dir(cfg)
    check_trackers(cfg.report_to)
    if cfg.optimizer == "adamw_8bit":
        eight_bit_adamw()  # a missing package is reported now, not after the weights are read
    rt = Runtime.detect(cfg)
    try:
        return (rt, *_load(cfg, rt))
    except BaseException:
        rt.close()
        raise


def with_family_targets(cfg: Config) -> Config:
    """cfg with lora_target_modules set to the model family's default when the config names none: all
    seven projections on a dense model, the attention and the experts on Mixtral (whose feed-forward
    has no gate_proj/up_proj/down_proj)."""
    if "lora_target_modules" in cfg.model_fields_set or cfg.adapter == "none" or cfg.base_model is None:
        return cfg
    model_cfg = read_config(resolve_model_dir(cfg.base_model, weights=False))
    targets = list(family_of({"architectures": [model_cfg.architecture]}).default_targets)
    return cfg if targets == cfg.lora_target_modules else cfg.model_copy(update={"lora_target_modules": targets})


def read_inputs(cfg: Config, main_first=lambda build: build(), weights: bool = True):
    """Everything but the weights, checked: (model_dir, model config, tokenizer, data). main_first
    runs the data build (Runtime.main_first: rank 0 fills the token cache, the others read it).
    weights=False: a hub model's weights are not fetched (`plan`)."""
    if cfg.base_model is None:
        raise ConfigError("missing key 'base_model': the model to train (a local HF model directory or a hub id)")
    model_dir = resolve_model_dir(cfg.base_model, weights)
    model_cfg = read_config(model_dir)
    if is_bnb_4bit(model_dir) and cfg.adapter != "qlora":
        raise ConfigError(
            f"base_model: {cfg.base_model} is a bitsandbytes 4-bit checkpoint; train it with adapter: qlora"
        )
    tokenizer = load_tokenizer(cfg.tokenizer, model_dir, cfg.new_special_tokens)
    if tokenizer.vocab_size != model_cfg.vocab_size:
        raise ModelError(
            f"tokenizer {tokenizer.source_file.name} has {tokenizer.vocab_size} tokens but the model's "
            f"embedding has {model_cfg.vocab_size} rows; pick the tokenizer that matches the model "
            "(v1: 32000, v3/v7: 32768, tekken: 131072)"
        )
    data = main_first(lambda: build_dataset(cfg, tokenizer))
    data.report.warnings += model_fit_warnings(cfg, model_dir, model_cfg, tokenizer, sample_lengths(data.train))
    return model_dir, model_cfg, tokenizer, data


def _load(cfg: Config, rt: Runtime):
    if cfg.base_precision == "fp8":
        check_fp8_device(rt.device)
    model_dir, model_cfg, tokenizer, data = read_inputs(cfg, rt.main_first)
    weights_dtype = rt.autocast_dtype if (rt.autocast_dtype and cfg.adapter != "none") else torch.float32
    if cfg.adapter == "qlora":
        # Read to host memory, then quantize one projection at a time onto the device: the device
        # never holds the full-precision model. A bnb-4bit checkpoint arrives quantized already.
        model, _ = load_model(str(model_dir), dtype=weights_dtype, device="cpu")
        quantize_model(model, list(cfg.lora_target_modules), rt.device)
    elif cfg.base_precision == "fp8":
        model, _ = load_model(str(model_dir), dtype=weights_dtype, device="cpu")  # as qlora's, one at a time
        fp8_model(model, ALL_PROJECTIONS, rt.device)
    else:
        model, _ = load_model(str(model_dir), dtype=weights_dtype, device=rt.device,
                              shard=rt.shard if rt.sharded else None)
    return model_dir, tokenizer, model, data


def count_steps(n_rows: int, micro_batch_size: int, rows_per_step: int, num_epochs: float,
                max_steps: int | None = None) -> int:
    """Optimizer steps of a run: max_steps, else num_epochs passes over the rows."""
    micro_per_epoch = math.ceil(n_rows / micro_batch_size)
    per_epoch = max(1, micro_per_epoch * micro_batch_size // rows_per_step)
    return max_steps or max(1, math.ceil(per_epoch * num_epochs))


def one_sample_rows(cfg: Config, model_cfg) -> bool:
    """Whether the fast path's rows hold one sample each that no sliding window cuts: no packing,
    and rows no longer than the window. Such rows take the causal kernel and vary in length."""
    window = model_cfg.sliding_window
    return not cfg.sample_packing and (window is None or cfg.sequence_len <= window)


def row_padding(cfg: Config, fast: bool, one_sample: bool, micro_batch_size: int) -> dict:
    """How collate pads rows: packed rows to sequence_len, others to the longest row. The fast path's
    compiled layers make a graph per shape, so there rows of one sample (compiled for dynamic
    shapes) round up to a multiple of 128, rows a sliding window cuts go to sequence_len too, and a
    short micro-batch gets rows of padding."""
    if not fast:
        return {"pad_to": cfg.sequence_len} if cfg.sample_packing else {}
    rows = {"pad_multiple": 128} if one_sample else {"pad_to": cfg.sequence_len}
    return {**rows, "min_rows": micro_batch_size}


@torch.no_grad()
def evaluate(model, samples, rows, cfg: Config, rt: Runtime, padding: dict) -> tuple[float, int]:
    """Token-weighted mean loss over held-out rows, and the number of tokens it covers."""
    model.eval()
    total, count = 0.0, 0
    groups = group_rows(rows, cfg.micro_batch_size, None)
    share = groups[rt.rank::rt.world_size]  # each process a share
    if rt.sharded:  # every forward is collective: the same number of passes everywhere, extra ones not counted
        share += [None] * (math.ceil(len(groups) / rt.world_size) - len(share))
    for group in share:
        batch = collate(samples, group or groups[0], **padding).to(rt.device)
        with torch.autocast(rt.device.type, dtype=rt.autocast_dtype, enabled=rt.autocast_dtype is not None):
            loss = float(token_loss_sum(model, batch))
        if group is not None:
            total, count = total + loss, count + batch.n_trained
    rt.release_gathered(model)
    model.train()
    total, count = rt.all_sum([total, count])
    return total / max(count, 1), int(count)


def _bf16_peak(rt: Runtime) -> float | None:
    """This GPU's dense bf16 peak (FLOP/s) from plan's table, for the step lines' MFU; None on a CPU or
    a GPU the table does not know (no MFU then, rather than one against another GPU's peak)."""
    if rt.device.type != "cuda":
        return None
    from ..plan import find_gpu  # plan reads the trainer's inputs: imported here, not at the top

    try:
        return find_gpu(torch.cuda.get_device_name(rt.device)).bf16_tflops * 1e12
    except ConfigError:
        return None


def _peak_memory_gib(rt: Runtime) -> float:
    if rt.device.type == "cuda":
        return torch.cuda.max_memory_allocated(rt.device) / 1024**3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # kB -> GiB (Linux)


def _gpu_utilization(rt: Runtime) -> dict:
    """{"gpu_util": percent of the last sample period the GPU was busy}, or {} where NVML is missing."""
    try:
        return {"gpu_util": torch.cuda.utilization(rt.device)}
    except Exception:  # pynvml absent, or not an NVIDIA device
        return {}


def train(cfg: Config, echo=print, merge: bool = False, force: bool = False) -> TrainResult:
    """Run training as cfg says. force: resume even though safe keys (SAFE_TO_CHANGE) differ.

    SIGTERM and SIGINT are stop requests from the first line to the last: one that arrives while the
    run loads ends it before its first step, one after its last step lets the final save finish."""
    with StopRequest() as stop:
        cfg = with_family_targets(cfg)
        rt, model_dir, tokenizer, model, data = prepare(cfg)
        try:
            if not rt.is_main:  # one voice: rank 0 prints; every rank's errors still reach the user
                echo = _silent
            for line in data.report.lines():
                echo(line)
            return run_training(cfg, rt, model_dir, tokenizer, model, data, echo, merge, force, stop)
        finally:
            rt.close()


def _silent(*_args) -> None:
    """The echo of processes other than the first: they print nothing."""


def run_training(cfg: Config, rt: Runtime, model_dir: Path, tokenizer, model, data: Dataset,
                 echo=print, merge: bool = False, force: bool = False, stop: StopRequest | None = None) -> TrainResult:
    if stop is None:  # stop requests are read from here on
        with StopRequest() as stop:
            return run_training(cfg, rt, model_dir, tokenizer, model, data, echo, merge, force, stop)
    seed_everything(cfg.seed)
    spec = None
    if cfg.new_special_tokens:
        echo("new special tokens: " + ", ".join(f"{n} = id {tokenizer.added[n]}" for n in cfg.new_special_tokens)
             + " (reserved control-token slots); their embedding and lm_head rows train")
    if cfg.adapter in ("lora", "qlora"):
        new_ids = sorted(tokenizer.added[n] for n in cfg.new_special_tokens)
        rows = {m: new_ids for m in WHOLE_MODULES if new_ids and m not in cfg.lora_modules_to_save}
        spec = LoraSpec(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, list(cfg.lora_target_modules), cfg.use_rslora,
                        cfg.use_dora, list(cfg.lora_modules_to_save), rows, cfg.lora_init)
        began = time.perf_counter()
        wrapped = apply_lora(model, spec, seed=cfg.seed)  # PiSSA / OLoRA change the base weights here, before compiling
        if spec.init != "kaiming":
            echo(f"lora_init {spec.init}: {len(wrapped)} adapters start from their base weights, which now hold "
                 f"the residual ({time.perf_counter() - began:.1f} s)")
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    for p in params:  # trainable weights stay float32 even when the frozen base is bf16
        p.data = p.data.float()
    rt.broadcast_parameters(params + lora_init_tensors(model))  # the replicas start equal
    rt.track_gradients(named)
    if rt.rank:
        torch.manual_seed(cfg.seed + rt.rank)  # dropout draws its own masks on each process
    injected = rt.install_faults(model)
    if injected:
        echo(injected)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    model.offload_activations = model.recompute_by_row = cfg.offload_activations
    model.neftune_alpha = cfg.neftune_noise_alpha or 0.0
    # Mixtral's router balance loss: trained with config.json's weight when the router trains (full
    # fine-tuning), else only reported, unless router_aux_loss_coef says otherwise.
    model.router_aux_loss_coef = (cfg.router_aux_loss_coef if cfg.router_aux_loss_coef is not None
                                  else model.config.router_aux_loss_coef if cfg.adapter == "none" else 0.0)
    fast = rt.device.type == "cuda" if cfg.fast_path == "auto" else bool(cfg.fast_path)
    if fast and rt.device.type != "cuda":
        raise ConfigError("fast_path: true needs a CUDA GPU (FlexAttention has no CPU backward); use auto")
    if cfg.offload_activations and not (cfg.gradient_checkpointing and rt.device.type == "cuda"):
        raise ConfigError("offload_activations: true needs gradient_checkpointing: true and a CUDA GPU")
    one_sample = fast and one_sample_rows(cfg, model.config)
    if fast:  # rows of one sample vary in length: their layers compile for dynamic shapes
        model.use_fast_path(one_sample_rows=one_sample, dynamic=one_sample)
    attention = ("SDPA's causal kernel (rows of one sample), decoder layers compiled for any row length"
                 if one_sample else "FlexAttention block masks, compiled decoder layers")
    echo(f"fast path: {attention}, fused linear cross-entropy"
         if fast else "plain path: SDPA with a dense mask, eager layers, cross-entropy on gathered logits")
    if rt.sharded:
        echo(f"fsdp: {rt.sharding}")
    model.train()
    trainable, total = count_params(model)
    echo(f"device {rt.device}, {'bf16 autocast' if rt.autocast_dtype else 'float32'}; "
         f"{trainable:,} of {total:,} parameters trained ({100 * trainable / total:.2f}%)")

    rows = make_rows(data.train, cfg.sequence_len, cfg.sample_packing)
    val_rows = make_rows(data.val, cfg.sequence_len, cfg.sample_packing) if data.val else []
    padding = row_padding(cfg, fast, one_sample, cfg.micro_batch_size)
    lengths = sample_lengths(data.train)  # the data report already gave the packing's fill

    optimizer = make_optimizer(named, cfg, rt.device)
    out = Path(cfg.output_dir)
    ckpts = CheckpointManager(out, cfg.save_total_limit, echo)
    # group_by_length only matters without packing: packed rows are all padded to sequence_len.
    by_length = cfg.group_by_length and not cfg.sample_packing
    row_lengths = [sum(lengths[i] for i in r) for r in rows] if by_length else None
    stream = RowStream(rows, cfg.seed, rt.rank, rt.world_size, row_lengths, cfg.micro_batch_size)
    guard = StepGuard.from_config(cfg)
    progress = Progress(cfg.micro_batch_size, cfg.gradient_accumulation_steps, rt.world_size)
    fingerprint = data_fingerprint(data.train)

    # Resume: weights, optimizer, data position, guard and progress now; the RNG last, just before the loop.
    resume_from = _resume_checkpoint(cfg, ckpts, fingerprint, force, rt, echo) if cfg.resume else None
    if resume_from is not None:
        resume_from.load_weights(named)
        if spec is not None and spec.init != "kaiming":  # the residual base weights the checkpoint trained on
            restore_lora_init(model, resume_from.path)
        resume_from.load_optimizer(optimizer, named)
        stream.load_state_dict(resume_from.state["data"], resume_from.path / "state.json")
        guard.load_state_dict(resume_from.state["guard"])
        progress = Progress.from_dict(resume_from.state["progress"])
        progress.rescale_to(rt.world_size, resume_from.path, echo)

    # Steps follow the rows per step, which stay the checkpoint's on another number of processes.
    steps_per_epoch = count_steps(len(rows), cfg.micro_batch_size, progress.rows_per_step, 1)
    total_steps = count_steps(len(rows), cfg.micro_batch_size, progress.rows_per_step, cfg.num_epochs, cfg.max_steps)
    warmup = warmup_steps(cfg, total_steps)
    echo(f"{total_steps} optimizer steps ({steps_per_epoch} per epoch), warm-up {warmup}, effective batch "
         f"{progress.rows_per_step} rows" + (f" over {rt.world_size} processes" if rt.distributed else ""))

    # Evaluations read their data now, so that a bad eval: section stops the run before anything is written.
    # With a whole model on each process (ddp) they run on rank 0 alone while the others wait for the outcome
    # (Runtime.on_main, within distributed_timeout); on a sharded one every process runs them in lockstep
    # (each forward pass is collective), rank 0 first reading the data. Rank 0 alone logs and judges them.
    evals: TrainingEvals | None = None
    if cfg.eval.requested:
        def start_evals() -> None:
            nonlocal evals
            evals = TrainingEvals.start(cfg, model, tokenizer, rt.autocast_dtype, out,
                                        lambda d, w: _save(cfg, model, spec, tokenizer, d, model_dir, w), echo,
                                        every=rt.every if rt.sharded else bool)

        (rt.main_first if rt.sharded else rt.on_main)(start_evals)  # an error in the eval: section stops all

    def run_evals(step: int, heldout_loss: float | None) -> str | None:
        """The eval: section at `step`: measured, recorded and judged by rank 0 (measured by every process on
        a sharded model), best/ written when it is the best so far; why to stop early, if early stopping says so."""
        if rt.sharded:
            metrics = evals.measure()
            rt.release_gathered(model)
            outcome = rt.on_main(lambda: evals.record(step, metrics, heldout_loss, log))
        else:
            outcome = rt.on_main(lambda: evals.record(step, evals.measure(), heldout_loss, log))
        if outcome["best"]:
            weights = rt.full_state_dict(model)  # gathered from the shards onto rank 0 (sharded runs)
            rt.on_main(lambda: evals.keep_best(weights))
        return outcome["stop"]
    if rt.is_main:
        target = check_output_dir(cfg)  # again, at the moment it matters
        if cfg.overwrite_output_dir and target.exists():
            shutil.rmtree(target)
        out.mkdir(parents=True, exist_ok=True)
        mark_output(out, "run", run_inputs(cfg))
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
        (out / "data_report.json").write_text(json.dumps(data.report.__dict__, indent=2) + "\n")
        ckpts.clean_partial()
        # The metrics log is the one the checkpoint saw, so a resumed run's log has each step once.
        (out / "metrics.jsonl").write_text(resume_from.metrics_text() if resume_from else "")
        if resume_from is not None:
            _set_aside_newer(ckpts, resume_from, echo)
    hparams = {"total_steps": total_steps, "warmup_steps": warmup, "rows_per_step": progress.rows_per_step,
               "micro_batch_size": progress.micro_batch_size, "world_size": rt.world_size,
               "trainable_params": trainable, "total_params": total, "device": str(rt.device)}
    trackers: list[Trackers] = []  # rank 0's; an error starting one reaches every rank
    rt.on_main(lambda: trackers.append(Trackers.open(
        cfg, out, resume_from.step if resume_from is not None else None,
        run_params(cfg, data.report.__dict__, hparams), run_files(cfg, data.report.__dict__), echo)))
    log = MetricsLog(out, total_steps, enabled=rt.is_main, echo=echo, trackers=trackers[0] if trackers else None)
    if resume_from is not None:
        log.load_window_state(resume_from.state.get("log_window"))
        resume_from.restore_rng(rt.rank, rt.device)
        echo(f"resumed from {resume_from.path} at step {resume_from.step} of {total_steps}")

    def save_checkpoint(step: int, eval_loss_now: float | None) -> Path:
        rank_rng = rt.rank_rng_states()  # every process's generators, collected by rank 0
        state = {
            "progress": progress.to_dict(),
            "data": stream.state_dict(),
            "guard": guard.state_dict(),
            "data_fingerprint": fingerprint,
            "eval_loss": eval_loss_now,  # measured at this step; picks the best checkpoint to keep
            "log_window": log.window_state(),  # the steps the next metrics line averages so far
        }
        write_adapter = None
        if spec is not None:
            base = str(model_dir.resolve()) if model_dir.exists() else cfg.base_model

            def write_adapter(d: Path) -> None:
                save_adapter(model, spec, d, base_model=base)
                save_lora_init(model, d)  # PiSSA / OLoRA: the starting factors, for resume
        shards = None
        if rt.sharded:  # every process writes its shards into the directory rank 0 then completes
            shards = Path(rt.on_main(lambda: str(ckpts.begin(step))))
            save_shards(shards, named, optimizer)

        def write() -> str:
            path = ckpts.save(step, named, optimizer, state, cfg.model_dump(mode="json"), log.path, write_adapter,
                              rank_rng, shards)
            ckpts.prune()
            return str(path)

        return Path(rt.on_main(write))

    flops_tok = flops_per_token(model.config)
    peak_flops = _bf16_peak(rt)
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    # Throughput over the last steps only, so compilation, evaluation and checkpoints do not
    # drag the figure for the rest of the run: (seconds, real tokens) of each recent step.
    recent: collections.deque[tuple[float, int]] = collections.deque(maxlen=10)
    stopped_by, checkpoint_dir, step = None, None, progress.step
    if rt.all_sum([float(stop.requested)])[0]:  # asked to stop while the run loaded: before its first step
        stopped_by = stop.signal_name or "a stop request to another process"
        checkpoint_dir = resume_from.path if resume_from is not None else None
    log.start()
    try:
        if stopped_by is None:
            for step in range(progress.step, total_steps):
                epoch_before = stream.epoch
                window = [stream.next(progress.micro_batch_size) for _ in range(progress.gradient_accumulation_steps)]
                groups = [g for _, g in window]
                lr = cfg.learning_rate * lr_factor(step, total_steps, warmup, cfg.lr_scheduler) * guard.lr_scale
                for group in optimizer.param_groups:
                    group["lr"] = lr * group["lr_scale"]
                step_t = time.perf_counter()
                while True:
                    out_of_memory = False
                    try:
                        batches = [collate(data.train, g, **padding) for g in groups]
                        loss_sum, n_tokens, n_real = accumulate_gradients(model, batches, rt)
                    except OOM_ERRORS:
                        out_of_memory, loss_sum, n_real = True, 0.0, 0
                    # Every process learns whether any ran out of memory or was asked to stop.
                    agreed = rt.sync_step(step + 1, loss_sum, n_real, out_of_memory, stop.requested)
                    if not agreed.out_of_memory:
                        break
                    optimizer.zero_grad(set_to_none=True)
                    free_memory(rt.device)
                    smaller = smaller_micro_batch(progress.micro_batch_size, progress.gradient_accumulation_steps)
                    if not (cfg.auto_micro_batch and smaller):
                        raise OutOfMemory(oom_advice(
                            rt.device, progress.micro_batch_size, progress.gradient_accumulation_steps,
                            cfg.sequence_len, cfg.gradient_checkpointing, cfg.adapter, step))
                    echo(f"out of memory at micro_batch_size {progress.micro_batch_size}; auto_micro_batch: "
                         f"retrying step {step + 1} with micro_batch_size {smaller[0]} x "
                         f"gradient_accumulation_steps {smaller[1]}")
                    progress.micro_batch_size, progress.gradient_accumulation_steps = smaller
                    padding = row_padding(cfg, fast, one_sample, smaller[0])
                    # The same rows, in smaller micro-batches: the step's effective batch is unchanged.
                    groups = [g[i:i + smaller[0]] for g in groups for i in range(0, len(g), smaller[0])]
                outliers = rt.sync_gradients(params, step + 1)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
                loss = agreed.loss_sum / max(n_tokens, 1)
                bad = guard.check(loss, grad_norm)
                if bad is None:  # a bad step leaves weights and optimizer state exactly as they were
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                guard.record(step + 1, loss, grad_norm, bad)
                progress.step, progress.train_loss = step + 1, loss
                progress.tokens_seen += agreed.n_real
                step_s = time.perf_counter() - step_t
                recent.append((step_s, agreed.n_real))
                tok_s = sum(n for _, n in recent) / max(sum(t for t, _ in recent), 1e-9)
                record = {
                    "step": step + 1,
                    "epoch": window[-1][0] + 1,
                    "loss": _finite(loss),
                    "lr": lr,
                    "grad_norm": _finite(grad_norm),
                    "trained_tokens": n_tokens,
                    "tokens_per_s": tok_s,
                    "step_s": step_s,
                    "peak_mem_gib": _peak_memory_gib(rt),
                }
                if peak_flops:
                    record["mfu"] = tok_s * flops_tok / peak_flops
                if rt.device.type == "cuda":
                    record.update(_gpu_utilization(rt))
                if getattr(model, "router_aux_loss", None) is not None:  # its own number, not part of loss
                    record["router_aux_loss"] = _finite(model.router_aux_loss)
                if bad is not None:
                    record["skipped"] = bad
                    echo(f"step {step + 1}: skipped, {bad}")
                if outliers:
                    record["outlier_ranks"] = outliers
                for r in rt.tally_outliers(outliers):
                    echo(f"rank {r} has sent outlier gradients in {REPORT_OUTLIER_AFTER} steps (step {step + 1} "
                         "the latest); check its device. metrics.jsonl names each step's outlier ranks")
                    log.event({"step": step + 1, "event": "outlier_rank", "rank": r})
                log.train_step(record, write=(step + 1) % cfg.logging_steps == 0 or step + 1 == total_steps
                               or bad is not None or bool(outliers))
                if guard.needs_rollback:
                    _roll_back(guard, ckpts, named, optimizer, step + 1, log, out, echo, rt)

                last = step + 1 == total_steps
                scheduled = (last or stream.epoch != epoch_before
                             or bool(cfg.save_steps and (step + 1) % cfg.save_steps == 0))
                # Held-out loss: every eval_steps and at the end; without eval_steps, at each checkpoint
                # (pruning keeps the best). Not at a checkpoint off that grid too, which would evaluate
                # again a step or two after an eval_steps one (an epoch ending at step 26 after eval at 25).
                due = (step + 1) % cfg.eval_steps == 0 if cfg.eval_steps else scheduled
                evaluated = None
                if val_rows and (last or due):
                    evaluated, _ = evaluate(model, data.val, val_rows, cfg, rt, padding)
                    progress.eval_loss = evaluated
                    log.eval(step + 1, evaluated)
                early_stop = None  # why to stop early, when the evaluations say so
                if cfg.eval.requested and TrainingEvals.due(cfg, step + 1, last):
                    early_stop = run_evals(step + 1, evaluated)
                if scheduled or agreed.stop or early_stop:
                    checkpoint_dir = save_checkpoint(step + 1, _finite(evaluated) if evaluated is not None else None)
                if early_stop:
                    echo(f"early stopping at step {step + 1}: {early_stop}")
                    break
                if agreed.stop and not last:
                    stopped_by = stop.signal_name or "a stop request to another process"
                    break
    except OOM_ERRORS:  # outside the retried forward/backward (optimizer state, evaluation): report, no retry
        free_memory(rt.device)
        raise OutOfMemory(oom_advice(rt.device, progress.micro_batch_size, progress.gradient_accumulation_steps,
                                     cfg.sequence_len, cfg.gradient_checkpointing, cfg.adapter, step)) from None
    finally:
        log.close()

    steps_done = progress.step
    if stopped_by is not None:
        saved = f"checkpoint: {checkpoint_dir}" if checkpoint_dir else "no step taken, nothing to save"
        echo(f"stopped by {stopped_by} after step {steps_done} of {total_steps}; {saved}")
        log.finish(None)
        _write_run_report(out, rt, echo)
        return TrainResult(out, None, None, steps_done, progress.train_loss, progress.eval_loss,
                           stopped_by=stopped_by, checkpoint_dir=checkpoint_dir)

    def save_final() -> list[str | None]:
        final = out / ("adapter" if spec else "model")
        try:
            written = _save(cfg, model, spec, tokenizer, final, model_dir, weights)
        except OSError as exc:  # _save removed its temporary directory; the last checkpoint has the result
            raise CheckpointError(f"{final}: could not be written ({exc.strerror or exc}); the trained state is in "
                                  f"{checkpoint_dir}. Free space and run again with resume=auto") from None
        if spec is None:
            return [None, str(written)]
        if merge:
            from ..export.hf import merge_to_dir

            return [str(written), str(merge_to_dir(written, out / "merged", base_model=str(model_dir),
                                                     overwrite=True))]
        return [str(written), None]

    # The stop handler stays on: a SIGTERM now lets the final save finish, and the run ends complete.
    adapter_dir = merged_dir = None
    try:
        weights = rt.full_state_dict(model)  # gathered from the shards onto rank 0 (sharded runs)
        adapter_dir, merged_dir = (Path(p) if p else None for p in rt.on_main(save_final))
    finally:
        log.finish(adapter_dir or merged_dir)
    report = evals.finish(out.name) if evals is not None and rt.is_main else None  # rank 0's
    if stop.requested:
        echo(f"{stop.signal_name} came after the last step: the run is complete")
    _write_run_report(out, rt, echo)
    return TrainResult(out, adapter_dir, merged_dir, steps_done, progress.train_loss, progress.eval_loss,
                       checkpoint_dir=checkpoint_dir, best=evals.best if evals and rt.is_main else None,
                       report=report)


def _write_run_report(out: Path, rt: Runtime, echo) -> None:
    """output_dir/report.html; the trained run stands even when its report cannot be written."""
    def write() -> str:
        try:
            return f"run report: {write_run_report(out)}"
        except (OutputError, OSError) as exc:
            return f"run report not written ({exc}); `mistral-tune report {out}` builds it again"

    echo(rt.on_main(write))


def _roll_back(guard: StepGuard, ckpts: CheckpointManager, named, optimizer, step: int, log: MetricsLog,
               out: Path, echo, rt: Runtime) -> None:
    """Back to the newest valid checkpoint written before the bad streak, with a lower learning rate; the
    data position is kept, so the stretch of data that caused the streak is not met again. Rank 0 picks
    the checkpoint; every process loads it."""
    target = None
    if guard.may_roll_back:
        def newest() -> str | None:
            found, _ = ckpts.newest_valid(before=guard.streak_start, quiet=True)
            return str(found.path) if found else None

        path = rt.on_main(newest)
        target = CheckpointManager.validate(Path(path)) if path else None
    if target is None:
        why = (f"stopped at step {step} after {guard.consecutive} bad steps in a row: "
               + (f"{guard.rollbacks} rollback(s) did not help (bad_step_max_rollbacks: {guard.max_rollbacks})"
                  if not guard.may_roll_back else "no checkpoint from before them to roll back to (set save_steps)"))
        report = guard.report(why)
        if log.enabled:
            details = {"report": report, "events": guard.events}
            (out / "guard_report.json").write_text(json.dumps(details, indent=1) + "\n")
            report += f"; details in {out / 'guard_report.json'}"
        raise TrainingHalted(report)
    target.load_weights(named)
    target.load_optimizer(optimizer, named)
    guard.rolled_back(step, target.step)
    echo(f"step {step}: {guard.rollback_after} bad steps in a row; rolled back to {target.path.name} "
         f"(weights and optimizer state), learning rate now x{guard.lr_scale:g}")
    log.event({"step": step, "event": "rollback", "to_checkpoint": target.path.name, "lr_scale": guard.lr_scale})


def _set_aside_newer(ckpts: CheckpointManager, resumed: Checkpoint, echo) -> None:
    """Checkpoints newer than the one resumed from belong to a future this run will not have (or are
    damaged): rename them so they are neither resumed from nor counted when pruning. Nothing is deleted."""
    for path in ckpts.checkpoints():
        if path.resolve() == resumed.path.resolve() or checkpoint_step(path) <= resumed.step:
            continue
        try:
            CheckpointManager.validate(path)
            why = "superseded"
        except CheckpointError:
            why = "corrupt"
        echo(f"{path.name} is newer than {resumed.path.name}; renamed to {ckpts.set_aside(path, why).name}")


def _resume_checkpoint(cfg: Config, ckpts: CheckpointManager, fingerprint: str, force: bool, rt: Runtime,
                       echo) -> Checkpoint | None:
    """The checkpoint to resume from, found and checked against the run by rank 0, opened by every process."""
    found: list[Checkpoint] = []

    def find() -> str | None:
        ckpt = find_resume_checkpoint(cfg, ckpts, echo)
        if ckpt is None:
            return None
        check_resume_config(ckpt, cfg, fingerprint, force)
        found.append(ckpt)
        return str(ckpt.path)

    path = rt.on_main(find)
    if found or not path:
        return found[0] if found else None
    return CheckpointManager.validate(Path(path))


def find_resume_checkpoint(cfg: Config, ckpts: CheckpointManager, echo) -> Checkpoint | None:
    """The checkpoint `resume` names: auto -> the newest valid one in output_dir (None when there is
    none at all), a checkpoint directory -> it, a run directory -> its newest valid one."""
    if cfg.resume == "auto":
        if not ckpts.checkpoints():
            echo(f"resume: auto: no checkpoint in {ckpts.out}; starting from step 0")
            return None
        ckpt, problems = ckpts.newest_valid()
        if ckpt is None:
            raise CheckpointError(f"resume: auto: no usable checkpoint in {ckpts.out}: " + "; ".join(problems))
        if problems:
            echo(f"resume: auto: falling back to {ckpt.path.name}, the newest valid checkpoint")
        return ckpt
    path = Path(cfg.resume).expanduser()
    if not path.exists():
        raise CheckpointError(f"resume: {path} does not exist")
    if checkpoint_step(path) is not None or (path / MANIFEST).exists():
        return CheckpointManager.validate(path)
    ckpt, problems = CheckpointManager(path, 1, echo).newest_valid()
    if ckpt is None:
        why = (": " + "; ".join(problems)) if problems else ""
        raise CheckpointError(f"resume: {path}: no usable checkpoint{why}")
    return ckpt


# Keys that change how a run is observed or how long it lasts, not the steps it takes. --force accepts
# changes to these only. (max_steps and num_epochs also reshape the learning-rate schedule after the
# resume point; that is the point of changing them.)
SAFE_TO_CHANGE = frozenset({
    "logging_steps", "eval_steps", "eval", "save_steps", "save_total_limit", "max_steps", "num_epochs",
    "auto_micro_batch", "bad_step_zscore", "bad_step_window", "bad_step_rollback_after", "bad_step_lr_factor",
    "bad_step_max_rollbacks", "overlap_gradient_sync", "fsdp_reshard_after_forward", "report_to",
    "mlflow_tracking_uri",
})
# Where the run lives and how it was started say nothing about the steps it takes (a run directory may be moved).
_NOT_COMPARED = frozenset({"resume", "overwrite_output_dir", "output_dir"})


def config_changes(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(key, old, new) of each key whose value differs. A key the saved config lacks (added to the
    config since that run) holds its default there: unchanged when the new value is the default too."""
    keys = sorted((set(old) | set(new)) - _NOT_COMPARED)
    return [(k, old.get(k, "(absent)"), new.get(k, "(absent)")) for k in keys
            if (old[k] if k in old else _default(k)) != new.get(k)]


def _default(key: str) -> object:
    """A config key's default as the saved config (JSON) would hold it; None for a key without one."""
    field = Config.model_fields.get(key)
    if field is None or field.is_required():
        return None
    return TypeAdapter(field.annotation).dump_python(field.get_default(call_default_factory=True), mode="json")


def check_resume_config(ckpt: Checkpoint, cfg: Config, fingerprint: str, force: bool) -> None:
    """Refuse to resume under a different config (or data) unless forced, and then only for safe keys."""
    changes = config_changes(ckpt.config, cfg.model_dump(mode="json"))
    if ckpt.state.get("data_fingerprint") != fingerprint:
        changes.append(("training data", "the checkpoint's", "different tokenized samples"))
    if not changes:
        return
    listing = "; ".join(f"{k}: {o!r} -> {n!r}" for k, o, n in changes)
    safe = ", ".join(sorted(SAFE_TO_CHANGE))
    unsafe = [k for k, _, _ in changes if k not in SAFE_TO_CHANGE]
    where = ckpt.path / "config.json"
    if not force:
        raise ConfigError(f"{where}: the run's config differs from the checkpoint's: {listing}. Resume with the "
                          f"checkpoint's values, or pass --force to accept changes to {safe}")
    if unsafe:
        raise ConfigError(f"{where}: --force accepts changes only to {safe}; these "
                          f"cannot change in a resumed run: {', '.join(unsafe)} ({listing})")


def data_fingerprint(samples) -> str:
    """SHA-256 over the tokenized training samples: a resumed run must see the same data."""
    h = hashlib.sha256()
    for s in samples:
        h.update(array("q", s.tokens).tobytes())
        h.update(array("q", s.labels).tobytes())
        h.update(b"|")
    return h.hexdigest()


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def accumulate_gradients(
    model, batches: list[Batch], rt: Runtime
) -> tuple[float, int, int]:
    """Forward and backward over the micro-batches of one optimizer step, adding into `.grad`.

    Each micro-batch's summed token loss is divided by the trained tokens of the whole window
    (summed over ranks), not averaged per micro-batch, so the accumulated gradient equals that of
    one batch holding every row. Returns (this rank's summed loss, the window's trained tokens over
    all ranks, this rank's real tokens). With several ddp processes the last backward pass starts
    sending the gradients (Runtime.send_during_backward); Runtime.sync_step sends the rest.

    A mixture-of-experts model's router balance loss (models/mistral.py RouterBalance) is measured on
    every micro-batch and left in `model.router_aux_loss` (this rank's mean over its real tokens);
    with `model.router_aux_loss_coef` > 0 its gradient, so weighted, joins the token loss's. The
    returned loss is the token loss alone.
    """
    n_tokens = int(rt.all_sum([sum(b.n_trained for b in batches)])[0])
    loss_sum, n_real, aux_sum, moe = 0.0, 0, 0.0, False
    coef = getattr(model, "router_aux_loss_coef", 0.0)
    for i, batch in enumerate(batches):
        batch = batch.to(rt.device)
        scale = coef * batch.n_trained / max(n_tokens, 1)  # a token-weighted mean over the window, as the loss
        with router_balance(model, batch.seq_ids >= 0, scale) as balance:
            with torch.autocast(rt.device.type, dtype=rt.autocast_dtype, enabled=rt.autocast_dtype is not None):
                loss = token_loss_sum(model, batch)
            if i == len(batches) - 1:  # the gradients are complete in this backward: they travel from inside it
                rt.send_during_backward()
            (loss / max(n_tokens, 1)).backward()
        loss_sum += float(loss.detach())
        n_real += batch.n_real
        if balance is not None and batch.n_real:
            moe, aux_sum = True, aux_sum + float(balance.loss()) * batch.n_real
    model.router_aux_loss = aux_sum / max(n_real, 1) if moe else None
    return loss_sum, n_tokens, n_real


def _save(cfg: Config, model, spec: LoraSpec | None, tokenizer, final: Path, model_dir: Path,
          weights: dict[str, torch.Tensor] | None = None) -> Path:
    def write(tmp: Path) -> None:
        if spec is not None:
            base = str(model_dir.resolve()) if model_dir.exists() else cfg.base_model
            save_adapter(model, spec, tmp, base_model=base)
            tokenizer.save(tmp)
        else:  # a model directory like a merge's: transformers, vLLM and our tools load it as it is
            from ..export.hf import write_hf_model

            write_hf_model(model, tokenizer, tmp,
                           dtype="bfloat16" if model.lm_head.weight.dtype == torch.bfloat16 else "float32",
                           state=weights)

    return replace_dir(final, write, "adapter" if spec is not None else "model", [model_dir])
