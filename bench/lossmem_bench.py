"""The fused loss's memory and time on a GPU, against what `plan` counts for it.

For each case, `linear_cross_entropy_sum` forward and backward over --tokens tokens of --hidden
bf16 hidden states, under bf16 autocast as training runs it: the peak it allocates beyond its
inputs (`max_memory_allocated` less what was allocated before) against kernels/loss.py's
`chunk_bytes` plus the hidden state's gradient (kept by the forward, scaled in backward), plus, with
a trained float32 head, the head's bf16 copy, its float32 gradient and one chunk's bf16 product of
it; and the median time of a forward + backward. The vocabularies are Mistral 7B's and Nemo's.
The CPU allocator measured the same counts exactly (tests/test_kernels.py); this checks the GPU's.

    python3 bench/lossmem_bench.py --out "$OUT"     # one GPU, under a minute
    python3 bench/lossmem_bench.py --smoke          # toy sizes on the CPU (checks the script runs)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

from mistral_tune.kernels.loss import chunk_bytes, chunk_tokens, linear_cross_entropy_sum  # noqa: E402

CASES = [(32768, False), (131072, False), (131072, True)]  # (vocabulary, lm_head trained in float32)


def expected_bytes(tokens: int, hidden: int, vocab: int, head_trained: bool) -> int:
    head = vocab * hidden * (2 + 4 + 2) if head_trained else 0
    return chunk_bytes(tokens, vocab) + 2 * tokens * hidden * 2 + head


def measure(fn, device: str) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from _peak import peak_bytes

    return peak_bytes(fn)[0]


def run_case(vocab: int, head_trained: bool, tokens: int, hidden: int, repeats: int, device: str) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(tokens, hidden, generator=gen, device=device).to(torch.bfloat16).requires_grad_(True)
    w = torch.randn(vocab, hidden, generator=gen, device=device) * 0.02
    w = w.requires_grad_(True) if head_trained else w.to(torch.bfloat16)
    targets = torch.randint(0, vocab, (tokens,), generator=gen, device=device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = linear_cross_entropy_sum(h, w, targets)
        (loss / tokens).backward()
        h.grad = w.grad = None

    step()  # warm-up
    peak = measure(step, device)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    expected = expected_bytes(tokens, hidden, vocab, head_trained)
    return dict(vocab=vocab, head_trained=head_trained, tokens=tokens, hidden=hidden,
                chunk_tokens=chunk_tokens(vocab), peak_mib=round(peak / 2**20, 1),
                expected_mib=round(expected / 2**20, 1), ratio=round(peak / expected, 3),
                ms=round(1000 * sorted(times)[len(times) // 2], 1),
                tokens_per_s=round(tokens / sorted(times)[len(times) // 2]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (checks the script runs)")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=5120)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = parser.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --smoke)")
    tokens, hidden, repeats = (40, 8, 1) if args.smoke else (args.tokens, args.hidden, args.repeats)
    rows = []
    for vocab, head_trained in CASES:
        row = run_case(vocab, head_trained, tokens, hidden, repeats, device)
        print(json.dumps(row), flush=True)
        rows.append(row)
    report = dict(device=torch.cuda.get_device_name(0) if device == "cuda" else "cpu (smoke)",
                  torch=torch.__version__, rows=rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lossmem_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{report['device']}, torch {report['torch']}, {tokens} tokens x hidden {hidden}, bf16 autocast")
    print("| vocabulary | lm_head | chunk tokens | peak MiB measured / counted (ratio) | ms fwd+bwd | tokens/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['vocab']:,} | {'trained, float32' if r['head_trained'] else 'frozen, bf16'} | {r['chunk_tokens']} "
              f"| {r['peak_mib']} / {r['expected_mib']} ({r['ratio']}) | {r['ms']} | {r['tokens_per_s']:,} |")


if __name__ == "__main__":
    main()
