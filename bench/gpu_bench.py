"""LoRA training throughput and peak memory on one GPU: ours and the peer stacks, side by side.

Every variant runs in its own process (clean peak-memory counters) on the same setting: a
Mistral-7B-v0.3-shaped model with random weights, random tokens, `--seq` tokens per row,
`--bs` rows per step, LoRA r=16 alpha=16 on all seven projections, fused AdamW, `--warm`
warm-up steps, then the median of `--steps` timed steps. Useful MFU counts 4N + 3x causal
attention forward FLOPs per token (no recompute) against `--peak-tflops` (the bf16 matmul rate
measured on the H100 machine).

    python bench/gpu_bench.py --variants parity,ours_fast,ours_ac,ours_lean,ours_packed \
        --peers hf_sdpa,hf_liger,unsloth_lora --out "$OUT"

Ours: `ours_fast` (FlexAttention + compiled layers + fused loss, no recompute: uses the GPU's
memory instead of recomputing), `ours_ac` (the same with per-layer activation checkpointing),
`ours_lean` (checkpointing with the saved layer inputs offloaded to pinned CPU memory, backward
one batch row at a time; `ours_lean_batched` the whole batch at once),
`ours_packed` (ours_fast on packed variable-length chat rows, 20..4000 tokens, mean ~350),
`ours_eager` (the plain CPU path run on the GPU: dense SDPA mask, no compile, checkpointing),
`ours_qlora` (NF4 base as `adapter: qlora`, compiled layers that trace bitsandbytes'
dequantization ops, checkpointing + offload), `ours_qlora_ac` (no offload), `ours_qlora_eager` (eager layers).
The table `OURS` below lists what each variant turns on.
`parity` checks on a 2-layer slice of the same shapes that the fast path's loss and LoRA gradients
equal the plain path's within bf16 tolerance.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SHAPE = dict(vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
             rope_theta=1e6, sliding_window=None)  # Mistral-7B-v0.3
SHAPES = {
    "7b": SHAPE,
    # Mistral-Nemo-12B: head_dim 128 is narrower than hidden / heads (160).
    "12b": dict(vocab_size=131072, hidden_size=5120, intermediate_size=14336, num_hidden_layers=40,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                rope_theta=1e6, sliding_window=None),
}


def n_params(shape: dict) -> int:
    h, q = shape["hidden_size"], shape["num_attention_heads"] * shape.get("head_dim", shape["hidden_size"] //
                                                                             shape["num_attention_heads"])
    kv = q // shape["num_attention_heads"] * shape["num_key_value_heads"]
    layer = 2 * h * q + 2 * h * kv + 3 * h * shape["intermediate_size"] + 2 * h
    return 2 * shape["vocab_size"] * h + shape["num_hidden_layers"] * layer + h


def useful_flops_per_token(seq: int) -> float:
    width = SHAPE["num_attention_heads"] * SHAPE.get("head_dim", SHAPE["hidden_size"] // SHAPE["num_attention_heads"])
    attn_fwd = 4 * (seq / 2) * width * SHAPE["num_hidden_layers"]
    return 4 * n_params(SHAPE) + 3 * attn_fwd


# --------------------------------------------------------------------------- our stack
def _build_ours(n_layers: int | None = None, lora_b_std: float = 0.0, qlora: bool = False,
                checkpoint: str | None = None, mlp_chunk: int | None = None):
    """Our model of SHAPE (cut to n_layers) with LoRA, random or read from `checkpoint` (as `train` reads
    it); mlp_chunk: tokens an MLP computes at once where it keeps no activations (0: whole rows)."""
    import torch

    from mistral_tune.models.families import MISTRAL
    from mistral_tune.models.lora import LoraSpec, apply_lora
    from mistral_tune.models.mistral import MistralConfig, MistralForCausalLM
    from mistral_tune.models.quant import quantize_model

    shape = dict(SHAPE)
    if n_layers:
        shape["num_hidden_layers"] = n_layers
    if checkpoint is not None:
        from mistral_tune.models.load import load_model

        model, _ = load_model(checkpoint, dtype=torch.bfloat16, device="cuda")
    else:
        cfg = MistralConfig(**shape)
        torch.set_default_dtype(torch.bfloat16)
        with torch.device("cuda"):
            model = MistralForCausalLM(cfg)
        torch.set_default_dtype(torch.float32)
        model.init_weights(std=0.02)
    if qlora:  # NF4 base, as `adapter: qlora` trains it
        quantize_model(model, list(MISTRAL.projections), "cuda")
        torch.cuda.empty_cache()
    apply_lora(model, LoraSpec(r=16, alpha=16))
    if mlp_chunk is not None:
        model.configure(mlp_chunk_tokens=mlp_chunk or 2**62)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # as the trainer does: LoRA weights and their optimizer state in float32
        p.data = p.data.float()
    if lora_b_std:
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, 0.0, lora_b_std)
    model.train()
    return model, params


def _random_rows(bs: int, seq: int, packed: bool, gen):
    """A Batch of random tokens, every position trained; packed rows hold chat-like lengths."""
    import random

    import torch

    from mistral_tune.data.pack import Sample, collate, pack_rows

    if not packed:
        ids = torch.randint(0, SHAPE["vocab_size"], (bs, seq + 1), generator=gen)
        samples = [Sample(ids[i, :-1].tolist(), ids[i, 1:].tolist()) for i in range(bs)]
        return collate(samples, [[i] for i in range(bs)], seq)
    rng = random.Random(int(torch.randint(0, 2**31, (1,), generator=gen)))
    samples, total = [], 0
    while total < 8 * bs * seq:  # enough samples that best-fit packing has choices to make
        n = min(4000, seq, max(20, int(rng.lognormvariate(math.log(250), 0.9))))
        toks = [rng.randrange(SHAPE["vocab_size"]) for _ in range(n + 1)]
        samples.append(Sample(toks[:-1], toks[1:]))
        total += n
    rows = pack_rows([len(s) for s in samples], seq)
    rows = sorted(rows, key=lambda r: -sum(len(samples[i]) for i in r))[bs:2 * bs]  # typical, not the best
    return collate(samples, rows, seq)


# What each of our variants turns on: NF4 base, compiled layers, checkpointing, host offload of
# the kept layer inputs, checkpointed backward one row at a time, packed chat rows.
_V = dict(qlora=False, compiled=True, ckpt=False, offload=False, by_row=False, packed=False)
OURS = {
    "ours_fast": _V,
    "ours_ac": {**_V, "ckpt": True},
    "ours_lean": {**_V, "ckpt": True, "offload": True, "by_row": True},  # as offload_activations: true
    "ours_lean_batched": {**_V, "ckpt": True, "offload": True},
    "ours_packed": {**_V, "packed": True},
    "ours_eager": {**_V, "compiled": False, "ckpt": True},
    "ours_qlora": {**_V, "qlora": True, "ckpt": True, "offload": True, "by_row": True},
    "ours_qlora_ac": {**_V, "qlora": True, "ckpt": True},
    "ours_qlora_eager": {**_V, "qlora": True, "compiled": False, "ckpt": True, "offload": True, "by_row": True},
}


def run_ours(variant: str, seq: int, bs: int, steps: int, warm: int) -> dict:
    import torch


    v = OURS[variant]
    packed = v["packed"]
    checkpoint = None
    if ARGS.from_checkpoint:
        from peers import ensure_checkpoint

        checkpoint = ensure_checkpoint(SHAPE)  # written once, outside the time to the first step
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    model, params = _build_ours(qlora=v["qlora"], checkpoint=checkpoint, mlp_chunk=ARGS.mlp_chunk)
    torch.cuda.reset_peak_memory_stats()  # the bf16 weights existed only until quantized
    if variant != "ours_eager":
        model.use_fast_path(compile_layers=v["compiled"], one_sample_rows=not packed)
    model.configure(gradient_checkpointing=v["ckpt"], offload_activations=v["offload"], recompute_by_row=v["by_row"])
    opt = torch.optim.AdamW(params, lr=2e-5, fused=True)
    gen = torch.Generator().manual_seed(0)
    batches = [_random_rows(bs, seq, packed, gen) for _ in range(4)]
    load_s = time.time() - t0
    times, real_tokens, losses = [], [], []
    prof = None
    for step in range(warm + steps):
        batch = batches[step % len(batches)].to("cuda")
        if PROFILE and step == warm:
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            prof.__enter__()
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.token_loss(batch)
        n = batch.n_trained
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step == 0:
            first_step_s = time.time() - t0  # build or load, compile, one step
        if step >= warm:
            times.append(time.perf_counter() - t)
            real_tokens.append(batch.n_real)
            losses.append(float(loss) / n)
    if prof is not None:
        prof.__exit__(None, None, None)
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
        Path(ARGS.out, f"{variant}_profile.txt").write_text(table)
        print(table[-6000:], flush=True)
    med = sorted(times)[len(times) // 2]
    tok_s = sorted(r / t for r, t in zip(real_tokens, times))[len(times) // 2]
    return dict(variant=variant, seq=seq, bs=bs, step_s=round(med, 4), tokens_per_s=round(tok_s),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2), load_s=round(load_s, 1),
                first_step_s=round(first_step_s, 1), from_checkpoint=ARGS.from_checkpoint,
                mlp_chunk=ARGS.mlp_chunk,
                mfu_useful=round(tok_s * useful_flops_per_token(seq) / (ARGS.peak_tflops * 1e12), 3),
                loss=round(losses[-1], 3), real_token_share=round(sum(real_tokens) / (len(times) * bs * seq), 3))


def run_parity(seq: int, bs: int) -> dict:
    """Fast path vs plain path on the same batch, both in bf16 autocast, and each against a
    float32 reference of the plain path: loss and every LoRA gradient (relative L2 norm). Also
    the fast path with checkpointing + host offload against the fast path, and the same checks
    on an NF4 (QLoRA) base."""
    import copy

    import torch


    def grads(m, ps, fast: bool, autocast: bool, batch, lean: bool = False):
        # fixed rows take the causal kernel, packed ones the block mask
        m.configure(attn_impl="flex" if fast else "sdpa", fused_loss=fast, one_sample_rows=fast,
                    gradient_checkpointing=lean, offload_activations=lean, recompute_by_row=lean)
        for p in ps:
            p.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = m.token_loss(batch) / batch.n_trained
        loss.backward()
        return float(loss), [p.grad.float().clone() for p in ps]

    def rel(a, b):
        return max(float((x - y).norm() / y.norm().clamp_min(1e-12)) for x, y in zip(a, b))

    out = {}
    for qlora in (False, True):
        torch.manual_seed(0)
        model, params = _build_ours(n_layers=2, lora_b_std=0.02, qlora=qlora, mlp_chunk=ARGS.mlp_chunk)
        ref = copy.deepcopy(model).float()  # an NF4 base stays NF4 (dequantized in float32)
        ref_params = [p for p in ref.parameters() if p.requires_grad]
        gen = torch.Generator().manual_seed(1)
        for name, packed in (("fixed", False), ("packed", True)):
            batch = _random_rows(bs, seq, packed, gen).to("cuda")
            l_ref, g_ref = grads(ref, ref_params, False, False, batch)
            l_plain, g_plain = grads(model, params, False, True, batch)
            l_fast, g_fast = grads(model, params, True, True, batch)
            l_lean, g_lean = grads(model, params, True, True, batch, lean=True)
            out[("qlora_" if qlora else "") + name] = dict(
                loss_fp32=round(l_ref, 5), loss_plain=round(l_plain, 5), loss_fast=round(l_fast, 5),
                grad_fast_vs_plain=round(rel(g_fast, g_plain), 4),
                grad_plain_vs_fp32=round(rel(g_plain, g_ref), 4), grad_fast_vs_fp32=round(rel(g_fast, g_ref), 4),
                loss_lean_vs_fast=abs(l_lean - l_fast), grad_lean_vs_fast=round(rel(g_lean, g_fast), 4),
                grad_lean_vs_fp32=round(rel(g_lean, g_ref), 4),
                # Each bf16 path no further from float32 than the plain bf16 path (or within 1e-2).
                ok=abs(l_fast - l_plain) / abs(l_plain) < 1e-2 and abs(l_lean - l_plain) / abs(l_plain) < 1e-2
                and max(rel(g_fast, g_ref), rel(g_lean, g_ref)) <= max(1e-2, 1.25 * rel(g_plain, g_ref)),
            )
        del model, ref
        torch.cuda.empty_cache()
    return dict(variant="parity", **out)


# --------------------------------------------------------------------------- driver
def main() -> None:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="parity,ours_fast,ours_ac,ours_lean,ours_packed,ours_qlora")
    parser.add_argument("--peers", default="", help="hf_sdpa,hf_liger,hf_qlora,unsloth_lora,unsloth_qlora")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--bs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warm", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=798.0)
    parser.add_argument("--timeout", type=int, default=300, help="seconds per variant")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    parser.add_argument("--profile", action="store_true", help="print the top CUDA kernels of our variants")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b", help="7b: Mistral-7B-v0.3, 12b: Mistral-Nemo")
    parser.add_argument("--from-checkpoint", action="store_true",
                        help="ours loads the peers' random checkpoint from disk (as `train` would) instead of "
                        "building the model in place: time to the first step comparable with the peers'")
    parser.add_argument("--mlp-chunk", type=int, help="tokens an MLP computes at once where it keeps no "
                        "activations (0: whole rows; default: the model's own)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    ARGS = parser.parse_args()
    global SHAPE
    SHAPE = SHAPES[ARGS.shape]
    global PROFILE
    PROFILE = ARGS.profile

    if ARGS.worker:
        if ARGS.worker == "parity":
            res = run_parity(min(ARGS.seq, 2048), ARGS.bs)
        elif ARGS.worker.startswith("ours"):
            res = run_ours(ARGS.worker, ARGS.seq, ARGS.bs, ARGS.steps, ARGS.warm)
        else:
            from peers import run_peer

            res = run_peer(ARGS.worker, SHAPE, ARGS.seq, ARGS.bs, ARGS.steps, ARGS.warm, ARGS.peak_tflops,
                           useful_flops_per_token(ARGS.seq))
        print("RESULT " + json.dumps(res), flush=True)
        return

    out = Path(ARGS.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [v for v in (ARGS.variants.split(",") + ARGS.peers.split(",")) if v]
    results = []
    for name in names:
        cmd = [sys.executable, __file__, "--worker", name, "--seq", str(ARGS.seq), "--bs", str(ARGS.bs),
               "--steps", str(ARGS.steps), "--warm", str(ARGS.warm), "--peak-tflops", str(ARGS.peak_tflops),
               "--out", str(out), "--shape", ARGS.shape] + (["--profile"] if ARGS.profile else []) \
            + (["--from-checkpoint"] if ARGS.from_checkpoint else []) \
            + (["--mlp-chunk", str(ARGS.mlp_chunk)] if ARGS.mlp_chunk is not None else [])
        t = time.time()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=ARGS.timeout,
                                  env={**os.environ, "PYTHONPATH": f"{ROOT / 'bench'}:{ROOT / 'src'}:"
                                       + os.environ.get("PYTHONPATH", "")})
            log = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            log = f"{exc.stdout or ''}{exc.stderr or ''}\nTIMEOUT after {ARGS.timeout}s"
        (out / f"{name}.log").write_text(log if isinstance(log, str) else log.decode())
        line = next((ln for ln in str(log).splitlines() if ln.startswith("RESULT ")), None)
        res = json.loads(line[7:]) if line else dict(variant=name, error=str(log).strip().splitlines()[-1:])
        res["wall_s"] = round(time.time() - t, 1)
        results.append(res)
        print(json.dumps(res), flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))  # kept if a later variant hangs
    print_table(results)


def print_table(results: list[dict]) -> None:
    import torch

    ref = {r["variant"]: r.get("tokens_per_s") for r in results}
    base = ref.get("unsloth_lora")
    print(f"\n{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}, torch {torch.__version__}")
    print(f"shape {ARGS.shape}, {ARGS.seq} x {ARGS.bs}")
    print("| stack | tokens/s | peak GiB | useful MFU | vs Unsloth LoRA | vs Unsloth QLoRA | to first step s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if r["variant"] == "parity":
            print(f"parity: {json.dumps({k: v for k, v in r.items() if k != 'variant'})}")
            continue
        if "tokens_per_s" not in r:
            print(f"| {r['variant']} | error: {r.get('error')} | | | |")
            continue
        ratios = [f"{r['tokens_per_s'] / b:.2f}x" if b else "-" for b in (base, ref.get("unsloth_qlora"))]
        print(f"| {r['variant']} | {r['tokens_per_s']:,} | {r['peak_gib']} | {r['mfu_useful']} | {' | '.join(ratios)} "
              f"| {r.get('first_step_s', '-')} |")


ARGS: argparse.Namespace
PROFILE = False

if __name__ == "__main__":
    main()
