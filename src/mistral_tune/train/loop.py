"""The training run, top to bottom: prepare (check inputs, load), then run_training's four phases,
TrainingRun.build, open, steps and finish (adapters and options; resume, outputs and trackers; the
optimizer steps with their evaluations and checkpoints; the final adapter or model). The row stream
and step arithmetic live in schedule.py, resuming and rolling back in resume.py, the lints in
lints.py; the loss is the model's (MistralForCausalLM.batch_loss).

Everything a user can get wrong (config, model path, tokenizer, data) is checked before anything
is written, so a bad run leaves no output directory behind. Final artifacts are written to a
temporary directory and renamed into place. What makes a run survive (exact resume, stop on
SIGTERM/SIGINT, the bad-step guard, out-of-memory handling) is called from the loop in plain sight;
docs/reliability.md lists the guarantees and the tests that prove them.
"""

from __future__ import annotations

import collections
import json
import math
import random
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from ..chat import load_tokenizer
from ..config import ALL_PROJECTIONS, Config
from ..data.build import Dataset, build_dataset
from ..data.pack import Batch, collate, group_rows, make_rows, sample_lengths
from ..data.preference import build_preference_dataset, unit_rows
from ..data.prompts import build_prompt_dataset
from ..errors import CheckpointError, ConfigError, ModelError, OutOfMemory, OutputError
from ..evaluate.preference import PreferenceEval, judged_right, prefers_chosen, sample_logprobs
from ..evaluate.report import REPORT_JSON
from ..evaluate.run import TrainingEvals
from ..export.card import write_run_cards
from ..fsutil import atomic_write_text, check_target, mark_output, replace_dir
from ..models.fp8 import check_fp8_device, fp8_model
from ..models.load import is_bnb_4bit, load_model, read_config, resolve_model_dir
from ..models.lora import WHOLE_MODULES, LoraSpec, apply_lora, lora_init_tensors
from ..models.peft_format import restore_lora_init, save_adapter, save_lora_init
from ..models.quant import quantize_model
from ..models.stats import count_params, flops_per_token
from .checkpoint import Checkpoint, CheckpointManager, save_shards
from .gpus import find_gpu
from .guard import StepGuard
from .init_from import init_adapter_dir, load_init_adapter
from .lints import model_fit_warnings
from .logs import MetricsLog
from .objectives import NEEDS_REFERENCE, unit_objective
from .oom import OOM_ERRORS, free_memory, oom_advice, smaller_micro_batch
from .optim import eight_bit_adamw, lr_factor, make_optimizer, warmup_steps
from .report import record_session, write_run_report
from .resume import data_fingerprint, resume_checkpoint, roll_back, set_aside_newer
from .rl import GRPO
from .runtime import REPORT_OUTLIER_AFTER, Runtime
from .schedule import Progress, RowStream, count_steps, finite, one_sample_rows, row_padding
from .signals import StopRequest
from .trackers import FAILED, STOPPED, Trackers, check_trackers, run_files, run_params


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

    @property
    def metrics(self) -> list[dict]:
        """metrics.jsonl's records: a line per logged step, held-out loss and evaluation."""
        lines = (self.output_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    @property
    def evaluation(self) -> dict | None:
        """The last evaluation report (eval/eval_report.json: base vs tuned per metric), if the run has one."""
        path = self.output_dir / "eval" / REPORT_JSON
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None






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
    return [ds.path for ds in [*cfg.datasets, *cfg.val_datasets]] + [cfg.base_model, cfg.tokenizer, cfg.init_from]






def prepare(cfg: Config, check_output: bool = True):
    """Load and check tokenizer, model and data. Writes nothing.

    Cheap checks come first (config.json, tokenizer, data) so a bad dataset is reported before
    gigabytes of weights are read.
    """
    if check_output:
        check_output_dir(cfg)
    check_trackers(cfg)  # the package and settings of each tracker, before anything loads
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
    targets = list(model_cfg.family.default_targets)
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
    if cfg.init_from is not None:
        init_adapter_dir(cfg, model_dir)  # a mismatch is reported before the data is read
    build = {"sft": build_dataset, "grpo": build_prompt_dataset}.get(cfg.method, build_preference_dataset)
    data = main_first(lambda: build(cfg, tokenizer))
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
            loss = float(model.token_loss(batch))
        if group is not None:
            total, count = total + loss, count + batch.n_trained
    rt.release_gathered(model)
    model.train()
    total, count = rt.all_sum([total, count])
    return total / max(count, 1), int(count)


def _bf16_peak(rt: Runtime) -> float | None:
    """This GPU's dense bf16 peak (FLOP/s) from the GPU table (gpus.py), for the step lines' MFU; None on a CPU or
    a GPU the table does not know (no MFU then, rather than one against another GPU's peak)."""
    if rt.device.type != "cuda":
        return None
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
    """Train `model` (as prepare loaded it) on `data` as cfg says, in four phases, each a method of
    TrainingRun below: build (adapters, the model's options, rows, optimizer), open (resume, the output
    directory, trackers, the metrics log), steps (the optimizer steps with their evaluations and
    checkpoints) and finish (the final adapter or model, the reports). merge: also write the merged
    model; force: resume even though safe keys (SAFE_TO_CHANGE) differ; stop: the stop requests to
    honour (SIGTERM/SIGINT from here on when None)."""
    if stop is None:  # stop requests are read from here on
        with StopRequest() as stop:
            return run_training(cfg, rt, model_dir, tokenizer, model, data, echo, merge, force, stop)
    seed_everything(cfg.seed)
    run = TrainingRun(cfg, rt, model_dir, tokenizer, model, data, echo)
    run.build()
    try:
        run.open(force)
        run.steps(stop)
        return run.finish(merge, stop)
    except BaseException:  # the trackers' runs end as failed, whatever phase raised (a no-op once closed)
        if run.log is not None:
            run.log.finish(status=FAILED)
        raise


class TrainingRun:
    """One run's state, shared by its phases (run_training calls them in order)."""

    def __init__(self, cfg: Config, rt: Runtime, model_dir: Path, tokenizer, model, data: Dataset, echo) -> None:
        self.cfg, self.rt, self.model_dir, self.tokenizer = cfg, rt, model_dir, tokenizer
        self.model, self.data, self.echo = model, data, echo
        self.out = Path(cfg.output_dir)
        self.spec: LoraSpec | None = None
        self.evals: TrainingEvals | None = None
        self.resume_from: Checkpoint | None = None
        self.stopped_by: str | None = None
        self.checkpoint_dir: Path | None = None  # the last checkpoint written
        self.log: MetricsLog | None = None  # open makes it, with the trackers

    # ------------------------------------------------------------------ phase 1: build
    def build(self) -> None:
        """Adapters on the model, its options set from the config, the rows, the optimizer."""
        cfg, rt, model, echo = self.cfg, self.rt, self.model, self.echo
        self.preference = cfg.method not in ("sft", "grpo")
        self.grpo = cfg.method == "grpo"
        if self.grpo:  # a row is one prompt; no held-out loss (held-out reward instead: GRPO.evaluate)
            self.rows, self.val_rows = [[i] for i in range(len(self.data.train))], []
        if self.preference:
            self.rows = unit_rows(self.data.train, cfg.sequence_len, cfg.sample_packing)
            self.val_rows = unit_rows(self.data.val, cfg.sequence_len, cfg.sample_packing) if self.data.val else []
            if cfg.init_from is None:  # the base is the starting model: measured before PiSSA / OLoRA change it
                self._measure_reference()
        self.spec = self._apply_adapters()
        self.named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.params = list(self.named.values())
        for p in self.params:  # trainable weights stay float32 even when the frozen base is bf16
            p.data = p.data.float()
        if cfg.init_from is not None:  # the earlier run's adapter, then the reference: the model it makes
            adapter = init_adapter_dir(cfg, self.model_dir)
            load_init_adapter(model, self.named, adapter)
            echo(f"init_from: the adapter starts as {adapter}")
            if self.preference:
                self._measure_reference()
        rt.broadcast_parameters(self.params + lora_init_tensors(model))  # the replicas start equal
        rt.track_gradients(self.named)
        if rt.rank:
            torch.manual_seed(cfg.seed + rt.rank)  # dropout draws its own masks on each process
        if rt.model_hook is not None:  # the fault injector (a test tool): its memory fault, and what it injects
            echo(rt.model_hook(model))
        self.fast = rt.device.type == "cuda" if cfg.fast_path == "auto" else bool(cfg.fast_path)
        if self.fast and rt.device.type != "cuda":
            raise ConfigError("fast_path: true needs a CUDA GPU (FlexAttention has no CPU backward); use auto")
        if cfg.offload_activations and not (cfg.gradient_checkpointing and rt.device.type == "cuda"):
            raise ConfigError("offload_activations: true needs gradient_checkpointing: true and a CUDA GPU")
        # a preference row holds whole units: two samples at least
        self.one_sample = self.fast and not self.preference and one_sample_rows(cfg, model.config)
        model.configure(**model_options(cfg, model.config))
        if self.fast:  # rows of one sample vary in length: their layers compile for dynamic shapes
            model.use_fast_path(one_sample_rows=self.one_sample, dynamic=self.one_sample)
        attention = ("SDPA's causal kernel (rows of one sample), decoder layers compiled for any row length"
                     if self.one_sample else "FlexAttention block masks, compiled decoder layers")
        echo(f"fast path: {attention}, fused linear cross-entropy"
             if self.fast else "plain path: SDPA with a dense mask, eager layers, cross-entropy on gathered logits")
        if rt.sharded:
            echo(f"fsdp: {rt.sharding}")
        model.train()
        self.trainable, self.total = count_params(model)
        echo(f"device {rt.device}, {'bf16 autocast' if rt.autocast_dtype else 'float32'}; "
             f"{self.trainable:,} of {self.total:,} parameters trained ({100 * self.trainable / self.total:.2f}%)")

        if self.grpo:
            self.rl = GRPO(cfg, rt, model, self.tokenizer, self.data, echo, self.out)
        elif not self.preference:
            self.rows = make_rows(self.data.train, cfg.sequence_len, cfg.sample_packing)
            self.val_rows = make_rows(self.data.val, cfg.sequence_len, cfg.sample_packing) if self.data.val else []
        self.padding = self._row_padding(cfg.micro_batch_size)
        self.optimizer = make_optimizer(self.named, cfg, rt.device)

    def _row_padding(self, micro_batch_size: int) -> dict:
        """schedule.row_padding; a preference row holds up to 2 x sequence_len tokens (data/preference.py)."""
        padding = row_padding(self.cfg, self.fast, self.one_sample, micro_batch_size)
        if self.preference and "pad_to" in padding:
            padding["pad_to"] = 2 * self.cfg.sequence_len
        return padding

    def _measure_reference(self) -> None:
        """The reference model's log-probability of every preference sample (train and held out), taken
        with the starting weights: one forward pass over the data, 4 bytes a sample, no second model. It
        is taken again, from the same weights, when a run resumes. The starting model is the base, measured
        before any adapter exists (with lora_init pissa / olora the base weights change once the adapter
        is made, so the adapter switched off would not be the starting model), or with init_from the base
        with that run's adapter, measured once it is loaded. The same for full fine-tuning. ORPO and SimPO
        have no reference: the held-out accuracy's is still measured."""
        cfg, rt = self.cfg, self.rt
        began = time.perf_counter()
        self.ref = {}
        for name, samples, rows in (("train", self.data.train, self.rows), ("val", self.data.val, self.val_rows)):
            if name == "train" and cfg.method not in NEEDS_REFERENCE:
                continue
            self.ref[name] = sample_logprobs(self.model, samples, rows, cfg.micro_batch_size, rt.device,
                                             rt.autocast_dtype)[0] if rows else torch.zeros(0)
        self.echo(f"method {cfg.method}: reference log-probabilities of {sum(len(v) for v in self.ref.values())} "
                  f"samples measured with the starting weights{' (init_from)' if cfg.init_from else ''} "
                  f"({time.perf_counter() - began:.1f} s)")

    def _apply_adapters(self) -> LoraSpec | None:
        """LoRA (and trainable rows for new special tokens) as the config asks; None for full fine-tuning."""
        cfg, tokenizer, echo = self.cfg, self.tokenizer, self.echo
        if cfg.new_special_tokens:
            echo("new special tokens: " + ", ".join(f"{n} = id {tokenizer.added[n]}" for n in cfg.new_special_tokens)
                 + " (reserved control-token slots); their embedding and lm_head rows train")
        if cfg.adapter not in ("lora", "qlora"):
            return None
        new_ids = sorted(tokenizer.added[n] for n in cfg.new_special_tokens)
        rows = {m: new_ids for m in WHOLE_MODULES if new_ids and m not in cfg.lora_modules_to_save}
        spec = LoraSpec(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, list(cfg.lora_target_modules), cfg.use_rslora,
                        cfg.use_dora, list(cfg.lora_modules_to_save), rows, cfg.lora_init)
        began = time.perf_counter()
        # PiSSA / OLoRA change the base weights here, before compiling
        wrapped = apply_lora(self.model, spec, seed=cfg.seed)
        if spec.init != "kaiming":
            echo(f"lora_init {spec.init}: {len(wrapped)} adapters start from their base weights, which now hold "
                 f"the residual ({time.perf_counter() - began:.1f} s)")
        return spec

    # ------------------------------------------------------------------ phase 2: open
    def open(self, force: bool) -> None:
        """The run's position (fresh or resumed), its step count, the evaluations, the output directory,
        the trackers and the metrics log. Nothing is written before every input has been read."""
        cfg, rt, echo = self.cfg, self.rt, self.echo
        self.ckpts = CheckpointManager(self.out, cfg.save_total_limit, echo)
        # group_by_length only matters without packing: packed rows are all padded to sequence_len.
        lengths = sample_lengths(self.data.train)  # the data report already gave the packing's fill
        by_length = cfg.group_by_length and not cfg.sample_packing
        row_lengths = [sum(lengths[i] for i in r) for r in self.rows] if by_length else None
        self.stream = RowStream(self.rows, cfg.seed, rt.rank, rt.world_size, row_lengths, cfg.micro_batch_size)
        self.guard = StepGuard.from_config(cfg)
        self.progress = Progress(cfg.micro_batch_size, cfg.gradient_accumulation_steps, rt.world_size)
        self.fingerprint = data_fingerprint(self.data.train)

        # Resume: weights, optimizer, data position, guard and progress now; the RNG last, just before the loop.
        resume_from = resume_checkpoint(cfg, self.ckpts, self.fingerprint, force, rt, echo) if cfg.resume else None
        self.resume_from = resume_from
        if resume_from is not None:
            resume_from.load_weights(self.named)
            if self.spec is not None and self.spec.init != "kaiming":  # the residual base weights it trained on
                restore_lora_init(self.model, resume_from.path)
            resume_from.load_optimizer(self.optimizer, self.named)
            self.stream.load_state_dict(resume_from.state["data"], resume_from.path / "state.json")
            self.guard.load_state_dict(resume_from.state["guard"])
            self.progress = Progress.from_dict(resume_from.state["progress"])
            self.progress.rescale_to(rt.world_size, resume_from.path, echo)
            if self.grpo:  # the rollout still in use (num_iterations > 1)
                self.rl.load_state_dict(resume_from.state.get("grpo"))

        # Steps follow the rows per step, which stay the checkpoint's on another number of processes.
        rows_per_step = self.progress.rows_per_step
        steps_per_epoch = count_steps(len(self.rows), cfg.micro_batch_size, rows_per_step, 1)
        self.total_steps = count_steps(len(self.rows), cfg.micro_batch_size, rows_per_step, cfg.num_epochs,
                                       cfg.max_steps)
        if self.grpo and not cfg.max_steps:  # each rollout serves num_iterations steps
            self.total_steps *= cfg.grpo.num_iterations
        self.warmup = warmup_steps(cfg, self.total_steps)
        echo(f"{self.total_steps} optimizer steps ({steps_per_epoch} per epoch), warm-up {self.warmup}, effective "
             f"batch {rows_per_step} rows" + (f" over {rt.world_size} processes" if rt.distributed else ""))

        # Evaluations read their data now, so that a bad eval: section stops the run before anything is
        # written. With a whole model on each process (ddp) they run on rank 0 alone while the others wait
        # for the outcome (Runtime.on_main, within distributed_timeout); on a sharded one every process runs
        # them in lockstep (each forward pass is collective), rank 0 first reading the data. Rank 0 alone
        # logs and judges them.
        if cfg.eval.requested:
            (rt.main_first if rt.sharded else rt.on_main)(self._start_evals)  # an error in eval: stops all
        if rt.is_main:
            self._write_run_start()
        hparams = {"total_steps": self.total_steps, "warmup_steps": self.warmup, "rows_per_step": rows_per_step,
                   "micro_batch_size": self.progress.micro_batch_size, "world_size": rt.world_size,
                   "trainable_params": self.trainable, "total_params": self.total, "device": str(rt.device)}
        trackers: list[Trackers] = []  # rank 0's; one that cannot start is reported and left out
        report = self.data.report.__dict__
        rt.on_main(lambda: trackers.append(Trackers.open(
            cfg, self.out, resume_from.step if resume_from is not None else None,
            run_params(cfg, report, hparams), run_files(cfg, report), echo)))
        self.log = MetricsLog(self.out, self.total_steps, enabled=rt.is_main, echo=echo,
                              trackers=trackers[0] if trackers else None)
        if resume_from is not None:
            self.log.load_window_state(resume_from.state.get("log_window"))
            resume_from.restore_rng(rt.rank, rt.device)
            echo(f"resumed from {resume_from.path} at step {resume_from.step} of {self.total_steps}")

    def _start_evals(self) -> None:
        extra = []
        if self.preference and self.val_rows:  # the held-out pairs' accuracy, beside the eval: section's
            extra.append(PreferenceEval(self.data.val, self.val_rows, self.cfg.micro_batch_size, self.ref["val"],
                                        self.data.val_labels or None, self.padding))
        self.evals = TrainingEvals.start(
            self.cfg, self.model, self.tokenizer, self.rt.autocast_dtype, self.out,
            lambda d, w: _save(self.cfg, self.model, self.spec, self.tokenizer, d, self.model_dir, w), self.echo,
            every=self.rt.every if self.rt.sharded else bool, extra=extra)

    def _write_run_start(self) -> None:
        """Rank 0 makes the output directory: the config, the data report, an empty (or the resumed
        checkpoint's) metrics log; checkpoints newer than the resumed one are set aside."""
        cfg, out = self.cfg, self.out
        target = check_output_dir(cfg)  # again, at the moment it matters
        if cfg.overwrite_output_dir and target.exists():
            shutil.rmtree(target)
        out.mkdir(parents=True, exist_ok=True)
        mark_output(out, "run", run_inputs(cfg))
        atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.model_dump(), sort_keys=False))
        atomic_write_text(out / "data_report.json", json.dumps(self.data.report.__dict__, indent=2) + "\n")
        self.ckpts.clean_partial()
        # The metrics log is the one the checkpoint saw, so a resumed run's log has each step once.
        (out / "metrics.jsonl").write_text(self.resume_from.metrics_text() if self.resume_from else "")
        if self.resume_from is not None:
            set_aside_newer(self.ckpts, self.resume_from, self.echo)
        device = torch.cuda.get_device_name(self.rt.device) if self.rt.device.type == "cuda" else "CPU"
        record_session(out, device=device, processes=self.rt.world_size,
                       resumed_from=self.resume_from.step if self.resume_from else None)

    # ------------------------------------------------------------------ phase 3: steps
    def steps(self, stop: StopRequest) -> None:
        """The optimizer steps from the run's position to total_steps, each followed by what is due:
        the metrics line, a roll-back, the held-out loss, the eval: section, a checkpoint; ends early
        on a stop request (all processes agree on it) or when early stopping says so."""
        cfg, rt, progress = self.cfg, self.rt, self.progress
        self.flops_tok = flops_per_token(self.model.config)
        self.peak_flops = _bf16_peak(rt)
        # Throughput over the last steps only, so compilation, evaluation and checkpoints do not
        # drag the figure for the rest of the run: (seconds, real tokens) of each recent step.
        self.recent: collections.deque[tuple[float, int]] = collections.deque(maxlen=10)
        self.step = progress.step  # the step under way (0-based)
        if rt.all_sum([float(stop.requested)])[0]:  # asked to stop while the run loaded: before its first step
            self.stopped_by = stop.signal_name or "a stop request to another process"
            self.checkpoint_dir = self.resume_from.path if self.resume_from is not None else None
        self.log.start()
        try:
            if self.grpo and self.resume_from is None and self.stopped_by is None:  # where the reward starts
                self.rl.evaluate(0, self.log)
            if self.stopped_by is None:
                for step in range(progress.step, self.total_steps):
                    self.step = step
                    epoch_before = self.stream.epoch
                    agreed = self._step(step, stop)
                    last = step + 1 == self.total_steps
                    scheduled = (last or self.stream.epoch != epoch_before
                                 or bool(cfg.save_steps and (step + 1) % cfg.save_steps == 0))
                    # Held-out loss: every eval_steps and at the end; without eval_steps, at each checkpoint
                    # (pruning keeps the best). Not at a checkpoint off that grid too, which would evaluate
                    # again a step or two after an eval_steps one (an epoch ending at step 26 after eval at 25).
                    due = (step + 1) % cfg.eval_steps == 0 if cfg.eval_steps else scheduled
                    evaluated = None
                    if self.val_rows and (last or due):
                        if self.preference:
                            evaluated = self._evaluate_preference(step + 1)
                        else:
                            evaluated, _ = evaluate(self.model, self.data.val, self.val_rows, cfg, rt, self.padding)
                            self.log.eval(step + 1, evaluated)
                        progress.eval_loss = evaluated
                    elif self.grpo and (last or due):
                        self.rl.evaluate(step + 1, self.log)
                    early_stop = None  # why to stop early, when the evaluations say so
                    if cfg.eval.requested and TrainingEvals.due(cfg, step + 1, last):
                        early_stop = self._run_evals(step + 1, evaluated)
                    if scheduled or agreed.stop or early_stop:
                        self.checkpoint_dir = self._save_checkpoint(
                            step + 1, finite(evaluated) if evaluated is not None else None)
                    if early_stop:
                        self.echo(f"early stopping at step {step + 1}: {early_stop}")
                        break
                    if agreed.stop and not last:
                        self.stopped_by = stop.signal_name or "a stop request to another process"
                        break
        except OOM_ERRORS:  # outside the retried forward/backward (optimizer state, evaluation): report, no retry
            free_memory(rt.device)
            raise OutOfMemory(oom_advice(rt.device, progress.micro_batch_size, progress.gradient_accumulation_steps,
                                         cfg.sequence_len, cfg.gradient_checkpointing, cfg.adapter,
                                         self.step)) from None
        finally:
            self.log.close()

    def _unit_inputs(self) -> UnitInputs:
        """What the preference loss reads beside the model's log-probabilities (built once)."""
        if getattr(self, "unit_inputs", None) is None:
            train = self.data.train
            self.unit_inputs = UnitInputs(
                self.ref.get("train"),
                torch.tensor(self.data.train_labels, dtype=torch.bool) if self.data.train_labels else None,
                torch.tensor([s.n_trained for s in train], dtype=torch.long))
        return self.unit_inputs

    def _evaluate_preference(self, step: int) -> float:
        """The held-out preference loss (returned: it picks the best checkpoint) and accuracy, logged with
        the reference's accuracy: the share of pairs whose chosen answer the model gives the higher
        log-probability (KTO: the share of judged answers whose log-ratio has their label's sign)."""
        cfg, rt, data = self.cfg, self.rt, self.data
        logp, count = sample_logprobs(self.model, data.val, self.val_rows, cfg.micro_batch_size, rt.device,
                                      rt.autocast_dtype, self.padding)
        ref = self.ref["val"] if cfg.method in NEEDS_REFERENCE else None
        labels = torch.tensor(data.val_labels, dtype=torch.bool) if data.val_labels else None
        objective = unit_objective(cfg, logp.double(), ref.double() if ref is not None else None, count, labels)
        loss = float(objective.loss)
        values = {"eval_loss": loss, **{f"eval_{k}": v for k, v in objective.metrics.items()}}
        if cfg.method == "kto":  # judged against the reference, which has no accuracy of its own
            values["eval_preference_accuracy"] = accuracy = judged_right(logp, self.ref["val"], data.val_labels)
            before = "the reference has none"
        else:
            values["eval_preference_accuracy"] = accuracy = prefers_chosen(logp)
            values["eval_preference_accuracy@base"] = prefers_chosen(self.ref["val"])
            before = f"starting model {100 * values['eval_preference_accuracy@base']:.1f}%"
        self.log.metrics(step, values, f"held-out {cfg.method} loss {loss:.4f}, preference accuracy "
                         f"{100 * accuracy:.1f}% ({before})")
        return loss

    def _step(self, step: int, stop: StopRequest):
        """One optimizer step (0-based `step`): its micro-batches forward and backward (smaller ones after
        an out-of-memory with auto_micro_batch), gradients synchronised and clipped, the update unless
        the guard calls the step bad, the metrics line. Returns what every process agreed on."""
        cfg, rt, progress, guard, optimizer = self.cfg, self.rt, self.progress, self.guard, self.optimizer
        window = [self.stream.next(progress.micro_batch_size) for _ in range(progress.gradient_accumulation_steps)] \
            if not self.grpo else [self.rl.window(step, lambda: [self.stream.next(progress.micro_batch_size) for _ in
                                                                 range(progress.gradient_accumulation_steps)])]
        groups = [g for _, g in window] if not self.grpo else window[0][1]
        lr = cfg.learning_rate * lr_factor(step, self.total_steps, self.warmup, cfg.lr_scheduler) * guard.lr_scale
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        step_t = time.perf_counter()
        while True:
            out_of_memory = False
            try:
                if self.grpo:  # rollout -> reward -> loss (train/rl.py)
                    loss_sum, n_tokens, n_real, metrics = self.rl.accumulate(
                        step, window[0][0], groups, progress.micro_batch_size, self.padding)
                    window_loss = WindowLoss(loss_sum, n_tokens, n_real, None, metrics)
                elif self.preference:
                    batches = [collate(self.data.train, g, **self.padding) for g in groups]
                    window_loss = accumulate_preference(self.model, batches, groups, self._unit_inputs(), cfg, rt)
                else:
                    batches = [collate(self.data.train, g, **self.padding) for g in groups]
                    window_loss = accumulate_gradients(self.model, batches, rt)
            except OOM_ERRORS:
                out_of_memory, window_loss = True, WindowLoss(0.0, 0, 0, None)
            # Every process learns whether any ran out of memory or was asked to stop.
            agreed = rt.sync_step(step + 1, window_loss.loss_sum, window_loss.n_real, out_of_memory, stop.requested)
            if not agreed.out_of_memory:
                break
            groups = self._smaller_micro_batches(step, groups)
        outliers = rt.sync_gradients(self.params, step + 1)
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        n_tokens = window_loss.n_tokens
        # a preference loss arrives divided already (by the window's pairs), the token loss summed
        loss = agreed.loss_sum if window_loss.metrics is not None else agreed.loss_sum / max(n_tokens, 1)
        bad = guard.check(loss, grad_norm)
        if bad is None:  # a bad step leaves weights and optimizer state exactly as they were
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        guard.record(step + 1, loss, grad_norm, bad)
        progress.step, progress.train_loss = step + 1, loss
        progress.tokens_seen += agreed.n_real
        step_s = time.perf_counter() - step_t
        self.recent.append((step_s, agreed.n_real))
        record = step_record(step + 1, window[-1][0] + 1, loss, lr, grad_norm, n_tokens, self.recent,
                             step_s, rt, self.flops_tok, self.peak_flops)
        if window_loss.metrics is not None:  # the preference metrics: rewards, margins, accuracy, log-probs
            record.update(window_loss.metrics)
        if window_loss.router_aux is not None:  # its own number, not part of loss
            record["router_aux_loss"] = finite(window_loss.router_aux)
        if bad is not None:
            record["skipped"] = bad
            self.echo(f"step {step + 1}: skipped, {bad}")
        if outliers:
            record["outlier_ranks"] = outliers
        for r in rt.tally_outliers(outliers):
            self.echo(f"rank {r} has sent outlier gradients in {REPORT_OUTLIER_AFTER} steps (step {step + 1} "
                      "the latest); check its device. metrics.jsonl names each step's outlier ranks")
            self.log.event({"step": step + 1, "event": "outlier_rank", "rank": r})
        self.log.train_step(record, write=(step + 1) % cfg.logging_steps == 0 or step + 1 == self.total_steps
                            or bad is not None or bool(outliers))
        if guard.needs_rollback:
            roll_back(guard, self.ckpts, self.named, optimizer, step + 1, self.log, self.out, self.echo, rt)
        return agreed

    def _smaller_micro_batches(self, step: int, groups: list[list[list[int]]]) -> list[list[list[int]]]:
        """After an out-of-memory: the same rows in micro-batches half the size (auto_micro_batch), or the
        advice to the user. The step's effective batch is unchanged."""
        cfg, progress = self.cfg, self.progress
        self.optimizer.zero_grad(set_to_none=True)
        free_memory(self.rt.device)
        smaller = smaller_micro_batch(progress.micro_batch_size, progress.gradient_accumulation_steps)
        if not (cfg.auto_micro_batch and smaller):
            raise OutOfMemory(oom_advice(
                self.rt.device, progress.micro_batch_size, progress.gradient_accumulation_steps,
                cfg.sequence_len, cfg.gradient_checkpointing, cfg.adapter, step))
        self.echo(f"out of memory at micro_batch_size {progress.micro_batch_size}; auto_micro_batch: "
                  f"retrying step {step + 1} with micro_batch_size {smaller[0]} x "
                  f"gradient_accumulation_steps {smaller[1]}")
        progress.micro_batch_size, progress.gradient_accumulation_steps = smaller
        self.padding = self._row_padding(smaller[0])
        return [g[i:i + smaller[0]] for g in groups for i in range(0, len(g), smaller[0])]

    def _run_evals(self, step: int, heldout_loss: float | None) -> str | None:
        """The eval: section at `step`: measured, recorded and judged by rank 0 (measured by every process on
        a sharded model), best/ written when it is the best so far; why to stop early, if early stopping says so."""
        rt, evals = self.rt, self.evals
        if rt.sharded:
            metrics = evals.measure()
            rt.release_gathered(self.model)
            outcome = rt.on_main(lambda: evals.record(step, metrics, heldout_loss, self.log))
        else:
            outcome = rt.on_main(lambda: evals.record(step, evals.measure(), heldout_loss, self.log))
        if outcome["best"]:
            weights = rt.full_state_dict(self.model)  # gathered from the shards onto rank 0 (sharded runs)
            rt.on_main(lambda: evals.keep_best(weights))
        return outcome["stop"]

    def _save_checkpoint(self, step: int, eval_loss_now: float | None) -> Path:
        rt, spec = self.rt, self.spec
        rank_rng = rt.rank_rng_states()  # every process's generators, collected by rank 0
        state = {
            "progress": self.progress.to_dict(),
            "data": self.stream.state_dict(),
            "guard": self.guard.state_dict(),
            "data_fingerprint": self.fingerprint,
            "eval_loss": eval_loss_now,  # measured at this step; picks the best checkpoint to keep
            "log_window": self.log.window_state(),  # the steps the next metrics line averages so far
        }
        if self.grpo:
            state["grpo"] = self.rl.state_dict(step)
        write_adapter = None
        if spec is not None:
            base = str(self.model_dir.resolve()) if self.model_dir.exists() else self.cfg.base_model

            def write_adapter(d: Path) -> None:
                save_adapter(self.model, spec, d, base_model=base)
                save_lora_init(self.model, d)  # PiSSA / OLoRA: the starting factors, for resume
        shards = None
        if rt.sharded:  # every process writes its shards into the directory rank 0 then completes
            shards = Path(rt.on_main(lambda: str(self.ckpts.begin(step))))
            save_shards(shards, self.named, self.optimizer)

        def write() -> str:
            path = self.ckpts.save(step, self.named, self.optimizer, state, self.cfg.model_dump(mode="json"),
                                   self.log.path, write_adapter, rank_rng, shards)
            self.ckpts.prune()
            return str(path)

        return Path(rt.on_main(write))

    # ------------------------------------------------------------------ phase 4: finish
    def finish(self, merge: bool, stop: StopRequest) -> TrainResult:
        """A stopped run reports where it can resume; a complete one writes its adapter (or model), the
        merged model when asked, the evaluation report and the run report."""
        rt, progress, echo, out = self.rt, self.progress, self.echo, self.out
        steps_done = progress.step
        if self.stopped_by is not None:
            saved = f"checkpoint: {self.checkpoint_dir}" if self.checkpoint_dir else "no step taken, nothing to save"
            echo(f"stopped by {self.stopped_by} after step {steps_done} of {self.total_steps}; {saved}")
            _write_run_report(out, rt, echo, f"stopped by {self.stopped_by}", steps_done)
            self.log.finish([self._best_dir(), out / "report.html"], STOPPED, self.stopped_by)
            return TrainResult(out, None, None, steps_done, progress.train_loss, progress.eval_loss,
                               stopped_by=self.stopped_by, checkpoint_dir=self.checkpoint_dir)

        # The stop handler stays on: a SIGTERM now lets the final save finish, and the run ends complete.
        weights = rt.full_state_dict(self.model)  # gathered from the shards onto rank 0 (sharded runs)
        adapter_dir, merged_dir = (Path(p) if p else None for p in rt.on_main(lambda: self._save_final(weights, merge)))
        evals = self.evals
        report = evals.finish(out.name) if evals is not None and rt.is_main else None  # rank 0's
        if rt.is_main:  # README.md of adapter/, merged/, best/: after the evaluation they show
            try:
                write_run_cards(out)
            except OSError as exc:  # the trained run stands without them
                echo(f"model cards not written ({exc})")
        if stop.requested:
            echo(f"{stop.signal_name} came after the last step: the run is complete")
        _write_run_report(out, rt, echo, "complete", steps_done)
        # The trackers last, so that they get every artifact: the weights, best/, the evaluation report.
        self.log.finish([adapter_dir or merged_dir, self._best_dir(), report.parent if report else None,
                         out / "report.html"])
        return TrainResult(out, adapter_dir, merged_dir, steps_done, progress.train_loss, progress.eval_loss,
                           checkpoint_dir=self.checkpoint_dir, best=evals.best if evals and rt.is_main else None,
                           report=report)

    def _best_dir(self) -> Path | None:
        """best/, when an evaluation kept one (rank 0's)."""
        return self.evals.best_dir if self.evals is not None and self.rt.is_main else None

    def _save_final(self, weights, merge: bool) -> list[str | None]:
        cfg, spec = self.cfg, self.spec
        final = self.out / ("adapter" if spec else "model")
        try:
            written = _save(cfg, self.model, spec, self.tokenizer, final, self.model_dir, weights)
        except OSError as exc:  # _save removed its temporary directory; the last checkpoint has the result
            raise CheckpointError(f"{final}: could not be written ({exc.strerror or exc}); the trained state is in "
                                  f"{self.checkpoint_dir}. Free space and run again with resume=auto") from None
        if spec is None:
            return [None, str(written)]
        if merge:
            from ..export.hf import merge_to_dir

            return [str(written), str(merge_to_dir(written, self.out / "merged", base_model=str(self.model_dir),
                                                     overwrite=True))]
        return [str(written), None]


def model_options(cfg: Config, model_cfg) -> dict:
    """The model's options (models/mistral.py ModelOptions) that the config sets; the fast path's
    attention and loss are set by use_fast_path."""
    return dict(
        gradient_checkpointing=cfg.gradient_checkpointing,
        offload_activations=cfg.offload_activations,
        recompute_by_row=cfg.offload_activations,
        neftune_alpha=cfg.neftune_noise_alpha or 0.0,
        # Mixtral's router balance loss: trained with config.json's weight when the router trains (full
        # fine-tuning), else only reported, unless router_aux_loss_coef says otherwise.
        router_aux_loss_coef=(cfg.router_aux_loss_coef if cfg.router_aux_loss_coef is not None
                              else model_cfg.router_aux_loss_coef if cfg.adapter == "none" else 0.0),
    )


def step_record(step: int, epoch: int, loss: float, lr: float, grad_norm: float, trained_tokens: int,
                recent, step_s: float, rt: Runtime, flops_tok: float, peak_flops: float | None) -> dict:
    """A step's metrics line. tokens_per_s counts the real tokens of every process over the recent steps;
    mfu is per GPU: those tokens' FLOPs over every process's GPU peak (peak_flops is one GPU's)."""
    tok_s = sum(n for _, n in recent) / max(sum(t for t, _ in recent), 1e-9)
    record = {
        "step": step,
        "epoch": epoch,
        "loss": finite(loss),
        "lr": lr,
        "grad_norm": finite(grad_norm),
        "trained_tokens": trained_tokens,
        "tokens_per_s": tok_s,
        "step_s": step_s,
        "peak_mem_gib": _peak_memory_gib(rt),
    }
    if peak_flops:
        record["mfu"] = tok_s * flops_tok / (peak_flops * rt.world_size)
    if rt.device.type == "cuda":
        record.update(_gpu_utilization(rt))
    return record


def _write_run_report(out: Path, rt: Runtime, echo, outcome: str, step: int) -> None:
    """The end of this start of the run in sessions.jsonl, and output_dir/report.html; the trained run
    stands even when its report cannot be written."""
    def write() -> str:
        try:
            record_session(out, outcome=outcome, step=step)
            return f"run report: {write_run_report(out)}"
        except (OutputError, OSError) as exc:
            return f"run report not written ({exc}); `mistral-tune report {out}` builds it again"

    echo(rt.on_main(write))




















@dataclass
class WindowLoss:
    """What the micro-batches of one optimizer step measured on this process."""

    loss_sum: float  # the summed token loss
    n_tokens: int  # trained tokens of the whole window, over all processes
    n_real: int  # real (not padding) tokens
    router_aux: float | None  # Mixtral's router balance loss, mean over the real tokens; None for a dense model
    metrics: dict[str, float] | None = None  # a preference method's step means (rewards, margins, ...)


def accumulate_gradients(model, batches: list[Batch], rt: Runtime) -> WindowLoss:
    """Forward and backward over the micro-batches of one optimizer step, adding into `.grad`.

    Each micro-batch's summed token loss is divided by the trained tokens of the whole window
    (summed over ranks), not averaged per micro-batch, so the accumulated gradient equals that of
    one batch holding every row. With several ddp processes the last backward pass starts
    sending the gradients (Runtime.send_during_backward); Runtime.sync_step sends the rest.

    A mixture-of-experts model's router balance loss (models/mistral.py RouterBalance) is measured on
    every micro-batch; with the model's router_aux_loss_coef > 0 its gradient joins the token loss's
    (MistralForCausalLM.batch_loss). The returned loss_sum is the token loss alone.
    """
    n_tokens = int(rt.all_sum([sum(b.n_trained for b in batches)])[0])
    loss_sum, n_real, aux_sum, moe = 0.0, 0, 0.0, False
    for i, batch in enumerate(batches):
        batch = batch.to(rt.device)
        with torch.autocast(rt.device.type, dtype=rt.autocast_dtype, enabled=rt.autocast_dtype is not None):
            terms = model.batch_loss(batch)
        if i == len(batches) - 1:  # the gradients are complete in this backward: they travel from inside it
            rt.send_during_backward()
        terms.backward(max(n_tokens, 1))
        loss_sum += float(terms.tokens.detach())
        n_real += batch.n_real
        aux = terms.router_aux
        if aux is not None and batch.n_real:
            moe, aux_sum = True, aux_sum + float(aux) * batch.n_real
    return WindowLoss(loss_sum, n_tokens, n_real, aux_sum / max(n_real, 1) if moe else None)


@dataclass
class UnitInputs:
    """Per training sample: the reference's log-probability (None for ORPO / SimPO) and the trained
    tokens; per unit: whether its answer is desirable (KTO; None for pairs)."""

    ref: torch.Tensor | None
    desirable: torch.Tensor | None
    trained: torch.Tensor


def accumulate_preference(model, batches: list[Batch], groups: list[list[list[int]]], inputs: UnitInputs,
                          cfg: Config, rt: Runtime) -> WindowLoss:
    """accumulate_gradients for the preference methods: forward and backward over the micro-batches of
    one optimizer step, each micro-batch's units (data/preference.py) scored by the method's objective
    (train/objectives.py) on the model's sequence log-probabilities. The per-unit losses are divided
    by the units of the whole window over all processes (ORPO's NLL by its chosen answers' tokens), so
    the accumulated gradient equals that of one batch holding every unit. Returns the window's loss
    (already divided) and its metrics' means."""
    order = [torch.tensor([i for row in g for i in row], dtype=torch.long) for g in groups]
    n_units, n_chosen, n_tokens = rt.all_sum([sum(len(o) // 2 for o in order),
                                              sum(int(inputs.trained[o[0::2]].sum()) for o in order),
                                              sum(b.n_trained for b in batches)])
    loss_sum, n_real, sums = 0.0, 0, {}
    for i, (batch, idx) in enumerate(zip(batches, order, strict=True)):
        batch = batch.to(rt.device)
        with torch.autocast(rt.device.type, dtype=rt.autocast_dtype, enabled=rt.autocast_dtype is not None):
            logp, count = model.sequence_logprobs(batch)
        ref = inputs.ref[idx].to(logp.device) if inputs.ref is not None else None
        desirable = inputs.desirable[idx[0::2] // 2].to(logp.device) if inputs.desirable is not None else None
        objective = unit_objective(cfg, logp, ref, count, desirable)
        term = objective.losses.sum() / max(n_units, 1)
        if objective.nll_tokens:
            term = term + objective.nll_sum / max(n_chosen, 1)
        if i == len(batches) - 1:  # the gradients are complete in this backward: they travel from inside it
            rt.send_during_backward()
        term.backward()
        loss_sum += float(term.detach())
        n_real += batch.n_real
        for k, (total, n) in objective.metric_sums().items():
            before = sums.get(k, (0.0, 0))
            sums[k] = (before[0] + total, before[1] + n)
    keys = sorted(sums)
    totals = rt.all_sum([x for k in keys for x in sums[k]]) if keys else []
    metrics = {k: float(totals[2 * j]) / float(totals[2 * j + 1]) for j, k in enumerate(keys) if totals[2 * j + 1]}
    if cfg.method == "kto" and "rewards/chosen" in metrics and "rewards/rejected" in metrics:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return WindowLoss(loss_sum, int(n_tokens), n_real, None, metrics)


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
