"""`mistral-tune plan`'s predictions against measured training: the recorded runs, and short new ones.

Without --run: every configuration recorded in bench/results/ by the current code (RECORDS), the
plan's predicted peak memory and tokens/s against the measured ones (tests/test_plan.py checks
each within 10%). With --run (a GPU): a few short real trainings on random weights of
Mistral-7B-v0.3 and Mistral-Nemo-12B shapes cut to --layers layers (gpu_bench.py's rows and step), each
in a process of its own and measured
(peak `max_memory_allocated` over the steps, median tokens/s) and compared with the prediction for
the same shape, setting and the GPU detected. Table last; JSON under $OUT.

    python3 bench/plan_check.py --run --out "$OUT"          # one H200: at most --budget-s (140 s)
    python3 bench/plan_check.py --run --smoke               # CPU, toy sizes: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import gpu_bench  # noqa: E402  (the benchmarks' model shape, variants, rows and step)

from mistral_tune.models.mistral import MistralConfig  # noqa: E402
from mistral_tune.plan import MicroBatch, Setup, attended_pairs, predict  # noqa: E402
from mistral_tune.train.gpus import find_gpu  # noqa: E402

RESULTS = ROOT / "bench" / "results"
# The result files measured by the current code, and the GPU each ran on. docs/benchmarks.md says
# what changed since the others: they measured code that is gone, and are not predicted.
RECORDS = {
    "2026-11-23-h100-main.json": "H100",
    "2026-11-23-h100-packed.json": "H100",
    "2026-12-07-h100-seams-before-after.json": "H100",  # both trees' rows: the seams refactor changed no speed
    "2026-11-30-h200x2-distributed.json": "H200",
    "2026-11-30-h200x2-distributed-2.json": "H200",
    "2026-11-30-h200-lean-qlora-7b-12b.json": "H200",
    "2026-11-30-h200-long-context.json": "H200",
}
SUPERSEDED = {
    "2026-11-23-h100-long-context.json": "rows of 32k and 128k tokens before the MLP went in chunks",
    "2026-11-23-h100-lora.json": "before the causal kernel and the grad-only down projection",
    "2026-11-23-h100-lora-qlora.json": "before the causal kernel and the grad-only down projection",
    "2026-11-23-h100-causal-kernel.json": "before the grad-only down projection",
    "2026-11-23-h100-long-context-parity.json": "FlexAttention for rows of one sample, before the causal kernel",
}
# dist_bench.py's phases with --setting lean (its command): the variant and what differs from it. The
# trainer's own settings only: the phases that are not (each GPU alone, no overlap) are left out. fsdp_2gpu
# says how its layers were sharded; without that, they were resharded after their forward.
DIST_PHASES = {
    "lora_1gpu": ("ours_lean", {}),
    "lora_2gpu": ("ours_lean", dict(gpus=2)),
    "lora_2gpu_median": ("ours_lean", dict(gpus=2, aggregation="median")),
    "lora_2gpu_centered_clip": ("ours_lean", dict(gpus=2, aggregation="centered_clip")),
    "fsdp_2gpu": ("ours_lean", dict(gpus=2, adapter="none", strategy="fsdp")),
    "fsdp_2gpu_kept_gathered": ("ours_lean", dict(gpus=2, adapter="none", strategy="fsdp", reshard=False)),
}


def setup_of(variant: str, bs: int, **keys) -> Setup:
    v = gpu_bench.OURS[variant]
    return replace(Setup(adapter="qlora" if v["qlora"] else "lora", lora_r=16, checkpointing=v["ckpt"],
                         offload=v["offload"], by_row=v["by_row"], fast=True, bf16=True, micro_batch_size=bs), **keys)


def bench_batches(variant: str, seq: int, bs: int, n: int = 4) -> list[MicroBatch]:
    """The micro-batches gpu_bench.py trains: fixed rows of random tokens, or packed chat-like rows
    (the same length distribution and choice of rows; the lengths drawn with seeds of ours)."""
    if not gpu_bench.OURS[variant]["packed"]:
        return [MicroBatch(bs, seq, bs * seq, bs * seq, bs * attended_pairs(seq, None))] * n
    from mistral_tune.data.pack import pack_rows

    out = []
    for k in range(n):
        rng, lengths = random.Random(k), []
        while sum(lengths) < 8 * bs * seq:
            lengths.append(min(4000, seq, max(20, int(rng.lognormvariate(math.log(250), 0.9)))))
        rows = sorted(pack_rows(lengths, seq), key=lambda r: -sum(lengths[i] for i in r))[bs:2 * bs]
        real = sum(lengths[i] for r in rows for i in r)
        out.append(MicroBatch(bs, seq, real, real, sum(attended_pairs(lengths[i], None) for r in rows for i in r)))
    return out


def recorded_configurations() -> list[dict]:
    """Each of our configurations in RECORDS with what was measured and what plan predicts."""
    out = []
    for name, gpu_name in RECORDS.items():
        rows = json.loads((RESULTS / name).read_text())
        for r in rows:
            variant, keys = DIST_PHASES.get(r.get("phase"), (r.get("variant"), {}))
            if variant not in gpu_bench.OURS or "error" in r or r.get("mlp_chunk") is not None:
                continue  # a peer's stack, a parity check, another phase, a run that did not finish, or one
                # with the MLP's chunks set by hand
            shape = MistralConfig(**gpu_bench.SHAPES[r.get("shape", "7b")])
            if "phase" in r and any(o.get("phase") == r["phase"] and o["peak_gib"] < r["peak_gib"] for o in rows):
                continue  # a phase every rank reports: the lowest, rank 0's holds the one-GPU phase's model too
            seq, bs = r.get("seq", 4096), r.get("bs", 2)
            if setup_of(variant, bs, **keys).sharded and "reshard" not in keys:
                keys = dict(keys, reshard="resharded" in r.get("sharding", "resharded"))
            peak = r["peak_gib"]
            if "phase" in r and r["phase"].startswith("fsdp") and sum(o.get("phase") == r["phase"] for o in rows) == 1:
                peak = None  # rank 0's alone: it holds the one-GPU phase's model too, so its peak is not FSDP's
            setup = setup_of(variant, bs, **keys)
            p = predict(shape, setup, bench_batches(variant, seq, bs), find_gpu(gpu_name))
            measured = r.get("tokens_per_s", r.get("tokens_per_s_per_gpu"))
            if r.get("timed_steps_include_compile"):
                measured = None  # one step, compiling included: no speed to predict
            if setup.gpus > 1:
                variant += f" {setup.adapter}, {setup.gpus} GPUs {setup.strategy}" + (
                    f" {setup.aggregation}" if setup.aggregation != "mean" else "") + (
                    " kept gathered" if setup.sharded and not setup.reshard else "")
            out.append(dict(file=name, gpu=gpu_name, variant=variant, seq=seq, bs=bs,
                            peak_gib=peak, predicted_peak_gib=round(p.peak_gib, 2),
                            tokens_per_s=measured, predicted_tokens_per_s=round(p.tokens_per_s)))
    return out


def error(row: dict, key: str) -> float:
    """Predicted against measured, relative; 0 where nothing usable was measured."""
    return row[f"predicted_{key}"] / row[key] - 1 if row[key] is not None else 0.0


def print_table(rows: list[dict]) -> None:
    print("| record | GPU | variant | seq x bs | peak GiB measured / predicted (error) "
          "| tokens/s measured / predicted (error) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['file']} | {r['gpu']} | {r['variant']} | {r['seq']} x {r['bs']} | "
              + (f"{r['peak_gib']:.2f} / {r['predicted_peak_gib']:.2f} ({100 * error(r, 'peak_gib'):+.1f}%) | "
                 if r["peak_gib"] is not None else f"(rank 0 only) / {r['predicted_peak_gib']:.2f} | ")
              + (f"{r['tokens_per_s']:,} / {r['predicted_tokens_per_s']:,} ({100 * error(r, 'tokens_per_s'):+.1f}%) |"
                 if r["tokens_per_s"] is not None else f"(not timed) / {r['predicted_tokens_per_s']:,} |"))


# --------------------------------------------------------------------------- new runs
SHAPES = gpu_bench.SHAPES  # Mistral-7B-v0.3 and Mistral-Nemo-12B


def run_variant(shape_name: str, variant: str, seq: int, bs: int, layers: int, steps: int, warm: int,
                device: str) -> dict:
    import torch


    v = gpu_bench.OURS[variant]
    cuda = device == "cuda"
    shape = dict(SHAPES[shape_name], num_hidden_layers=layers)
    if not cuda:  # --smoke: toy sizes on the CPU's plain path
        shape.update(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=32, vocab_size=512)
    cfg = MistralConfig(**shape)
    from mistral_tune.models.lora import LoraSpec, apply_lora
    from mistral_tune.models.mistral import MistralForCausalLM
    from mistral_tune.models.quant import quantize_model

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = MistralForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.init_weights(std=0.02)
    if v["qlora"]:
        quantize_model(model, list(Setup().targets), device)
        torch.cuda.empty_cache()
    apply_lora(model, LoraSpec(r=16, alpha=16))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    model.train()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        model.use_fast_path(one_sample_rows=not v["packed"])
        model.configure(offload_activations=v["offload"], recompute_by_row=v["by_row"])
    model.configure(gradient_checkpointing=v["ckpt"])
    opt = torch.optim.AdamW(params, lr=2e-5, fused=cuda)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (bs, seq + 1), generator=gen)
    from mistral_tune.data.pack import Sample, collate

    batch = collate([Sample(ids[i, :-1].tolist(), ids[i, 1:].tolist()) for i in range(bs)],
                    [[i] for i in range(bs)], seq).to(device)
    times = []
    for step in range(warm + steps):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            loss = model.token_loss(batch)
        (loss / batch.n_trained).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= warm:
            times.append(time.perf_counter() - t)
    med = sorted(times)[len(times) // 2]
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    del model, opt, params
    setup = Setup(adapter="qlora" if v["qlora"] else "lora", checkpointing=v["ckpt"], offload=v["offload"],
                  by_row=v["by_row"], fast=cuda, bf16=True, micro_batch_size=bs)
    gpu = find_gpu(torch.cuda.get_device_name(0) if cuda else "H200")  # --smoke: any row of the table
    p = predict(cfg, setup, bench_batches(variant, seq, bs), gpu)
    return dict(shape=shape_name, variant=variant, layers=layers, seq=seq, bs=bs,
                gpu=gpu.name if cuda else "cpu (smoke)",
                peak_gib=round(peak, 3), predicted_peak_gib=round(p.peak_gib, 3),
                tokens_per_s=round(bs * seq / med), predicted_tokens_per_s=round(p.tokens_per_s))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="store_true", help="also train short runs on this machine's GPU")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (checks the script runs)")
    parser.add_argument("--variants", default="7b:ours_fast,7b:ours_lean,12b:ours_lean,7b:ours_qlora",
                        help="SHAPE:VARIANT, comma-separated; shapes: 7b, 12b; variants: gpu_bench.py's")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--bs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warm", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=140, help="all runs together stop after this many seconds")
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = "cpu" if args.smoke else "cuda"
    seq, bs, layers, steps, warm = ((args.seq, args.bs, args.layers, args.steps, args.warm) if not args.smoke
                                    else (64, 2, 2, 2, 1))
    if args.worker:  # one run in a process of its own: clean peak-memory counters and compile caches
        print("RESULT " + json.dumps(run_variant(*args.worker.split(":"), seq, bs, layers, steps, warm, device)))
        return
    t0 = time.time()
    report = {"recorded": recorded_configurations(), "runs": []}
    if args.run:
        import torch

        if device == "cuda" and not torch.cuda.is_available():
            parser.error("--run needs a CUDA GPU (or --smoke)")
        runs = [v for v in args.variants.split(",") if v]
        if args.smoke:  # bitsandbytes needs a GPU
            runs = [v for v in runs if not gpu_bench.OURS[v.split(":")[1]]["qlora"]]
        for run in runs:
            left = args.budget_s - (time.time() - t0)
            if left < 20:
                report["runs"].append(dict(run=run, skipped=f"time budget {args.budget_s}s spent"))
                continue
            cmd = [sys.executable, __file__, "--worker", run] + ["--smoke"] * args.smoke + [
                "--layers", str(layers), "--seq", str(seq), "--bs", str(bs), "--steps", str(steps), "--warm", str(warm)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=left)
                log = proc.stdout + proc.stderr
            except subprocess.TimeoutExpired:
                log = f"TIMEOUT after {left:.0f}s"
            line = next((ln for ln in log.splitlines() if ln.startswith("RESULT ")), None)
            res = json.loads(line[7:]) if line else dict(run=run, error=log.strip().splitlines()[-3:])
            res["wall_s"] = round(time.time() - t0, 1)
            print(json.dumps(res), flush=True)
            report["runs"].append(res)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print_table(report["recorded"])
    if report["runs"]:
        print()
        print("| new run | GPU | layers | seq x bs | peak GiB measured / predicted (error) "
              "| tokens/s measured / predicted (error) |")
        print("|---|---|---|---|---|---|")
        for r in report["runs"]:
            if "variant" not in r:
                print(f"| {r['run']} | {r.get('skipped') or r.get('error')} | | | | |")
                continue
            print(f"| {r['shape']} {r['variant']} | {r['gpu']} | {r['layers']} | {r['seq']} x {r['bs']} | "
                  f"{r['peak_gib']} / {r['predicted_peak_gib']} ({100 * error(r, 'peak_gib'):+.1f}%) | "
                  f"{r['tokens_per_s']:,} / {r['predicted_tokens_per_s']:,} ({100 * error(r, 'tokens_per_s'):+.1f}%) |")


if __name__ == "__main__":
    main()
