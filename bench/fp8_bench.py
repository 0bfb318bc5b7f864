"""FP8 frozen base (`base_precision: fp8`) against the bf16 base, on one GPU.

1. gemm: the frozen base's two GEMMs at Mistral-7B layer shapes (M = seq x batch tokens): bf16
   matmul against torch._scaled_mm with row-wise scales (TFLOP/s), and the FP8 layer's whole
   forward + input gradient, quantization included, eager.
2. step (bf16, fp8): a LoRA training step (r=16 on all seven projections, fused AdamW, bf16
   autocast, the fast path's compiled layers) on a Mistral-7B-shaped model cut to `--layers`
   layers, random weights, `--bs` rows of `--seq` random tokens: tokens/s, peak memory, and the
   bytes of the base's projection weights. Each in its own process (clean peak-memory counters).
3. parity: the same model, LoRA (lora_B non-zero) and batch over a bf16 and an FP8 base, eager:
   the loss of both, and the LoRA gradients' relative difference.
4. learn: `mistral-tune train`'s own loop, `--learn-steps` steps of LoRA on the bundled
   quickstart data over a tiny random model (hidden 256, 4 layers), bf16 vs fp8 base, for each of
   `--learn-seeds`: final held-out loss of both. Runs on a CPU too (torch._scaled_mm has a CPU
   kernel): `--parts learn`.

    python bench/fp8_bench.py                 # about 2 minutes on one H200; JSON under $OUT
    python bench/fp8_bench.py --smoke         # toy sizes on the CPU (checks the script runs)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from mistral_tune.models.families import MISTRAL  # noqa: E402

SHAPE = dict(vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
             num_key_value_heads=8, max_position_embeddings=32768, rope_theta=1e6, sliding_window=None)
TOY = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
           max_position_embeddings=512, rope_theta=1e4, sliding_window=None)
PROJECTIONS = list(MISTRAL.projections)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time(fn, reps: int) -> float:
    fn()
    _sync()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync()
    return (time.perf_counter() - t) / reps


def _peak_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# --------------------------------------------------------------------------- 1. GEMMs
def _gemm(args, m: int, k: int, n: int) -> dict:
    from mistral_tune.models.fp8 import FP8Linear, quantize_rows

    dev = _device()
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    x = torch.randn(m, k, device=dev, dtype=dt)
    w = torch.randn(n, k, device=dev, dtype=dt) * 0.02
    layer = FP8Linear.from_linear(torch.nn.Linear(k, n, bias=False, device=dev, dtype=dt).requires_grad_(False))
    x_codes, x_scale = quantize_rows(x)
    x_grad = x.clone().requires_grad_(True)
    grad = torch.randn(m, n, device=dev, dtype=dt)
    reps = 2 if args.smoke else 20
    flop = 2 * m * n * k
    t_bf16 = _time(lambda: x @ w.t(), reps)
    t_fp8 = _time(lambda: torch._scaled_mm(x_codes, layer.codes.t(), scale_a=x_scale, scale_b=layer.scale[None, :],
                                           out_dtype=torch.bfloat16), reps)
    t_layer = _time(lambda: layer(x_grad).backward(grad), reps)
    return dict(part="gemm", shape=f"{m}x{k}->{n}", bf16_tflops=round(flop / t_bf16 / 1e12, 1),
                fp8_tflops=round(flop / t_fp8 / 1e12, 1), fp8_layer_fwd_bwd_tflops=round(2 * flop / t_layer / 1e12, 1))


def run_gemm(args) -> list[dict]:
    shape = TOY if args.smoke else SHAPE
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = shape["num_key_value_heads"] * h // shape["num_attention_heads"]
    rows = []
    for k, n in ((h, h), (h, kv), (h, i), (i, h)):  # q/o, k/v, gate/up, down
        rows.append(_gemm(args, args.seq * args.bs, k, n))
        print(json.dumps(rows[-1]), flush=True)
    return rows


# --------------------------------------------------------------------------- 2. training step
def _build(args, fp8: bool, seed: int = 0):
    from mistral_tune.models.fp8 import fp8_model
    from mistral_tune.models.lora import LoraSpec, apply_lora
    from mistral_tune.models.mistral import MistralConfig, MistralForCausalLM

    dev = _device()
    cfg = MistralConfig(**(TOY if args.smoke else SHAPE), num_hidden_layers=args.layers)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.set_default_dtype(dt)
    with torch.device(dev):
        model = MistralForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.init_weights(std=0.02, generator=torch.Generator(dev).manual_seed(seed))
    if fp8:
        fp8_model(model, PROJECTIONS, dev)
    apply_lora(model, LoraSpec(r=16, alpha=16))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # as the trainer does: LoRA weights and their optimizer state in float32
        p.data = p.data.float()
    return model.train(), params


def _base_bytes(model) -> int:
    total = 0
    for name, module in model.named_modules():
        if name.rpartition(".")[2] in PROJECTIONS:
            # the frozen weight: an nn.Linear's (under LoRA: the wrapper's own), or FP8 codes and scales
            total += sum(t.numel() * t.element_size() for t in module.buffers())
            if getattr(module, "weight", None) is not None:
                total += module.weight.numel() * module.weight.element_size()
    return total


def _batch(args, seed: int):
    from mistral_tune.data.pack import Sample, collate

    vocab = (TOY if args.smoke else SHAPE)["vocab_size"]
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (args.bs, args.seq + 1), generator=gen)
    samples = [Sample(ids[r, :-1].tolist(), ids[r, 1:].tolist()) for r in range(args.bs)]
    return collate(samples, [[r] for r in range(args.bs)], args.seq).to(_device())


def _loss(model, batch):

    dev = _device()
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        return model.token_loss(batch) / batch.n_trained


def run_step(args, variant: str) -> dict:
    fp8 = variant == "fp8"
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    model, params = _build(args, fp8)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # the bf16 weights lived only until converted
        model.use_fast_path(compile_layers=not args.eager, one_sample_rows=True)
    model.configure(gradient_checkpointing=args.ckpt)
    opt = torch.optim.AdamW(params, lr=1e-5, fused=torch.cuda.is_available())
    batches = [_batch(args, s) for s in range(2)]
    times, losses = [], []
    for step in range(args.warm + args.steps):
        _sync()
        t = time.perf_counter()
        loss = _loss(model, batches[step % 2])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync()
        if step == args.warm - 1:
            warm_s = time.time() - t0
        if step >= args.warm:
            times.append(time.perf_counter() - t)
            losses.append(float(loss))
    med = sorted(times)[len(times) // 2]
    return dict(part="step", variant=variant, layers=args.layers, seq=args.seq, bs=args.bs, ckpt=args.ckpt,
                compiled=not args.eager and torch.cuda.is_available(), step_s=round(med, 4),
                tokens_per_s=round(args.seq * args.bs / med), peak_gib=round(_peak_gib(), 2),
                base_weight_mib=round(_base_bytes(model) / 2**20, 3), build_and_warm_s=round(warm_s, 1),
                loss=round(losses[-1], 4))


# --------------------------------------------------------------------------- 3. parity
def run_parity(args) -> dict:
    from mistral_tune.models.lora import LoraLinear

    results = []
    for fp8 in (False, True):
        model, params = _build(args, fp8, seed=1)
        gen = torch.Generator(_device()).manual_seed(2)
        with torch.no_grad():  # the same non-zero adapter on both
            for m in model.modules():
                if isinstance(m, LoraLinear):
                    m.lora_A.weight.normal_(0, 0.02, generator=gen)
                    m.lora_B.weight.normal_(0, 0.02, generator=gen)
        loss = _loss(model, _batch(args, 7))
        loss.backward()
        results.append((float(loss.detach()), [p.grad.float() for p in params]))
        del model, params
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    (l_bf16, g_bf16), (l_fp8, g_fp8) = results
    rel = [float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(g_fp8, g_bf16, strict=True)]
    return dict(part="parity", layers=args.layers, loss_bf16=round(l_bf16, 5), loss_fp8=round(l_fp8, 5),
                loss_rel_diff=round(abs(l_fp8 - l_bf16) / l_bf16, 5),
                lora_grad_rel_diff_median=round(sorted(rel)[len(rel) // 2], 4),
                lora_grad_rel_diff_max=round(max(rel), 4))


# --------------------------------------------------------------------------- 4. learning check
def run_learn(args) -> list[dict]:
    from mistral_tune.config import config_from_dict
    from mistral_tune.quickstart import create_tiny_model, data_dir
    from mistral_tune.train.loop import train

    work = Path(tempfile.mkdtemp(prefix="fp8_bench_"))
    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1) if args.smoke else dict(
        hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)
    model_dir = create_tiny_model(work / "model", "v3", **size)
    rows = []
    for seed, precision in ((seed, precision) for seed in args.learn_seeds for precision in ("bf16", "fp8")):
        cfg = config_from_dict({
            "base_model": str(model_dir), "tokenizer": "v3", "datasets": [{"path": str(data_dir() / "train.jsonl")}],
            "val_set_size": 0.05, "sequence_len": 256, "sample_packing": True, "lora_r": 32, "lora_alpha": 32,
            "learning_rate": 3e-3, "warmup_steps": 10, "max_steps": args.learn_steps, "micro_batch_size": 8,
            "logging_steps": 1, "eval_steps": 10_000, "fast_path": False, "dataset_cache": False, "seed": seed,
            "output_dir": str(work / f"{precision}-{seed}"), "base_precision": precision,
        })
        t = time.time()
        result = train(cfg, echo=lambda *_: None)
        first = json.loads((work / f"{precision}-{seed}" / "metrics.jsonl").read_text().splitlines()[0])
        rows.append(dict(part="learn", variant=precision, seed=seed, steps=args.learn_steps,
                         first_train_loss=round(first["loss"], 4),
                         final_train_loss=round(result.final_train_loss, 4), heldout_loss=round(result.eval_loss, 4),
                         seconds=round(time.time() - t, 1)))
        print(json.dumps(rows[-1]), flush=True)
    return rows


# --------------------------------------------------------------------------- driver
def _table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"{r.get('part')} {r.get('variant', '')}: ERROR {r['error']}")
        else:
            lines.append("  ".join(f"{k}={v}" for k, v in r.items()))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--bs", type=int, default=2)
    p.add_argument("--warm", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--ckpt", action="store_true", help="per-layer activation checkpointing in the step")
    p.add_argument("--eager", action="store_true", help="no compiled layers in the step")
    p.add_argument("--learn-steps", type=int, default=200)
    p.add_argument("--learn-seeds", type=lambda v: [int(x) for x in v.split(",")], default=[0],
                   help="seeds of the learning check (LoRA init, data order), e.g. 0,1,2")
    p.add_argument("--parts", default="gemm,step,parity,learn")
    p.add_argument("--smoke", action="store_true", help="toy sizes on the CPU")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: one step variant in this process
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = p.parse_args()
    if args.smoke:
        args.seq, args.bs, args.warm, args.steps, args.learn_steps = 64, 2, 1, 2, min(args.learn_steps, 5)
    if args.one:
        print("RESULT " + json.dumps(run_step(args, args.one)), flush=True)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    rows: list[dict] = []
    t0 = time.time()

    def save() -> None:
        (out / "fp8_bench.json").write_text(json.dumps(dict(args=vars(args), results=rows), indent=2) + "\n")

    def attempt(part: str, fn) -> None:
        try:
            got = fn()  # a list of rows was printed row by row as it came
            rows.extend(got if isinstance(got, list) else [got])
        except Exception as exc:  # one part failing still reports the others
            got = dict(part=part, error=f"{type(exc).__name__}: {str(exc)[:300]}")
            rows.append(got)
        if isinstance(got, dict):
            print(json.dumps(got), flush=True)
        save()

    if "gemm" in parts:
        attempt("gemm", lambda: run_gemm(args))
    if "step" in parts:
        for variant in ("bf16", "fp8"):
            for eager in ([False, True] if not args.eager else [True]):
                cmd = [sys.executable, __file__, "--one", variant] + sys.argv[1:] + (["--eager"] if eager else [])
                proc = subprocess.run(cmd, capture_output=True, text=True)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line:
                    rows.append(json.loads(line[7:]))
                else:
                    error = (proc.stderr.strip().splitlines() or ["?"])[-1]
                    rows.append(dict(part="step", variant=variant, eager=eager, error=error))
                    print(proc.stderr[-3000:], file=sys.stderr)
                print(json.dumps(rows[-1]), flush=True)
                save()
                if line:  # compiled worked: no eager run; else the eager layers say whether compiling was the cause
                    break
    if "parity" in parts:
        attempt("parity", lambda: run_parity(args))
    if "learn" in parts:
        attempt("learn", lambda: run_learn(args))
    steps = {r["variant"]: r for r in rows if r.get("part") == "step" and "error" not in r}
    if len(steps) == 2:
        bf16, fp8 = steps["bf16"], steps["fp8"]
        rows.append(dict(part="summary", compiled=(bf16["compiled"], fp8["compiled"]),
                         fp8_speedup=round(fp8["tokens_per_s"] / bf16["tokens_per_s"], 3),
                         peak_gib_saved=round(bf16["peak_gib"] - fp8["peak_gib"], 2),
                         base_weight_ratio=round(fp8["base_weight_mib"] / bf16["base_weight_mib"], 3)))
    rows.append(dict(part="total", seconds=round(time.time() - t0, 1), device=torch.cuda.get_device_name()
                     if torch.cuda.is_available() else "cpu"))
    save()
    print(_table(rows))


if __name__ == "__main__":
    main()
