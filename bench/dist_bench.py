"""Training on several GPUs of one machine: scaling of LoRA, the cost of robust aggregation, and
(with --fsdp) sharded full fine-tuning.

The driver starts one torchrun launch of `--gpus` processes (one per GPU) and prints a table. Each
worker builds a Mistral-7B-v0.3-shaped model with random weights (gpu_bench.py's shapes and
settings: rows of `--seq` random tokens, `--bs` rows per micro-batch, every token trained, LoRA
r=16 on all seven projections, fused AdamW) and times optimizer steps the way the trainer takes
them: `accumulate_gradients`, then `Runtime.sync_step` and `Runtime.sync_gradients` (the
agreement all-reduce and the gradient all-reduce or all-gather), clipping and the optimizer step.

Phases, in one launch so the compiled layers are built once per process:
  lora_1gpu      rank 0 alone (world size 1: no collective at all), the others wait
  lora_2gpu      every rank, gradient_aggregation: mean
  lora_2gpu_<agg> every rank, a robust aggregation (median by default)
Tokens/s is per GPU; scaling efficiency = tokens/s per GPU on N GPUs / tokens/s on one.

    python bench/dist_bench.py --gpus 2 --setting lean --out "$OUT"
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


def _config(aggregation: str):
    from mistral_tune.config import config_from_dict

    return config_from_dict({"base_model": "random", "datasets": [{"path": "random"}],
                             "gradient_aggregation": aggregation, "byzantine_tolerance": 0})


def _time_steps(model, params, rt, batches, steps: int, warm: int) -> dict:
    import torch

    from mistral_tune.train.loop import accumulate_gradients

    opt = torch.optim.AdamW(params, lr=2e-5, fused=True)
    torch.cuda.reset_peak_memory_stats()
    times, comm, compute = [], [], []
    for step in range(warm + steps):
        batch = batches[(step * rt.world_size + rt.rank) % len(batches)]
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss_sum, n_tokens, n_real = accumulate_gradients(model, [batch], rt)
        torch.cuda.synchronize()
        c = time.perf_counter()
        compute.append(c - t)
        agreed = rt.sync_step(loss_sum, n_real, False, False)
        rt.sync_gradients(params, step + 1)
        torch.cuda.synchronize()
        c = time.perf_counter() - c
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
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
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2), loss=round(agreed.loss_sum / n_tokens, 4))


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from gpu_bench import _build_ours, _random_rows

    from mistral_tune.train.runtime import Runtime

    torch.manual_seed(0)
    rt = Runtime.detect(_config("mean"))
    results = []
    model, params = _build_ours()
    rt.broadcast_parameters(params)
    model.use_fast_path()
    v = SETTINGS[args.setting]
    model.gradient_checkpointing, model.offload_activations = v["ckpt"], v["offload"]
    model.recompute_by_row = v["by_row"]
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
    for agg in filter(None, args.robust.split(",")):
        rt.aggregation = agg
        results.append({"phase": f"lora_{rt.world_size}gpu_{agg}",
                        **_time_steps(model, params, rt, batches, args.steps, args.warm)})
        rt.aggregation = "mean"
    if rt.is_main:
        for r in results[1:]:
            print("RESULT " + json.dumps(r), flush=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="lean")
    parser.add_argument("--robust", default="median", help="robust aggregations to time, comma-separated")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--bs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warm", type=int, default=3)
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}", __file__,
           "--worker", "--setting", args.setting, "--robust", args.robust, "--seq", str(args.seq),
           "--bs", str(args.bs), "--steps", str(args.steps), "--warm", str(args.warm)]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": f"{ROOT / 'bench'}:{ROOT / 'src'}:"
                               + os.environ.get("PYTHONPATH", "")})
    log = proc.stdout + proc.stderr
    (out / f"dist_{args.setting}.log").write_text(log)
    results = [json.loads(ln[7:]) for ln in log.splitlines() if ln.startswith("RESULT ")]
    (out / f"dist_{args.setting}.json").write_text(json.dumps(results, indent=2))
    if proc.returncode:
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
        t = r["tokens_per_s_per_gpu"]
        print(f"| {r['phase']} | {r['step_s']} | {t:,} | {r['sync_ms']} | {r['peak_gib']} | "
              f"{t / one:.3f} | {t / mean:.3f} |" if one and mean else f"| {r} |")


if __name__ == "__main__":
    main()
