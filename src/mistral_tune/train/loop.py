"""The training run, top to bottom: check inputs, build, loop, evaluate, save.

Everything a user can get wrong (config, model path, tokenizer, data) is checked before anything
is written, so a bad run leaves no output directory behind. Final artifacts are written to a
temporary directory and renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from ..chat import load_tokenizer
from ..config import Config
from ..data.build import Dataset, build_dataset
from ..data.pack import Batch, collate, group_rows, make_rows
from ..errors import ConfigError, ModelError
from ..lora import LoraSpec, apply_lora, save_adapter
from ..models.load import load_model, read_config, resolve_model_dir, save_model
from ..models.mistral import count_params, flops_per_token
from .logs import MetricsLog
from .optim import lr_factor, make_optimizer, token_loss_sum, warmup_steps


@dataclass
class Runtime:
    """Where this process runs; multi-process launchers set RANK/WORLD_SIZE."""

    device: torch.device
    autocast_dtype: torch.dtype | None
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def detect(cls, cfg: Config) -> Runtime:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            bf16_ok = torch.cuda.is_bf16_supported()
            use_bf16 = bf16_ok if cfg.bf16 == "auto" else bool(cfg.bf16)
            if use_bf16 and not bf16_ok:
                raise ConfigError("bf16: true but this GPU does not support bfloat16; set bf16: false")
            return cls(device, torch.bfloat16 if use_bf16 else None, rank, world)
        # CPU: float32 throughout (bf16 autocast on CPU is slow and changes the numbers).
        return cls(torch.device("cpu"), None, rank, world)


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path | None
    model_dir: Path | None
    steps: int
    final_train_loss: float
    eval_loss: float | None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def check_output_dir(cfg: Config) -> None:
    """Refuse to reuse a non-empty output_dir unless asked, and never to wipe one that holds inputs."""
    out = Path(cfg.output_dir).resolve()
    if not (out.exists() and any(out.iterdir())):
        return
    if not cfg.overwrite_output_dir:
        raise ConfigError(
            f"output_dir: {cfg.output_dir} exists and is not empty; choose another or set overwrite_output_dir: true"
        )
    inputs = [Path(ds.path) for ds in cfg.datasets] + [Path(cfg.base_model), Path.cwd()]
    if cfg.tokenizer:
        inputs.append(Path(cfg.tokenizer))
    for path in inputs:
        path = path.expanduser().resolve()
        if path == out or out in path.parents:
            raise ConfigError(
                f"output_dir: {cfg.output_dir} contains {path}; overwrite_output_dir would delete it. "
                "Choose an output_dir of its own"
            )


def prepare(cfg: Config, check_output: bool = True):
    """Load and check tokenizer, model and data. Writes nothing.

    Cheap checks come first (config.json, tokenizer, data) so a bad dataset is reported before
    gigabytes of weights are read.
    """
    if check_output:
        check_output_dir(cfg)
    rt = Runtime.detect(cfg)
    model_dir = resolve_model_dir(cfg.base_model)
    model_cfg = read_config(model_dir)
    tokenizer = load_tokenizer(cfg.tokenizer, model_dir)
    if tokenizer.vocab_size != model_cfg.vocab_size:
        raise ModelError(
            f"tokenizer {tokenizer.source_file.name} has {tokenizer.vocab_size} tokens but the model's "
            f"embedding has {model_cfg.vocab_size} rows; pick the tokenizer that matches the model "
            "(v1: 32000, v3/v7: 32768, tekken: 131072)"
        )
    data = build_dataset(cfg, tokenizer)
    weights_dtype = rt.autocast_dtype if (rt.autocast_dtype and cfg.adapter == "lora") else torch.float32
    model, _ = load_model(str(model_dir), dtype=weights_dtype, device=rt.device)
    return rt, model_dir, tokenizer, model, data


def row_padding(cfg: Config, fast: bool) -> dict:
    """How collate pads rows: packed rows to sequence_len. Compiled layers recompile for every new
    row length, so on the fast path unpacked rows round up to a quarter of sequence_len (at most
    four shapes); the plain path pads to the longest row only."""
    if cfg.sample_packing:
        return {"pad_to": cfg.sequence_len}
    return {"pad_multiple": max(128, cfg.sequence_len // 4) if fast else 1}


def evaluate(model, samples, rows, cfg: Config, rt: Runtime, padding: dict | None = None) -> tuple[float, int]:
    """Token-weighted mean loss over held-out rows, and the number of tokens it covers."""
    model.eval()
    total, count = 0.0, 0
    for group in group_rows(rows, cfg.micro_batch_size, None):
        batch = collate(samples, group, **(padding or row_padding(cfg, False))).to(rt.device)
        with torch.autocast(rt.device.type, dtype=rt.autocast_dtype, enabled=rt.autocast_dtype is not None):
            total += float(token_loss_sum(model, batch))
        count += batch.n_trained
    model.train()
    return total / max(count, 1), count


def _peak_memory_gib(rt: Runtime) -> float:
    if rt.device.type == "cuda":
        return torch.cuda.max_memory_allocated(rt.device) / 1024**3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # kB -> GiB (Linux)


def _atomic_dir(final: Path, write) -> Path:
    """Call write(tmp_dir), then move tmp_dir to final, replacing what was there."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def train(cfg: Config, echo=print, merge: bool = False) -> TrainResult:
    rt, model_dir, tokenizer, model, data = prepare(cfg)
    for line in data.report.lines():
        echo(line)
    return run_training(cfg, rt, model_dir, tokenizer, model, data, echo, merge)


def run_training(cfg: Config, rt: Runtime, model_dir: Path, tokenizer, model, data: Dataset,
                 echo=print, merge: bool = False) -> TrainResult:
    seed_everything(cfg.seed)
    spec = None
    if cfg.adapter == "lora":
        spec = LoraSpec(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, list(cfg.lora_target_modules), cfg.use_rslora)
        apply_lora(model, spec, seed=cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # trainable weights stay float32 even when the frozen base is bf16
        p.data = p.data.float()
    model.gradient_checkpointing = cfg.gradient_checkpointing
    fast = rt.device.type == "cuda" if cfg.fast_path == "auto" else bool(cfg.fast_path)
    if fast and rt.device.type != "cuda":
        raise ConfigError("fast_path: true needs a CUDA GPU (FlexAttention has no CPU backward); use auto")
    if cfg.offload_activations and not (cfg.gradient_checkpointing and rt.device.type == "cuda"):
        raise ConfigError("offload_activations: true needs gradient_checkpointing: true and a CUDA GPU")
    if fast:
        model.use_fast_path()
    echo("fast path: FlexAttention block masks, compiled decoder layers, fused linear cross-entropy"
         if fast else "plain path: SDPA with a dense mask, eager layers, cross-entropy on gathered logits")
    model.train()
    trainable, total = count_params(model)
    echo(f"device {rt.device}, {'bf16 autocast' if rt.autocast_dtype else 'float32'}; "
         f"{trainable:,} of {total:,} parameters trained ({100 * trainable / total:.2f}%)")

    rows = make_rows(data.train, cfg.sequence_len, cfg.sample_packing)
    val_rows = make_rows(data.val, cfg.sequence_len, cfg.sample_packing) if data.val else []
    padding = row_padding(cfg, fast)
    micro_per_epoch = math.ceil(len(rows) / cfg.micro_batch_size)
    micro_per_epoch_rank = math.ceil(micro_per_epoch / rt.world_size)
    steps_per_epoch = max(1, micro_per_epoch_rank // cfg.gradient_accumulation_steps)
    total_steps = cfg.max_steps or max(1, math.ceil(steps_per_epoch * cfg.num_epochs))
    warmup = warmup_steps(cfg, total_steps)
    if cfg.sample_packing:
        fill = sum(len(s) for s in data.train) / max(1, len(rows) * cfg.sequence_len)
        echo(f"packed {len(data.train)} samples into {len(rows)} rows of {cfg.sequence_len} tokens "
             f"({100 * fill:.1f}% real tokens)")
    echo(f"{total_steps} optimizer steps ({steps_per_epoch} per epoch), warm-up {warmup}, "
         f"effective batch {cfg.micro_batch_size * cfg.gradient_accumulation_steps * rt.world_size} rows")

    optimizer = make_optimizer(params, cfg, rt.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, cfg.lr_scheduler)
    )
    out = Path(cfg.output_dir)
    if rt.is_main:
        if out.exists() and cfg.overwrite_output_dir:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
        (out / "data_report.json").write_text(json.dumps(data.report.__dict__, indent=2) + "\n")
    log = MetricsLog(out, total_steps, enabled=rt.is_main, echo=echo)

    def micro_batches():
        epoch = 0
        while True:
            groups = group_rows(rows, cfg.micro_batch_size, cfg.seed + epoch)
            for k in range(rt.rank, len(groups), rt.world_size):  # shard by rank
                yield epoch, groups[k]
            epoch += 1

    stream = micro_batches()
    flops_tok = flops_per_token(model.config)
    eval_loss = None
    last_loss = float("nan")
    t0 = time.perf_counter()
    tokens_seen = 0
    log.start()
    for step in range(total_steps):
        window = [next(stream) for _ in range(cfg.gradient_accumulation_steps)]
        batches = [collate(data.train, g, **padding) for _, g in window]
        step_t = time.perf_counter()
        loss_sum, n_tokens, n_real = accumulate_gradients(model, batches, rt, cfg.offload_activations)
        tokens_seen += n_real
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        last_loss = _all_reduce_sum(loss_sum, rt) / max(n_tokens, 1)
        elapsed = time.perf_counter() - t0
        tok_s = tokens_seen * rt.world_size / max(elapsed, 1e-9)
        record = {
            "step": step + 1,
            "epoch": window[-1][0] + 1,
            "loss": last_loss,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "trained_tokens": n_tokens,
            "tokens_per_s": tok_s,
            "step_s": time.perf_counter() - step_t,
            "peak_mem_gib": _peak_memory_gib(rt),
        }
        if rt.device.type == "cuda":
            record["mfu"] = tok_s * flops_tok / 989e12
        log.train_step(record, write=(step + 1) % cfg.logging_steps == 0 or step + 1 == total_steps)
        if val_rows and cfg.eval_steps and (step + 1) % cfg.eval_steps == 0 and step + 1 < total_steps:
            eval_loss, _ = evaluate(model, data.val, val_rows, cfg, rt, padding)
            log.eval(step + 1, eval_loss)
        if rt.is_main and cfg.save_steps and (step + 1) % cfg.save_steps == 0 and step + 1 < total_steps:
            _save(cfg, model, spec, tokenizer, out / f"checkpoint-{step + 1}", model_dir)
    if val_rows:
        eval_loss, _ = evaluate(model, data.val, val_rows, cfg, rt, padding)
        log.eval(total_steps, eval_loss)
    log.close()

    adapter_dir = merged_dir = None
    if rt.is_main:
        adapter_dir = _save(cfg, model, spec, tokenizer, out / ("adapter" if spec else "model"), model_dir)
        if spec is None:
            adapter_dir, merged_dir = None, adapter_dir
        elif merge:
            from ..export.hf import merge_to_dir

            merged_dir = merge_to_dir(adapter_dir, out / "merged", base_model=str(model_dir))
    return TrainResult(out, adapter_dir, merged_dir, total_steps, last_loss, eval_loss)


def accumulate_gradients(
    model, batches: list[Batch], rt: Runtime, offload: bool = False
) -> tuple[float, float, int]:
    """Forward and backward over the micro-batches of one optimizer step, adding into `.grad`.

    Each micro-batch's summed token loss is divided by the trained tokens of the whole window
    (summed over ranks), not averaged per micro-batch, so the accumulated gradient equals that of
    one batch holding every row. Returns (this rank's summed loss, the window's trained tokens over
    all ranks, this rank's real tokens).
    """
    n_tokens = _all_reduce_sum(sum(b.n_trained for b in batches), rt)
    loss_sum, n_real = 0.0, 0
    for batch in batches:
        batch = batch.to(rt.device)
        # Offloading moves what autograd saves (with checkpointing: each layer's input) to pinned
        # CPU memory and back for backward.
        with (torch.autocast(rt.device.type, dtype=rt.autocast_dtype, enabled=rt.autocast_dtype is not None),
              torch.autograd.graph.save_on_cpu(pin_memory=True) if offload else contextlib.nullcontext()):
            loss = token_loss_sum(model, batch)
        (loss / max(n_tokens, 1)).backward()
        loss_sum += float(loss.detach())
        n_real += batch.n_real
    return loss_sum, n_tokens, n_real


def _all_reduce_sum(value: float, rt: Runtime) -> float:
    if rt.world_size == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=rt.device)
    dist.all_reduce(t)
    return float(t.item())


def _save(cfg: Config, model, spec: LoraSpec | None, tokenizer, final: Path, model_dir: Path) -> Path:
    def write(tmp: Path) -> None:
        if spec is not None:
            base = str(model_dir.resolve()) if model_dir.exists() else cfg.base_model
            save_adapter(model, spec, tmp, base_model=base)
        else:
            save_model(model, tmp, dtype="bfloat16" if model.lm_head.weight.dtype == torch.bfloat16 else "float32")
        tokenizer.save(tmp)

    return _atomic_dir(final, write)
