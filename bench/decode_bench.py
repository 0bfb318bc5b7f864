"""Decoding at Mistral-7B shapes against the GPU's own limits, in one command.

The limits are measured here first: the device-to-device copy bandwidth (bytes read and written per
second) and a bf16 8192^3 matrix product. Then, on a model of Mistral-7B-v0.3's shapes with random
bf16 weights (random weights never say end of sequence: every answer runs to its length):

- batch-1 decoding at 1k and 8k tokens of context: time per token against (weight bytes + the keys
  and values read) / the copy bandwidth;
- batch 64 of mixed prompt lengths: the step against the batch-1 step;
- prefill of 2k-token prompts: achieved TFLOP/s against the measured matrix-product peak;
- LoRA (r 16, all seven projections) applied unmerged: the step against the merged model's; QLoRA
  (an NF4 base): the batch-1 step against the 4-bit weights' bandwidth limit;
- parity: cached decoding's logits against one full forward (bf16), and greedy tokens of the engine
  (CUDA graphs) against decoding with no cache at all (float32, 4 layers, mixed prompts);
- peers: transformers' generate with its static cache and torch.compile (its fastest path).

    python3 bench/decode_bench.py            # one GPU, about 5 minutes
    python3 bench/decode_bench.py --smoke    # 2 tiny layers on CPU (the code paths only)

Prints a table last and writes $OUT/decode_bench.json (OUT defaults to ./out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_bench import SHAPE  # noqa: E402  (Mistral-7B-v0.3's shapes)

from mistral_tune.generate.cache import cached_logits, kv_bytes_per_token  # noqa: E402
from mistral_tune.generate.decoder import Decoder, Params  # noqa: E402
from mistral_tune.models.mistral import MistralConfig, MistralForCausalLM  # noqa: E402

TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096)
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeat: int = 1) -> float:
    sync()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - t) / repeat


def copy_bandwidth(device: str) -> float:
    """Bytes read + written per second by a device-to-device copy of 2 GiB."""
    n = 2 * 2**30 if device == "cuda" else 2**24
    x = torch.empty(n, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    return 2 * n / timed(lambda: y.copy_(x), 10)


def matmul_peak(device: str) -> float:
    n = 8192 if device == "cuda" else 256
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    return 2 * n**3 / timed(lambda: a @ b, 10)


def build(shape: dict, device: str, dtype: torch.dtype, layers: int | None = None) -> MistralForCausalLM:
    cfg = MistralConfig(**{**shape, **({"num_hidden_layers": layers} if layers else {})})
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = MistralForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.init_weights(std=0.02, generator=None)
    return model.eval()


def read_bytes(model) -> int:
    """What one decoding step reads of the weights: all of them but the embedding table (one row)."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n) + sum(
        b.numel() * b.element_size() for b in model.buffers())


def prompts_of(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def decode_step_time(model, lengths: list[int], steps: int, slots: int | None = None) -> tuple[float, Decoder]:
    """Seconds per decoding step with sequences of the given prompt lengths running (graphs warmed)."""
    dec = Decoder(model, slots=slots or len(lengths), capacity=max(lengths) + steps + 8)
    dec.add_many([(p, Params(max_tokens=10**6), lambda _: None) for p in prompts_of(lengths, model.config.vocab_size)])
    for _ in range(3):
        dec.step()
    t = timed(dec.step, steps)
    return t, dec


def prefill_time(model, n: int, length: int) -> float:
    dec = Decoder(model, slots=n, capacity=length + 8)
    prompts = [(p, Params(max_tokens=1), lambda _: None) for p in prompts_of([length] * n, model.config.vocab_size)]
    dec.add_many(prompts)  # warm-up

    def fresh() -> None:  # no kept prefix: every prompt is computed in full
        dec.forget()
        dec.add_many(prompts)

    return timed(fresh, 3)


def parity(device: str) -> dict:
    """bf16 7B-shaped layers: cached logits vs one full forward; float32: engine greedy vs no cache."""
    from mistral_tune.generate.run import generate_batch
    from plain_decoding import plain_greedy

    out = {}
    small = build(SHAPE if device == "cuda" else TINY, device, torch.float32, layers=4 if device == "cuda" else 2)
    prompts = prompts_of([37, 5, 120, 64, 9, 200, 77, 3], small.config.vocab_size, seed=3)
    got = generate_batch(small, prompts, 24, batch_size=3)
    want = [plain_greedy(small, p, 24) for p in prompts]
    out["greedy_equal_float32"] = f"{sum(a == b for a, b in zip(got, want, strict=True))}/{len(want)}"
    x = torch.tensor(prompts_of([96], small.config.vocab_size, seed=4), device=device)
    with torch.no_grad():
        full = small(x)
        steps = cached_logits(small, x, [(0, 64)] + [(i, i + 1) for i in range(64, 96)])
    out["cached_vs_full_max_rel_float32"] = float((steps - full).abs().max() / full.abs().max())
    del small
    return out


def hf_static_compiled(model, context: int, new: int) -> float | str:
    """Seconds per token of transformers' generate (static cache, compiled forward) on our weights."""
    try:
        import transformers
    except ImportError as exc:
        return f"not run: {exc}"
    cfg = model.config
    hf_cfg = transformers.MistralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta, sliding_window=None, head_dim=cfg.head_dim)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        hf = transformers.MistralForCausalLM(hf_cfg)
    torch.set_default_dtype(torch.float32)
    hf.load_state_dict(model.state_dict(), strict=False)
    hf.eval()
    hf.generation_config.cache_implementation = "static"
    hf.forward = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True)
    ids = torch.tensor(prompts_of([context], cfg.vocab_size), device="cuda")
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        for _ in range(2):  # compile and capture at both lengths
            hf.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
            hf.generate(ids, max_new_tokens=8, min_new_tokens=8, **kw)
        long = timed(lambda: hf.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw), 2)
        short = timed(lambda: hf.generate(ids, max_new_tokens=8, min_new_tokens=8, **kw), 2)
    return (long - short) / (new - 8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: qlora,hf")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shape = SHAPE if device == "cuda" else TINY
    skip = set(args.skip.split(","))
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    r: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
               "shape": shape}
    bw, peak = copy_bandwidth(device), matmul_peak(device)
    r["copy_bandwidth_GBps"], r["matmul_peak_TFLOPs"] = round(bw / 1e9, 1), round(peak / 1e12, 1)
    print(json.dumps(r), flush=True)
    r["parity"] = parity(device)
    print(json.dumps(r["parity"]), flush=True)

    model = build(shape, device, dtype)
    weights = read_bytes(model)
    kv_per_token = kv_bytes_per_token(model.config, dtype)
    rows = []
    short, long = (960, 8000) if device == "cuda" else (64, 200)
    for ctx in (short, long):
        t, dec = decode_step_time(model, [ctx], 48)
        limit = (weights + kv_per_token * (ctx + 24)) / bw
        rows.append((f"batch 1, context {ctx}", t * 1e3, limit * 1e3, t / limit))
        del dec
    b1 = rows[0][1]
    lengths = torch.randint(64, 1024, (64,), generator=torch.Generator().manual_seed(5)).tolist()
    t64, dec = decode_step_time(model, lengths, 32)
    del dec
    limit64 = (weights + kv_per_token * sum(lengths)) / bw
    rows.append(("batch 64, contexts 64-1024", t64 * 1e3, limit64 * 1e3, t64 / limit64))
    r["batch64_over_batch1"] = round(t64 * 1e3 / b1, 3)
    n_pre, l_pre = (8, 2048) if device == "cuda" else (2, 64)
    tp = prefill_time(model, n_pre, l_pre)
    cfg = model.config
    flops = n_pre * l_pre * (2 * (weights / 2 - cfg.vocab_size * cfg.hidden_size) + 2 * cfg.vocab_size *
                             cfg.hidden_size / l_pre) + n_pre * 2 * l_pre**2 * cfg.num_attention_heads * cfg.head_dim \
        * cfg.num_hidden_layers
    r["prefill"] = {"prompts": n_pre, "tokens": l_pre, "seconds": round(tp, 4), "TFLOPs": round(flops / tp / 1e12, 1),
                    "of_peak": round(flops / tp / peak, 3)}
    print(json.dumps(r["prefill"]), flush=True)

    from mistral_tune.models.lora import LoraSpec, apply_lora
    apply_lora(model, LoraSpec(r=16, alpha=16, target_modules=PROJECTIONS))
    model.to(device)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = p.data.to(dtype)
            if "lora_B" in n:
                torch.nn.init.normal_(p, 0.0, 0.01)
    tl1, dec = decode_step_time(model, [short], 48)
    del dec
    tl64, dec = decode_step_time(model, lengths, 32)
    del dec
    rows.append(("LoRA unmerged, batch 1", tl1 * 1e3, b1, tl1 * 1e3 / b1))
    rows.append(("LoRA unmerged, batch 64", tl64 * 1e3, t64 * 1e3, tl64 / t64))
    r["lora_over_merged"] = {"batch1": round(tl1 * 1e3 / b1, 3), "batch64": round(tl64 / t64, 3)}
    del model
    if device == "cuda":
        torch.cuda.empty_cache()

    if "qlora" not in skip and device == "cuda":
        try:
            from mistral_tune.models.quant import quantize_model
            q = build(shape, "cuda", dtype)
            quantize_model(q, PROJECTIONS, device="cuda")
            qbytes = read_bytes(q)
            layer = q.model.layers[0].mlp.down_proj  # the one-token kernel against dequantize + matmul
            x = torch.randn(1, 1, layer.in_features, device="cuda", dtype=dtype)
            with torch.no_grad():
                fast, slow = layer(x), torch.nn.functional.linear(x, layer.dequantized(dtype))
            r["qlora_gemv_vs_dequantized_max_rel"] = float((fast - slow).abs().max() / slow.abs().max())
            tq, dec = decode_step_time(q, [short], 32)
            del dec
            limit = (qbytes + kv_per_token * short) / bw
            rows.append(("QLoRA NF4 base, batch 1", tq * 1e3, limit * 1e3, tq / limit))
            del q
            torch.cuda.empty_cache()
        except Exception as exc:  # bitsandbytes missing: say so in the table
            nan = float("nan")
            rows.append((f"QLoRA: not run ({type(exc).__name__}: {exc})"[:60], nan, nan, nan))

    if "hf" not in skip and device == "cuda":
        model = build(shape, device, dtype)
        t, dec = decode_step_time(model, [short], 48)
        del dec
        start = time.perf_counter()
        try:
            hf = hf_static_compiled(model, short, 72)
        except Exception as exc:
            hf = f"failed: {type(exc).__name__}: {exc}"
        r["hf_seconds"] = round(time.perf_counter() - start, 1)
        if isinstance(hf, float):
            rows.append(("transformers static+compile, batch 1", hf * 1e3, t * 1e3, hf / t))
        else:
            rows.append((f"transformers: {hf}"[:60], float("nan"), float("nan"), float("nan")))
        del model

    r["rows"] = [{"what": a, "ms": round(b, 3), "reference_ms": round(c, 3), "ratio": round(d, 3)}
                 for a, b, c, d in rows]
    (out / "decode_bench.json").write_text(json.dumps(r, indent=2))
    print(f"{r['device']}, torch {r['torch']}: copy {r['copy_bandwidth_GBps']} GB/s, bf16 matmul "
          f"{r['matmul_peak_TFLOPs']} TFLOP/s; parity {r['parity']}")
    print(f"{'what':<44} {'ms':>9} {'ref ms':>9} {'ratio':>7}   (ref: the bandwidth limit, or the row named)")
    for a, b, c, d in rows:
        print(f"{a:<44} {b:>9.3f} {c:>9.3f} {d:>7.3f}")
    print(f"batch 64 step / batch 1 step: {r['batch64_over_batch1']}; prefill {r['prefill']}")


if __name__ == "__main__":
    main()
