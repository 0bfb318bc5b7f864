"""Where the run executes: the process, its device, and everything that passes between processes.

One process is the default and pays for nothing here: every collective below returns its input
when the world size is 1. Several processes are started by torchrun (or `mistral-tune train
--gpus N`, which calls it); torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address,
and this module joins the process group (NCCL on GPUs, gloo on CPU).

Data parallel training of a replicated model (`distributed: ddp`, the default for adapters): every
process runs forward and backward over its own micro-batches, with no communication until the
step's last backward pass. There the gradients are summed across processes in bucketed
all-reduces (GradientBuckets): each bucket is sent, asynchronously, as soon as backward is past its
parameters, so the sums travel while the rest of the backward computes, and the processes wait
for them only before the optimizer step (`overlap_gradient_sync: false` sends every bucket after the
backward instead). Every decision that must be taken together is still taken before the sums are
used: an out-of-memory on any process (the process that ran out sends its buckets anyway, so the
collectives match, and every process throws the sums away and retries) and a stop request. Robust
aggregation needs every process's whole gradient, so it gathers them after the backward.

Sharded training (`distributed: fsdp`, the default for full fine-tuning): PyTorch's FSDP2
(`fully_shard`) on every decoder layer and on the whole model; each process holds 1/N of the
float32 weights, gradients and optimizer state, reads only its rows of the checkpoint files, and
all-gathers each layer's weights in bf16 just before it runs (prefetching the next), and again for
its backward unless they are kept gathered (fsdp_reshard_after_forward); gradients are
reduce-scattered in float32 during backward. The loss normalisation needs the gradients summed,
not averaged, so the reductions are set to plain sums.

Robust aggregation (`gradient_aggregation`): the flat adapter gradients are all-gathered and every
process computes the same coordinate-wise median, trimmed mean or centred clipping of them, so a
process that sends corrupt gradients (a bad GPU, a bit flip) cannot steer the run. Each step's
outlier ranks are named; a rank that is an outlier repeatedly is reported.

`MISTRAL_TUNE_FAULTS`, a test tool that proves the above, lives in train/faults.py: when it is set, it
reaches this module only through `Runtime.gradient_hook` and `Runtime.model_hook`; never set it in a real run.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from .. import errors
from ..errors import ConfigError, DistributedError
from .faults import FAULTS_ENV, GradientHook, ModelHook, fault_hooks

BUCKET_BYTES = 64 * 2**20  # all-reduce bucket: large enough for bandwidth, small enough to copy cheaply
OUTLIER_FACTOR = 5.0  # a rank whose gradient is this many times further out than the median rank's
REPORT_OUTLIER_AFTER = 3  # steps as an outlier before a rank is reported by name


@dataclass
class StepSync:
    """What the processes agreed on after one step's local forward and backward passes."""

    loss_sum: float  # summed token loss over every process
    n_real: int  # real (non-padding) tokens over every process
    out_of_memory: bool  # some process ran out of memory: every process retries with smaller micro-batches
    stop: bool  # some process was asked to stop: every process stops after this step


@dataclass
class Runtime:
    """This process: its device, precision, and place among the processes of the run."""

    device: torch.device
    autocast_dtype: torch.dtype | None
    rank: int = 0
    world_size: int = 1
    aggregation: str = "mean"
    byzantine_tolerance: int = 0
    owns_group: bool = False  # this Runtime started the process group and closes it
    strategy: str = "ddp"  # ddp: replicated model, gradients summed in buckets; fsdp: sharded
    overlap: bool = True  # ddp: send the buckets during the last backward pass (overlap_gradient_sync)
    reshard_after_forward: str | bool = "auto"  # fsdp: fsdp_reshard_after_forward, resolved by `shard`
    sharding: str = ""  # fsdp: what `shard` chose for the decoder layers and why (the trainer prints it)
    outlier_steps: Counter = field(default_factory=Counter)
    buckets: GradientBuckets | None = None  # ddp with mean aggregation, once track_gradients has run
    # called once a step on this rank's local gradients before any is sent (the fault injector; a rank
    # with one sends no bucket during backward)
    gradient_hook: GradientHook | None = None
    model_hook: ModelHook | None = None  # the build phase calls it on the model and prints its line (faults)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        """Parameters sharded over the processes (FSDP2): every forward and backward is collective."""
        return self.distributed and self.strategy == "fsdp"

    @classmethod
    def detect(cls, cfg) -> Runtime:
        """This process's runtime from torchrun's environment; joins the process group when there are several."""
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        check_distributed_config(cfg, world)
        gradient_hook = model_hook = None
        if os.environ.get(FAULTS_ENV):  # the fault injector, a test tool (train/faults.py)
            gradient_hook, model_hook = fault_hooks(os.environ[FAULTS_ENV], rank, world)
        if torch.cuda.is_available():
            if local_rank >= torch.cuda.device_count():
                raise ConfigError(f"LOCAL_RANK {local_rank} but this machine has {torch.cuda.device_count()} GPU(s): "
                                  "start at most one process per GPU (--nproc_per_node / --gpus)")
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            bf16_ok = torch.cuda.is_bf16_supported()
            use_bf16 = bf16_ok if cfg.bf16 == "auto" else bool(cfg.bf16)
            if use_bf16 and not bf16_ok:
                raise ConfigError("bf16: true but this GPU does not support bfloat16; set bf16: false")
            autocast = torch.bfloat16 if use_bf16 else None
        else:  # CPU: float32 throughout (bf16 autocast on CPU is slow and changes the numbers)
            device, autocast = torch.device("cpu"), None
        owns = False
        if world > 1 and not dist.is_initialized():
            timeout = timedelta(seconds=cfg.distributed_timeout)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout,
                                    store=_restart_store(world, timeout), rank=rank, world_size=world,
                                    device_id=device if device.type == "cuda" else None)
            owns = True
        return cls(device, autocast, rank, world, cfg.gradient_aggregation, cfg.byzantine_tolerance, owns_group=owns,
                   strategy=resolve_strategy(cfg), overlap=cfg.overlap_gradient_sync,
                   reshard_after_forward=cfg.fsdp_reshard_after_forward, gradient_hook=gradient_hook,
                   model_hook=model_hook)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False

    # ------------------------------------------------------------------ agreeing

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over every process, in float64 (exact for counts and flags)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self._collective(dist.all_reduce, t)
        return t.tolist()

    def sync_step(self, step: int, loss_sum: float, n_real: int, out_of_memory: bool, stop: bool) -> StepSync:
        """One small all-reduce after the local passes: loss and token totals, and the flags every
        process must act on at the same step. The gradient buckets backward has not sent go first
        (all of them on a process that ran out of memory); after an out-of-memory their sums are dropped."""
        if self.buckets is not None:
            self.buckets.flush(self.rank, self.world_size, self.gradient_hook, step)
        total_loss, total_real, oom, stopping = self.all_sum([loss_sum, n_real, float(out_of_memory), float(stop)])
        if oom and self.buckets is not None:
            self.buckets.wait(keep=False)
        return StepSync(total_loss, int(total_real), oom > 0, stopping > 0)

    def every(self, flag: bool) -> bool:
        """Whether `flag` holds on every process: a loop of collective forward passes (generation on sharded
        weights) ends together, whatever each process computed, when every process is done."""
        return self.all_sum([float(not flag)])[0] == 0

    def barrier(self) -> None:
        if self.distributed:
            self._collective(dist.barrier)

    def main_first(self, fn: Callable[[], object]):
        """fn() on rank 0, then (when it succeeded) on the others: rank 0 builds the token cache
        while the others wait, then they read it. An error on rank 0 is raised on every rank."""
        if not self.distributed:
            return fn()
        if self.is_main:
            result = self._run_and_share(fn, share_result=False)
            return result
        self._receive_outcome()
        return fn()

    def on_main(self, fn: Callable[[], object]):
        """fn() on rank 0 only; its JSON-able result (or its error) is returned (raised) on every rank."""
        if not self.distributed:
            return fn()
        if self.is_main:
            return self._run_and_share(fn, share_result=True)
        return self._receive_outcome()

    def _run_and_share(self, fn, share_result: bool):
        try:
            result = fn()
        except errors.MistralTuneError as exc:
            self._broadcast_json({"error": type(exc).__name__, "message": str(exc)})
            raise
        except BaseException as exc:  # a bug or an interrupt: the others must not wait for a timeout
            self._broadcast_json({"error": "DistributedError", "message": f"rank 0 failed: {exc!r}"})
            raise
        self._broadcast_json({"result": result if share_result else None})
        return result

    def _receive_outcome(self):
        outcome = self._broadcast_json(None)
        if "error" in outcome:
            kind = getattr(errors, outcome["error"], DistributedError)
            raise kind(outcome["message"])
        return outcome["result"]

    def _broadcast_json(self, obj):
        """Rank 0's JSON value on every rank (length first, then the bytes; no pickle)."""
        data = json.dumps(obj).encode() if self.is_main else b""
        size = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        self._collective(dist.broadcast, size, src=0)
        buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=self.device)
        if self.is_main:
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        self._collective(dist.broadcast, buf, src=0)
        return obj if self.is_main else json.loads(buf.cpu().numpy().tobytes().decode())

    def broadcast_parameters(self, params: list[torch.Tensor]) -> None:
        """Rank 0's values into every rank's copy (the replicas start equal whatever their init)."""
        if not self.distributed or self.sharded:
            return
        with torch.no_grad():
            for p in params:
                self._collective(dist.broadcast, p.data, src=0)

    def gather_states(self, state: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's copy of a same-sized uint8 state tensor (random generator states), on the CPU."""
        if not self.distributed:
            return [state]
        local = state.to(self.device)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        self._collective(dist.all_gather, parts, local)
        return [p.cpu() for p in parts]

    def rank_rng_states(self) -> dict[str, torch.Tensor]:
        """The torch generator states of ranks 1..N-1 (rank 0's are the checkpoint's own), collected on
        every rank: `rank<r>.torch_cpu` and, on GPUs, `rank<r>.cuda` (its own device's)."""
        if not self.distributed:
            return {}
        states = {"torch_cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.device)
        return {f"rank{r}.{name}": state for name, local in states.items()
                for r, state in enumerate(self.gather_states(local)) if r}

    def _collective(self, op, *args, **kwargs):
        try:
            return op(*args, **kwargs)
        except (RuntimeError, dist.DistBackendError) as exc:
            raise DistributedError(
                f"lost contact with the other processes ({str(exc).splitlines()[0][:200]}); "
                "another rank failed or was killed, see its message above. Continue with resume=auto"
            ) from None

    # ------------------------------------------------------------------ gradients

    def track_gradients(self, named: dict[str, torch.Tensor], bucket_bytes: int = BUCKET_BYTES) -> None:
        """Set up the summing of these trainable parameters' gradients (ddp with mean aggregation)."""
        if self.distributed and not self.sharded and self.aggregation == "mean":
            self.buckets = GradientBuckets(named, bucket_bytes, self._collective)

    def send_during_backward(self) -> None:
        """The next backward pass is the step's last: send each bucket from inside it as it completes.
        Not on a rank with a gradient hook (the fault injector needs the gradients whole before any is sent)."""
        if self.buckets is not None and self.overlap and self.gradient_hook is None:
            self.buckets.armed = True

    def sync_gradients(self, params: list[torch.Tensor], step: int) -> list[int]:
        """Sum the step's gradients over every process (or aggregate them robustly), in place.
        Returns the ranks whose gradients were outliers this step."""
        if not self.distributed or self.sharded:  # FSDP has reduce-scattered them during backward
            return []
        if self.buckets is not None:  # sent during backward or by sync_step: wait for the sums
            return outlier_ranks(self.buckets.wait(keep=True))
        grads = []
        for p in params:  # a parameter no micro-batch reached contributes zeros
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        if self.gradient_hook is not None:
            self.gradient_hook(grads, step)
        return self._robust(grads)

    def _robust(self, grads: list[torch.Tensor]) -> list[int]:
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        gathered = torch.empty((self.world_size, flat.numel()), dtype=flat.dtype, device=flat.device)
        self._collective(dist.all_gather, list(gathered.unbind(0)), flat)
        mean, distances = aggregate(gathered, self.aggregation, self.byzantine_tolerance)
        total = mean * self.world_size  # the loss is normalised over all processes: the gradient is a sum
        offset = 0
        for g in grads:
            g.copy_(total[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        return outlier_ranks(distances)

    def tally_outliers(self, ranks: list[int]) -> list[int]:
        """Count outlier steps per rank; the ranks that have just reached the reporting threshold."""
        reached = []
        for r in ranks:
            self.outlier_steps[r] += 1
            if self.outlier_steps[r] == REPORT_OUTLIER_AFTER:
                reached.append(r)
        return reached


    # ------------------------------------------------------------------ sharding (FSDP2)

    def shard(self, model: torch.nn.Module) -> None:
        """Wrap `model` (a MistralForCausalLM, on the meta device or not) with FSDP2: each decoder layer a
        unit, the rest (embeddings, final norm, head) the root unit, kept gathered from the forward to
        its backward. The layers are too when `reshard_after_forward` resolves to False (see
        `resolve_reshard`; `sharding` says which and why). Compute in the autocast dtype, gradients
        reduced in float32 as sums."""
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        gathered = sum(p.numel() for p in model.parameters()) * (self.autocast_dtype or torch.float32).itemsize
        memory = torch.cuda.get_device_properties(self.device).total_memory if self.device.type == "cuda" else None
        reshard, self.sharding = resolve_reshard(self.reshard_after_forward, gathered, memory)
        policy = MixedPrecisionPolicy(param_dtype=self.autocast_dtype, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=policy, reshard_after_forward=reshard)
        fully_shard(model, mp_policy=policy, reshard_after_forward=False)
        register_fsdp_forward_method(model, "hidden_states")  # the trainer calls it rather than forward
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)

    def release_gathered(self, model: torch.nn.Module) -> None:
        """Free the weights that evaluation forwards left gathered (no backward follows them to reshard the
        root unit, nor the layers kept gathered): every unit holds its shard again, in float32."""
        if not self.sharded:
            return
        from torch.distributed.fsdp import FSDPModule

        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """The whole model's weights on rank 0's CPU (None elsewhere), gathered from the shards."""
        if not self.sharded:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if self.is_main else None


KEEP_GATHERED_SHARE = 0.25  # fsdp_reshard_after_forward: auto keeps the layers gathered up to this share of the GPU


def resolve_reshard(setting: str | bool, gathered_bytes: int, gpu_bytes: int | None) -> tuple[bool, str]:
    """(reshard each layer after its forward, the reason in words) for fsdp_reshard_after_forward; gpu_bytes:
    the GPU's memory, None for a CPU process.

    auto keeps the layers gathered from forward to backward when the whole model's gathered (compute
    dtype) weights take at most KEEP_GATHERED_SHARE of the GPU's memory. A quarter leaves the rest to
    what sharding already holds (16 bytes a parameter / N of float32 weights, gradients and AdamW
    state) and to the activations: Mistral 7B's 14.5 GB of bf16 is 10% of an H200 (kept), a 70B
    model's 141 GB is not (resharded). CPU processes (gloo) share the host's memory: there auto reshards."""
    size = f"{gathered_bytes / 2**30:.1f} GiB" if gathered_bytes >= 2**30 else f"{gathered_bytes / 2**20:.0f} MiB"
    if setting != "auto":
        what = "resharded after their forward" if setting else "kept gathered from their forward to their backward"
        return bool(setting), (f"decoder layers {what} (fsdp_reshard_after_forward: {str(setting).lower()}; the "
                               f"whole model gathered is {size})")
    if gpu_bytes is None:
        return True, ("decoder layers resharded after their forward (fsdp_reshard_after_forward: auto; CPU "
                      "processes share the host's memory)")
    share = f"{100 * gathered_bytes / gpu_bytes:.0f}% of the GPU's {gpu_bytes / 2**30:.0f} GiB"
    if gathered_bytes <= KEEP_GATHERED_SHARE * gpu_bytes:
        return False, (f"decoder layers kept gathered from their forward to their backward (fsdp_reshard_after_"
                       f"forward: auto; the whole model gathered is {size}, {share}: one all-gather less per layer)")
    return True, (f"decoder layers resharded after their forward (fsdp_reshard_after_forward: auto; the whole model "
                  f"gathered is {size}, {share}, more than {KEEP_GATHERED_SHARE:.0%})")


def _restart_store(world: int, timeout: timedelta) -> dist.Store | None:
    """torchrun's agent keeps one key-value store across the restarts of its workers (--max-restarts), and
    the process group's keys of a failed attempt would be read again by the next (pytorch#135712): each
    attempt gets keys of its own. None (torch's default store) when the agent does not share its store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"mistral-tune/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


_LAYER = re.compile(r"(?:^|\.)layers\.\d+\.")


def _layer(name: str) -> str | None:
    """The decoder layer a parameter belongs to (`model.layers.3.`), None outside the layers."""
    found = _LAYER.search(name)
    return name[:found.end()] if found else None


class GradientBuckets:
    """The ddp gradients summed over every process in all-reduces of about `limit` bytes each.

    Buckets hold the parameters in reverse order, the order backward reaches them, and never split a
    decoder layer: a checkpointed layer taken one batch row at a time accumulates its gradients once
    per row, all within that layer's backward. So while armed (the step's last backward pass), when a
    gradient of bucket b arrives, every bucket before b is complete and is sent (async all-reduce of a
    flat copy; the gradients themselves stay this process's own until `wait`). A collective is matched
    by its place in each process's sequence: buckets go in index order on every process, whatever
    order the hooks fire in. `flush` sends what is left, the last bucket carrying every rank's
    gradient norm (each rank fills its own slot; the sum gives every rank all of them)."""

    def __init__(self, named: dict[str, torch.Tensor], limit: int, collective) -> None:
        self.collective = collective
        self.buckets: list[list[torch.Tensor]] = []
        size, last_layer = 0, None
        for name, p in reversed(list(named.items())):
            layer = _layer(name)
            nbytes = p.numel() * p.element_size()
            same_layer = layer is not None and layer == last_layer
            if (not self.buckets or self.buckets[-1][0].dtype != p.dtype
                    or not same_layer and size + nbytes > limit):
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size, last_layer = size + nbytes, layer
        self.bucket_of = {p: b for b, bucket in enumerate(self.buckets) for p in bucket}
        for p in self.bucket_of:
            p.register_post_accumulate_grad_hook(self._arrived)
        self.armed = False
        self.pending: list[tuple[list[torch.Tensor], torch.Tensor, object]] = []

    def _arrived(self, p: torch.Tensor) -> None:
        if not self.armed:
            return
        b = self.bucket_of[p]
        if b < len(self.pending):  # the premise of the order above broke: fail loudly, never sum a partial gradient
            raise RuntimeError(f"a gradient of bucket {b} arrived after the bucket was sent (parameter of shape "
                               f"{tuple(p.shape)}); set overlap_gradient_sync: false")
        while len(self.pending) < b:
            self._send(len(self.pending))

    def _send(self, b: int, extra: torch.Tensor | None = None) -> None:
        bucket = self.buckets[b]
        for p in bucket:  # a parameter backward has not reached (yet: none of this bucket will be) adds zeros
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in bucket] + ([extra] if extra is not None else []))
        self.pending.append((bucket, flat, self.collective(dist.all_reduce, flat, async_op=True)))

    def flush(self, rank: int, world: int, hook: GradientHook | None = None, step: int = 0) -> None:
        """Send the buckets not sent yet (all of them when backward did not); `hook(gradients, step)` sees
        this rank's gradients first (the fault injector: only where nothing was sent during backward)."""
        self.armed = False
        for p in self.bucket_of:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.bucket_of]
        if hook is not None:
            hook(grads, step)
        norms = torch.zeros(world, dtype=self.buckets[-1][0].dtype, device=grads[0].device)
        norms[rank] = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        while len(self.pending) < len(self.buckets) - 1:
            self._send(len(self.pending))
        self._send(len(self.buckets) - 1, norms)

    def wait(self, keep: bool) -> list[float]:
        """Wait for the sums; keep: copy them into the gradients. Every rank's gradient norm."""
        norms: list[float] = []
        for bucket, flat, work in self.pending:
            self.collective(work.wait)
            if not keep:
                continue
            offset = 0
            for p in bucket:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
            norms = flat[offset:].tolist()
        self.pending = []
        return norms


# ---------------------------------------------------------------------- robust aggregation


def aggregate(grads: torch.Tensor, method: str, tolerance: int) -> tuple[torch.Tensor, list[float]]:
    """A robust estimate of the mean of the rows of `grads` (one per process) and each row's distance to it.

    A row with a non-finite value is left out (it counts against the tolerance); when more rows are
    non-finite than `tolerance`, the result is NaN, and the bad-step guard skips the step.
      median:        coordinate-wise median (the mean of the two middle values for an even count)
      trimmed_mean:  coordinate-wise mean after dropping the `tolerance` largest and smallest values
      centered_clip: starting from the median, three rounds of v += mean((x_i - v) * min(1, tau / |x_i - v|)),
                     tau the median distance of the rows to v (Karimireddy et al., 2021)
    """
    finite = torch.isfinite(grads).all(dim=1)
    n_bad = int((~finite).sum())
    if n_bad > tolerance:
        return torch.full_like(grads[0], float("nan")), [0.0 if ok else math.inf for ok in finite.tolist()]
    good = grads[finite]
    f = tolerance - n_bad  # faults that may still hide among the finite rows
    if method == "median":
        mean = _median(good)
    elif method == "trimmed_mean":
        ordered = good.sort(dim=0).values
        mean = ordered[f:good.shape[0] - f].mean(dim=0)
    elif method == "centered_clip":
        mean = _median(good)
        for _ in range(3):
            diff = good - mean
            norms = torch.linalg.vector_norm(diff, dim=1)
            tau = norms.median()
            scale = torch.where(norms > tau, tau / norms.clamp_min(1e-30), torch.ones_like(norms))
            mean = mean + (diff * scale[:, None]).mean(dim=0)
    else:
        raise ValueError(f"unknown gradient_aggregation {method!r}")
    distances = torch.linalg.vector_norm(torch.nan_to_num(grads - mean, nan=float("inf")), dim=1)
    return mean, distances.tolist()


def _median(x: torch.Tensor) -> torch.Tensor:
    ordered = x.sort(dim=0).values
    n = x.shape[0]
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def outlier_ranks(figures: list[float]) -> list[int]:
    """Ranks whose figure (gradient norm, or distance to the aggregate) is non-finite or more than
    OUTLIER_FACTOR times the median rank's."""
    finite = sorted(x for x in figures if math.isfinite(x))
    median = finite[len(finite) // 2] if finite else 0.0
    return [r for r, x in enumerate(figures) if not math.isfinite(x) or (median > 0 and x > OUTLIER_FACTOR * median)]


# ---------------------------------------------------------------------- checks


def check_distributed_config(cfg, world: int) -> None:
    """Refuse, before anything loads, what several processes cannot do (yet) with this config."""
    if cfg.gradient_aggregation != "mean":
        if cfg.adapter == "none":
            raise ConfigError(f"gradient_aggregation: {cfg.gradient_aggregation} gathers every process's gradient; "
                              "it is for adapters (lora, qlora), not full fine-tuning; use mean")
        need = 2 * cfg.byzantine_tolerance + 1
        if world < need:
            raise ConfigError(f"gradient_aggregation: {cfg.gradient_aggregation} with byzantine_tolerance: "
                              f"{cfg.byzantine_tolerance} needs at least {need} processes (2f + 1), this run has "
                              f"{world}; start more processes or lower byzantine_tolerance")
    if world == 1 or resolve_strategy(cfg) != "fsdp":
        return
    if cfg.adapter != "none":
        raise ConfigError(f"distributed: fsdp with adapter: {cfg.adapter} is not supported yet (adapters over a "
                          "sharded base); use distributed: ddp, which needs the base to fit one device")
    if cfg.eval.forgetting is not None and cfg.eval.forgetting.lm_eval_tasks:
        raise ConfigError("eval.forgetting.lm_eval_tasks with distributed: fsdp is not supported: the harness "
                          "chooses its forward passes itself, and sharded weights take every process to each one "
                          "in the same order; run `mistral-tune eval` on the result with lm_eval_tasks")
    if cfg.optimizer == "adamw_8bit":
        raise ConfigError("optimizer: adamw_8bit with distributed: fsdp is not supported: bitsandbytes' 8-bit "
                          "update does not take the sharded (DTensor) weights; use optimizer: adamw, or "
                          "distributed: ddp where the model fits one device")
    if cfg.auto_micro_batch:
        raise ConfigError("auto_micro_batch with distributed: fsdp is not supported: the sharded weights are "
                          "gathered inside forward and backward, where one process's out-of-memory cannot be "
                          "retried together; set micro_batch_size to what fits")


def resolve_strategy(cfg) -> str:
    """ddp (replicated model, summed gradients) or fsdp (sharded); auto: fsdp for full fine-tuning, ddp for adapters."""
    if cfg.distributed != "auto":
        return cfg.distributed
    return "fsdp" if cfg.adapter == "none" else "ddp"
