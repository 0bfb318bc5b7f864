"""Causal attention kernels on one GPU, forward + backward, at the benchmark's shapes.

Times FlexAttention with a causal block mask (what packed rows use) against SDPA's causal
kernels (cuDNN, flash, memory-efficient) with Mistral-7B's grouped-query heads (32 query, 8
key/value, head_dim 128), and checks each one's output and gradients against FlexAttention's.
This is what chose the kernel for rows that hold one sample (kernels/attention.py).

    python bench/attn_bench.py --shapes 2x4096,1x32768
"""

from __future__ import annotations

import argparse
import functools
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

HQ, HKV, D = 32, 8, 128


def _time(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / 1e3


def _forward(fn, q, k, v) -> None:
    with torch.no_grad():
        fn(q, k, v)


def _forward_backward(fn, q, k, v, dout) -> None:
    fn(q, k, v).backward(dout)


def run(B: int, L: int, reps: int) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    q0 = torch.randn(B, HQ, L, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k0 = torch.randn(B, HKV, L, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v0 = torch.randn(B, HKV, L, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    dout = torch.randn(B, HQ, L, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    block = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, L, L, device="cuda")
    flex = torch.compile(flex_attention, dynamic=False)

    def sdpa(backend):
        def f(q, k, v):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return f

    kernels = {
        "flex": lambda q, k, v: flex(q, k, v, block_mask=block, enable_gqa=True),
        "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
        "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa_efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
    }
    fwd_flops = 4 * B * HQ * L * L * D / 2  # causal: half the score matrix
    rows, ref = [], None
    for name, fn in kernels.items():
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        try:
            out = fn(q, k, v)
            out.backward(dout)
        except RuntimeError as exc:
            rows.append(dict(kernel=name, B=B, L=L, error=str(exc).splitlines()[0][:160]))
            continue
        got = [out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]
        if ref is None:
            ref = got
        diff = max(float((a - b).norm() / b.norm()) for a, b in zip(got, ref))

        t_f = _time(functools.partial(_forward, fn, q, k, v), reps)
        t_fb = _time(functools.partial(_forward_backward, fn, q, k, v, dout), reps)
        rows.append(dict(kernel=name, B=B, L=L, fwd_ms=round(t_f * 1e3, 2), fwd_bwd_ms=round(t_fb * 1e3, 2),
                         fwd_tflops=round(fwd_flops / t_f / 1e12), fwd_bwd_tflops=round(3.5 * fwd_flops / t_fb / 1e12),
                         rel_diff_vs_flex=round(diff, 5)))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="2x4096,1x32768", help="BxL pairs")
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    results = []
    for shape in args.shapes.split(","):
        B, L = (int(x) for x in shape.split("x"))
        results += run(B, L, args.reps)
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    print("| kernel | B x L | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s | rel. diff vs flex |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['kernel']} | {r['B']}x{r['L']} | error: {r['error']} | | | | |")
        else:
            print(f"| {r['kernel']} | {r['B']}x{r['L']} | {r['fwd_ms']} | {r['fwd_bwd_ms']} | {r['fwd_tflops']} "
                  f"| {r['fwd_bwd_tflops']} | {r['rel_diff_vs_flex']} |")


if __name__ == "__main__":
    main()
