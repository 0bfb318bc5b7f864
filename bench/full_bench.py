"""Full fine-tuning on one GPU, fused AdamW and bitsandbytes' 8-bit AdamW: ours against transformers'
model with the optimizer its Trainer makes, on the same shapes, weights and tokens.

Mistral-7B-v0.3 shapes (gpu_bench.SHAPE) with `--layers` decoder layers (8: 2.0 B parameters), random
weights that are the same in every process (each tensor drawn from a generator seeded by its name,
norms at one), `--bs` rows of `--seq` random tokens a step, every token trained, float32 weights under
bf16 autocast as the trainer runs `adapter: none`. Four workers, each its own process (clean peak
counters; a failure or a timeout loses only its own), each timing both optimizers one after the other:

  ours_lean   our model on the fast path (rows of one sample: SDPA's causal kernel, compiled layers),
              gradient checkpointing with the kept layer inputs offloaded, backward one row at a time
              (gradient_checkpointing + offload_activations: true)
  ours_fast   the same without checkpointing
  hf_ckpt     transformers' MistralForCausalLM, SDPA attention, gradient_checkpointing_enable() as the
              Trainer calls it
  hf_nockpt   the same without checkpointing

Optimizers: adamw (ours: train/optim.make_optimizer, fused torch AdamW; HF: Trainer.create_optimizer with
optim="adamw_torch_fused") and adamw_8bit (ours: make_optimizer's bitsandbytes AdamW8bit; HF:
Trainer.create_optimizer with optim="adamw_bnb_8bit"). Our step is the trainer's (dist_bench._time_steps:
accumulate_gradients, clipping at 1.0, the optimizer step); HF's is a Trainer step's (the model's own
loss from labels=input_ids, backward, clipping at 1.0, the optimizer step). `--warm` warm-up steps, then
the median of `--steps`. first_loss: each worker's loss on the first batch before any step; ours and
HF's must agree within bf16 tolerance (the parity line).

    python bench/full_bench.py --out "$OUT"           # about 3-4 min on an H200
    python bench/full_bench.py --smoke                # CPU, tiny shapes, a check that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

WORKERS = ("ours_lean", "hf_ckpt", "ours_fast", "hf_nockpt")  # pairs first: a spent budget loses a whole pair
OPTIMIZERS = {"adamw": "adamw_torch_fused", "adamw_8bit": "adamw_bnb_8bit"}  # ours: transformers' name
TOY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
LEARNING_RATE = 1e-5


def _shape(args) -> dict:
    from gpu_bench import SHAPE

    return {**SHAPE, **TOY} if args.smoke else {**SHAPE, "num_hidden_layers": args.layers}


def _same_weights(model) -> None:
    """Every weight from a generator seeded by its name (normal, std 0.02), norms at one: the same model
    in every process, ours or transformers' (their parameter names are the same)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=torch.Generator(p.device).manual_seed(zlib.crc32(name.encode())))


def _emit(res: dict) -> None:
    print("RESULT " + json.dumps(res), flush=True)


def _bnb_problem(device) -> str | None:
    """Why the 8-bit optimizer cannot run here, or None."""
    import torch

    try:
        import bitsandbytes as bnb

        p = torch.nn.Parameter(torch.ones(4096, device=device))
        p.grad = torch.ones_like(p)
        bnb.optim.AdamW8bit([p]).step()
    except Exception as exc:  # an old bitsandbytes without a CPU backend, or none installed
        return f"bitsandbytes' 8-bit AdamW does not run on {device.type}: {str(exc).splitlines()[0][:200]}"
    return None


def _run_optimizers(worker: str, make, step_all, device) -> None:
    """For each optimizer: make it, time the steps, print a RESULT line; a failure is printed as one too."""
    import gc

    import torch

    for name in OPTIMIZERS:
        problem = _bnb_problem(device) if name == "adamw_8bit" else None
        if problem:
            _emit(dict(variant=worker, optimizer=name, skipped=problem))
            continue
        opt = None
        try:
            opt = make(name)
            _emit(dict(variant=worker, optimizer=name, **step_all(opt)))
        except Exception as exc:  # out of memory, a missing package: the next optimizer still runs
            _emit(dict(variant=worker, optimizer=name, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"))
        del opt
        for p in make.params:
            p.grad = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_ours(args, worker: str) -> None:
    import torch
    from dist_bench import SETTINGS, _time_steps
    from gpu_bench import _random_rows

    from mistral_tune.config import config_from_dict
    from mistral_tune.models.mistral import MistralConfig, MistralForCausalLM
    from mistral_tune.train.loop import accumulate_gradients
    from mistral_tune.train.optim import make_optimizer
    from mistral_tune.train.runtime import Runtime

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    with device:  # float32: the trainer trains adapter: none's weights in float32
        model = MistralForCausalLM(MistralConfig(**_shape(args)))
    _same_weights(model)
    v = SETTINGS["lean" if worker == "ours_lean" else "fast"]
    if cuda:  # as fast_path: auto turns it on for rows of one sample (SDPA's causal kernel); CPU: the plain path
        model.use_fast_path(one_sample_rows=True)
    offload = v["offload"] and cuda  # offload_activations sets both
    model.configure(gradient_checkpointing=v["ckpt"], offload_activations=offload, recompute_by_row=offload)
    model.train()
    rt = Runtime(device, torch.bfloat16 if cuda else None)
    gen = torch.Generator().manual_seed(0)
    batches = [_random_rows(args.bs, args.seq, False, gen).to(device) for _ in range(4)]
    named = dict(model.named_parameters())
    window = accumulate_gradients(model, batches[:1], rt)  # the first loss, no step
    first_loss = window.loss_sum / window.n_tokens
    model.zero_grad(set_to_none=True)

    def make(name):
        cfg = config_from_dict({"base_model": "random", "datasets": [{"path": "random"}], "adapter": "none",
                                "optimizer": name, "learning_rate": LEARNING_RATE})
        return make_optimizer(named, cfg, device)

    def step_all(opt) -> dict:
        res = _time_steps(model, list(named.values()), rt, batches, args.steps, args.warm, opt)
        return dict(first_loss=round(first_loss, 5), step_s=res["step_s"], tokens_per_s=res["tokens_per_s_per_gpu"],
                    peak_gib=res["peak_gib"], last_loss=res["loss"])

    make.params = list(named.values())
    _run_optimizers(worker, make, step_all, device)


def run_hf(args, worker: str) -> None:
    import tempfile

    import torch
    import torch.nn.functional as F
    from dist_bench import _peak_gib, _sync
    from gpu_bench import _random_rows
    from transformers import AutoModelForCausalLM, MistralConfig, Trainer, TrainingArguments

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    with device:
        model = AutoModelForCausalLM.from_config(MistralConfig(**_shape(args), tie_word_embeddings=False),
                                                 dtype=torch.float32, attn_implementation="sdpa")
    _same_weights(model)
    if worker == "hf_ckpt":
        model.gradient_checkpointing_enable()  # the Trainer's call with its default gradient_checkpointing_kwargs
    model.config.use_cache = False
    model.train()
    gen = torch.Generator().manual_seed(0)
    batches = [_random_rows(args.bs, args.seq, False, gen).to(device) for _ in range(4)]
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        logits = model(input_ids=batches[0].input_ids).logits  # the same targets as ours: the batch's labels
        first_loss = float(F.cross_entropy(logits.float().flatten(0, 1), batches[0].labels.flatten()))
    del logits
    out = tempfile.mkdtemp(prefix="full-bench-")

    def make(name):
        targs = TrainingArguments(output_dir=out, optim=OPTIMIZERS[name], learning_rate=LEARNING_RATE, bf16=cuda,
                                  use_cpu=not cuda, report_to=[])
        return Trainer(model=model, args=targs).create_optimizer()

    def step_all(opt) -> dict:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for step in range(args.warm + args.steps):
            ids = batches[step % len(batches)].input_ids
            _sync()
            t = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):  # as bf16=True's accelerate
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync()
            if step >= args.warm:
                times.append(time.perf_counter() - t)
        med = sorted(times)[len(times) // 2]
        return dict(first_loss=round(first_loss, 5), step_s=round(med, 4), tokens_per_s=round(ids.numel() / med),
                    peak_gib=_peak_gib(), last_loss=round(float(loss), 4))

    make.params = params
    _run_optimizers(worker, make, step_all, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default=",".join(WORKERS))
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of the 7B shapes")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--bs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warm", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=110, help="seconds a worker (both its optimizers) may take")
    parser.add_argument("--budget", type=int, default=230, help="seconds for every worker together")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: a check that the bench runs")
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.seq, args.bs, args.steps, args.warm = 64, 2, 2, 1
    if args.worker:
        if args.smoke:
            import torch

            torch.set_num_threads(1)
        (run_ours if args.worker.startswith("ours") else run_hf)(args, args.worker)
        return

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'bench'}:{ROOT / 'src'}:" + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1"}
    if args.smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""
    deadline = time.time() + args.budget
    results = []
    for worker in filter(None, args.workers.split(",")):
        limit = min(args.timeout, deadline - time.time())
        if limit < 10:
            results.append(dict(variant=worker, error=f"not run: the {args.budget} s budget is spent"))
            continue
        cmd = [sys.executable, __file__, "--worker", worker, "--layers", str(args.layers), "--seq", str(args.seq),
               "--bs", str(args.bs), "--steps", str(args.steps), "--warm", str(args.warm)] + ["--smoke"] * args.smoke
        t = time.time()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=env)
            log = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:  # keep what the optimizers that finished printed
            parts = [x.decode() if isinstance(x, bytes) else (x or "") for x in (exc.stdout, exc.stderr)]
            log = "".join(parts) + f"\nTIMEOUT after {limit:.0f} s"
        (out / f"full_{worker}.log").write_text(log)
        found = [json.loads(ln[7:]) for ln in log.splitlines() if ln.startswith("RESULT ")]
        for name in OPTIMIZERS:
            if not any(r["optimizer"] == name for r in found):
                found.append(dict(variant=worker, optimizer=name, error=log.strip().splitlines()[-1:]))
        for r in found:
            r["worker_wall_s"] = round(time.time() - t, 1)
            print(json.dumps(r), flush=True)
        results += found
        (out / "full_bench.json").write_text(json.dumps(dict(args=vars(args), results=results), indent=2))
    print_table(results, args)


def print_table(results: list[dict], args) -> None:
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "CPU"
    print(f"\n{gpu}, torch {torch.__version__}; full fine-tuning, {args.layers if not args.smoke else 2} layers of "
          f"Mistral-7B shapes, {args.bs} x {args.seq} tokens a step, median of {args.steps} after {args.warm}")
    print("| stack | optimizer | tokens/s | step s | peak GiB | first loss | vs HF, same checkpointing and optimizer |")
    print("|---|---|---|---|---|---|---|")
    peer = {"ours_lean": "hf_ckpt", "ours_fast": "hf_nockpt"}
    by = {(r["variant"], r["optimizer"]): r for r in results if "optimizer" in r}
    for r in results:
        if "tokens_per_s" not in r:
            print(f"| {r['variant']} | {r.get('optimizer', '')} | {r.get('skipped') or r.get('error')} | | | | |")
            continue
        ref = by.get((peer.get(r["variant"]), r["optimizer"]), {})
        ratio = (f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x tokens/s, {r['peak_gib'] - ref['peak_gib']:+.1f} GiB"
                 if "tokens_per_s" in ref else "-")
        print(f"| {r['variant']} | {r['optimizer']} | {r['tokens_per_s']:,} | {r['step_s']} | {r['peak_gib']} | "
              f"{r['first_loss']} | {ratio} |")
    firsts = {r["variant"]: r["first_loss"] for r in results if "first_loss" in r}
    ours = [v for k, v in firsts.items() if k.startswith("ours")]
    hf = [v for k, v in firsts.items() if k.startswith("hf")]
    if ours and hf:
        gap = max(abs(a - b) / abs(b) for a in ours for b in hf)
        print(f"parity of the first loss, ours vs HF (same weights and tokens): largest relative gap {gap:.2e} "
              f"({'ok' if gap < 1e-2 else 'NOT within'} 1e-2)")


if __name__ == "__main__":
    main()
