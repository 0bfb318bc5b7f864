"""Training on several GPUs of one machine: scaling of LoRA, the cost of robust aggregation, and
(with --fsdp) sharded full fine-tuning.

The driver starts one torchrun launch of `--gpus` processes (one per GPU) and prints a table. Each
worker builds a Mistral-7B-v0.3-shaped model with random weights (gpu_bench.py's shapes and
settings: rows of `--seq` random tokens, `--bs` rows per micro-batch, every token trained, LoRA
r=16 on all seven projections, fused AdamW) and times optimizer steps the way the trainer takes
them: `accumulate_gradients` (whose backward sends the gradient buckets, with overlap), then
`Runtime.sync_step` and `Runtime.sync_gradients` (the agreement all-reduce and the rest of the
gradient all-reduces, or the all-gather), clipping and the optimizer step.

Phases, in one launch so the compiled layers are built once per process:
  lora_1gpu                 rank 0 alone (world size 1: no collective at all), the others wait
  lora_Nx1gpu_independent   every rank alone at once (no communication): what sharing the host costs
  lora_Ngpu                 every rank, gradient_aggregation: mean, buckets sent during backward (the default)
  lora_Ngpu_no_overlap      the same with overlap_gradient_sync: false (every bucket sent after backward)
  lora_Ngpu_<agg>           every rank, a robust aggregation (--robust)
  full_1gpu_compute         (--fsdp) rank 0 alone, every weight trained in bf16, forward + backward only:
                            the compute-bound ideal of a full fine-tuning step (no optimizer, no communication)
  fsdp_Ngpu                 (--fsdp) full fine-tuning as `distributed: fsdp` runs it: float32 weights, gradients
                            and AdamW state sharded, bf16 compute, all-gathers and reduce-scatters in the step;
                            each layer's bf16 weights resharded after its forward or kept until its backward as
                            the trainer chooses (`--fsdp-reshard-after-forward`, the config key; auto by default:
                            the result's `sharding` says which and why)
  collectives               the all-reduce and all-gather alone, at the sizes the steps use (bus bandwidth)
Tokens/s is per GPU; scaling efficiency = tokens/s per GPU on N GPUs / tokens/s on one. FSDP efficiency =
the ideal's forward + backward time / FSDP's (and / FSDP's whole step, optimizer included).
`--smoke` runs the phases on CPU processes (gloo) with tiny models: a check that the bench works.

    python bench/dist_bench.py --gpus 2 --setting lean --robust median,centered_clip --fsdp --out "$OUT"
    python bench/dist_bench.py --gpus 2 --setting lean --robust "" --fsdp --fsdp-reshard-after-forward true
    python bench/dist_bench.py --smoke --gpus 2     # CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

SETTINGS = {  # what each --setting turns on (gpu_bench.py's OURS)
    "fast": dict(ckpt=False, offload=False, by_row=False),
    "lean": dict(ckpt=True, offload=True, by_row=True),
}

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2)  # --smoke's model shape, over gpu_bench's SHAPE


def _config(aggregation: str):
    from mistral_tune.config import config_from_dict

    return config_from_dict({"base_model": "random", "datasets": [{"path": "random"}], "distributed_timeout": 180,
                             "gradient_aggregation": aggregation, "byzantine_tolerance": 0})


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gib() -> float:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else 0.0


def _time_steps(model, params, rt, batches, steps: int, warm: int, opt=None) -> dict:
    """compute_s: forward + backward (with overlap, the gradient all-reduces sent from inside it);
    sync_ms: what is left after it (the agreement, the last buckets, waiting for the sums). `opt`:
    the optimizer to step (default fused AdamW)."""
    import torch

    from mistral_tune.train.loop import accumulate_gradients

    if opt is None:
        opt = torch.optim.AdamW(params, lr=2e-5, fused=torch.cuda.is_available())
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times, comm, compute = [], [], []
    for step in range(warm + steps):
        batch = batches[(step * rt.world_size + rt.rank) % len(batches)]
        _sync()
        t = time.perf_counter()
        window = accumulate_gradients(model, [batch], rt)
        _sync()
        c = time.perf_counter()
        compute.append(c - t)
        agreed = rt.sync_step(step + 1, window.loss_sum, window.n_real, False, False)
        rt.sync_gradients(params, step + 1)
        _sync()
        c = time.perf_counter() - c
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync()
        if step >= warm:
            times.append(time.perf_counter() - t)
            comm.append(c)
    med = sorted(times)[len(times) // 2]
    tokens = batches[0].input_ids.numel()
    # every rank's own forward + backward time: a slower rank makes the others wait at the all-reduce
    mine = sorted(compute[warm:])[len(compute[warm:]) // 2]
    per_rank = rt.all_sum([mine if r == rt.rank else 0.0 for r in range(rt.world_size)])
    return dict(step_s=round(med, 4), tokens_per_s_per_gpu=round(tokens / med),
                compute_s=[round(x, 4) for x in per_rank],
                sync_ms=round(1000 * sorted(comm)[len(comm) // 2], 2),
                peak_gib=_peak_gib(), loss=round(agreed.loss_sum / window.n_tokens, 4))


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from gpu_bench import _build_ours, _random_rows

    from mistral_tune.train.runtime import Runtime

    torch.manual_seed(0)
    if args.smoke:
        torch.set_num_threads(1)
    rt = Runtime.detect(_config("mean"))
    results = []
    model, params = _build_tiny() if args.smoke else _build_ours()
    rt.broadcast_parameters(params)
    rt.track_gradients({n: p for n, p in model.named_parameters() if p.requires_grad})
    if not args.smoke:
        model.use_fast_path()
    v = SETTINGS[args.setting]
    model.configure(gradient_checkpointing=v["ckpt"], offload_activations=v["offload"] and not args.smoke,
                    recompute_by_row=v["by_row"])
    gen = torch.Generator().manual_seed(0)
    batches = [_random_rows(args.bs, args.seq, False, gen).to(rt.device) for _ in range(4)]

    alone = Runtime(rt.device, rt.autocast_dtype)  # a world of one, as a single-process run is
    if rt.is_main:  # one GPU busy, the others wait
        results.append({"phase": "lora_1gpu", **_time_steps(model, params, alone, batches, args.steps, args.warm)})
        print("RESULT " + json.dumps(results[-1]), flush=True)
    rt.barrier()
    # every GPU busy, no communication: what sharing the host (offload copies, CPU) costs by itself
    res = _time_steps(model, params, alone, batches, args.steps, args.warm)
    if rt.is_main:
        results.append({"phase": f"lora_{rt.world_size}x1gpu_independent", **res})
    rt.barrier()
    results.append({"phase": f"lora_{rt.world_size}gpu",
                    **_time_steps(model, params, rt, batches, args.steps, args.warm)})
    rt.overlap = False
    results.append({"phase": f"lora_{rt.world_size}gpu_no_overlap",
                    **_time_steps(model, params, rt, batches, args.steps, args.warm)})
    buckets, rt.buckets = rt.buckets, None  # robust aggregation gathers whole gradients after backward
    for agg in filter(None, args.robust.split(",")):
        rt.aggregation = agg
        results.append({"phase": f"lora_{rt.world_size}gpu_{agg}",
                        **_time_steps(model, params, rt, batches, args.steps, args.warm)})
    rt.aggregation, rt.buckets, rt.overlap = "mean", buckets, True
    if rt.is_main:
        for r in results[1:]:
            print("RESULT " + json.dumps(r), flush=True)
    if not args.smoke:
        res = _collectives(rt)
        if rt.is_main:
            print("RESULT " + json.dumps(res), flush=True)
    if args.fsdp:
        del model, params
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        for r in _full_finetuning(rt, batches, args):
            if rt.is_main:
                print("RESULT " + json.dumps(r), flush=True)
    dist.destroy_process_group()


def _build_tiny():
    """A TINY model on the CPU with LoRA r=16 on every projection (--smoke)."""
    from gpu_bench import SHAPE

    from mistral_tune.models.lora import LoraSpec, apply_lora
    from mistral_tune.models.mistral import MistralConfig, MistralForCausalLM

    model = MistralForCausalLM(MistralConfig(**{**SHAPE, **TINY}))
    model.init_weights(std=0.02)
    apply_lora(model, LoraSpec(r=16, alpha=16))
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad]


def _full_model(rt, shard: bool, v: dict, smoke: bool):
    import torch
    from gpu_bench import SHAPE

    from mistral_tune.models.mistral import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(**{**SHAPE, **(TINY if smoke else {})})
    if shard:  # as load_model(shard=rt.shard) builds it: meta, FSDP2, then each rank's rows on the GPU
        with torch.device("meta"):
            model = MistralForCausalLM(cfg)
        rt.shard(model)
        model.to_empty(device=rt.device)
        with torch.no_grad():
            for p in model.parameters():
                p.to_local().normal_(0.0, 0.02)
    else:  # the ideal: the whole model in bf16 on one GPU, every weight trained
        with torch.device(rt.device):
            model = MistralForCausalLM(cfg).to(torch.bfloat16)
        model.init_weights(std=0.02)
    if not smoke:
        model.use_fast_path()
    model.configure(gradient_checkpointing=v["ckpt"], offload_activations=v["offload"] and not smoke,
                    recompute_by_row=v["by_row"])
    model.train()
    return model, list(model.parameters())


def _full_finetuning(rt, batches, args) -> list[dict]:
    import torch

    from mistral_tune.train.loop import accumulate_gradients
    from mistral_tune.train.runtime import Runtime

    v = SETTINGS[args.setting]
    out = []
    if rt.is_main:
        alone = Runtime(rt.device, rt.autocast_dtype)
        model, params = _full_model(alone, False, v, args.smoke)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        times = []
        for step in range(args.warm + args.steps):
            _sync()
            t = time.perf_counter()
            accumulate_gradients(model, [batches[step % len(batches)]], alone)
            _sync()
            times.append(time.perf_counter() - t)
            model.zero_grad(set_to_none=True)
        med = sorted(times[args.warm:])[args.steps // 2]
        out.append(dict(phase="full_1gpu_compute", step_s=round(med, 4), fwd_bwd_s=round(med, 4),
                        tokens_per_s_per_gpu=round(batches[0].input_ids.numel() / med), sync_ms=0.0,
                        peak_gib=_peak_gib()))
        del model, params
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    rt.barrier()
    # the trainer's path: Runtime.shard resolves fsdp_reshard_after_forward as a run with this value would
    choice = {"auto": "auto", "true": True, "false": False}[args.fsdp_reshard_after_forward]
    sharded = Runtime(rt.device, rt.autocast_dtype, rt.rank, rt.world_size, strategy="fsdp",
                      reshard_after_forward=choice)
    model, params = _full_model(sharded, True, v, args.smoke)
    res = _time_steps(model, params, sharded, batches, args.steps, args.warm)
    res["fwd_bwd_s"] = round(sorted(res.pop("compute_s"))[-1], 4)  # the slowest rank's forward + backward
    out.append({"phase": f"fsdp_{rt.world_size}gpu", **res, "sharding": sharded.sharding})
    return out


def _collectives(rt) -> dict:
    """Bus bandwidth of the collectives the steps use, on their own: all-reduce of 168 MB (the float32 LoRA
    gradients of 7B), all-gather of one decoder layer's bf16 weights (436 MB)."""
    import torch
    import torch.distributed as dist

    def timed(fn, nbytes: float) -> tuple[float, float]:
        for _ in range(3):
            fn()
        rt.barrier()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        s = (time.perf_counter() - t) / 10
        return round(1000 * s, 2), round(nbytes * 2 * (rt.world_size - 1) / rt.world_size / s / 1e9, 1)

    grads = torch.ones(42_000_000, device=rt.device)
    ms, bw = timed(lambda: dist.all_reduce(grads), grads.numel() * 4)
    layer = torch.ones(218_103_808 // rt.world_size, dtype=torch.bfloat16, device=rt.device)
    gathered = torch.empty(layer.numel() * rt.world_size, dtype=torch.bfloat16, device=rt.device)
    ms2, bw2 = timed(lambda: dist.all_gather_into_tensor(gathered, layer), gathered.numel() * 2 / 2)
    return {"phase": "collectives", "all_reduce_168MB_ms": ms, "all_reduce_busbw_GBps": bw,
            "all_gather_436MB_ms": ms2, "all_gather_busbw_GBps": bw2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="lean")
    parser.add_argument("--robust", default="median", help="robust aggregations to time, comma-separated")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--bs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warm", type=int, default=3)
    parser.add_argument("--fsdp", action="store_true", help="also time sharded full fine-tuning")
    parser.add_argument("--fsdp-reshard-after-forward", choices=["auto", "true", "false"], default="auto",
                        help="the FSDP phase's fsdp_reshard_after_forward (auto: as the trainer chooses)")
    parser.add_argument("--timeout", type=int, default=500, help="seconds for the whole launch")
    parser.add_argument("--smoke", action="store_true", help="CPU processes (gloo), a tiny model: does it run")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        args.seq, args.bs, args.steps, args.warm = 64, 2, 3, 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}", __file__,
           "--worker", "--setting", args.setting, "--robust", args.robust, "--seq", str(args.seq),
           "--bs", str(args.bs), "--steps", str(args.steps), "--warm", str(args.warm)]
    cmd += ["--fsdp-reshard-after-forward", args.fsdp_reshard_after_forward]
    cmd += ["--fsdp"] * args.fsdp + ["--smoke"] * args.smoke
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'bench'}:{ROOT / 'src'}:" + os.environ.get("PYTHONPATH", "")}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
        log, failed = proc.stdout + proc.stderr, proc.returncode != 0
    except subprocess.TimeoutExpired as exc:  # keep what the phases that finished printed
        parts = [x.decode() if isinstance(x, bytes) else (x or "") for x in (exc.stdout, exc.stderr)]
        log, failed = "".join(parts) + f"\nTIMEOUT after {args.timeout} s", True
    reshard = args.fsdp_reshard_after_forward
    name = f"dist_{args.setting}" + f"_reshard_{reshard}" * (reshard != "auto") + "_smoke" * args.smoke
    (out / f"{name}.log").write_text(log)
    results = [json.loads(ln[7:]) for ln in log.splitlines() if ln.startswith("RESULT ")]
    (out / f"{name}.json").write_text(json.dumps(results, indent=2))
    if failed:
        print(log[-6000:])
    print_table(results, args)


def print_table(results: list[dict], args) -> None:
    import torch

    one = next((r["tokens_per_s_per_gpu"] for r in results if r["phase"] == "lora_1gpu"), None)
    mean = next((r["tokens_per_s_per_gpu"] for r in results if r["phase"] == f"lora_{args.gpus}gpu"), None)
    print(f"\n{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}, torch {torch.__version__}, "
          f"setting {args.setting}, {args.bs} x {args.seq} tokens per GPU per step")
    print("| phase | step s | tokens/s per GPU | sync ms | peak GiB | vs 1 GPU | vs mean |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if r["phase"] == "collectives":
            print(f"collectives alone: {json.dumps({k: v for k, v in r.items() if k != 'phase'})}")
        if r["phase"].startswith(("full", "fsdp", "collectives")):
            continue
        t = r["tokens_per_s_per_gpu"]
        print(f"| {r['phase']} | {r['step_s']} | {t:,} | {r['sync_ms']} | {r['peak_gib']} | "
              f"{t / one:.3f} | {t / mean:.3f} |" if one and mean else f"| {r} |")
    ideal = next((r for r in results if r["phase"] == "full_1gpu_compute"), None)
    if ideal:
        print("\n| full fine-tuning | step s | forward+backward s | tokens/s per GPU | peak GiB per GPU | "
              "efficiency: fwd+bwd | whole step |")
        print("|---|---|---|---|---|---|---|")
        for r in results:
            if r["phase"].startswith(("full", "fsdp")):
                print(f"| {r['phase']} | {r['step_s']} | {r['fwd_bwd_s']} | {r['tokens_per_s_per_gpu']:,} | "
                      f"{r['peak_gib']} | {ideal['fwd_bwd_s'] / r['fwd_bwd_s']:.3f} | "
                      f"{ideal['fwd_bwd_s'] / r['step_s']:.3f} |")
        for r in results:
            if "sharding" in r:
                print(f"{r['phase']}: {r['sharding']}")


if __name__ == "__main__":
    main()
