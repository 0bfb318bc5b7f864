"""Serving throughput: the batching engine against one request at a time (--max-batch 1).

A model at Mistral-7B shapes with random weights (a few layers; bf16 on CUDA) runs in the engine
in-process. Each of C clients sends its requests one after another (the next when the previous
ends); every request has its own prompt (random ids, lengths varying around --prompt) and asks for
--tokens greedy tokens (no end-of-sequence: every request runs to its length). Measured for C = 1
and C = --clients, with --max-batch 1 and with the batching engine: aggregate generated tokens/s,
request latency p50/p99, and whether the two engines gave every request the same tokens.

    python3 bench/serve_bench.py            # one GPU, < 120 s
    python3 bench/serve_bench.py --smoke    # a toy model on CPU

Prints a table last and writes $OUT/serve_bench.json (OUT defaults to ./out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path

import torch

try:
    from mistral_tune.generate.decoder import End, Params
    from mistral_tune.generate.engine import Engine
except ImportError:  # a tree from before generate/ (bench/decode_round.sh runs both)
    from mistral_tune.serve.engine import End, Engine, Params
from mistral_tune.models.mistral import MistralConfig, MistralForCausalLM

MISTRAL_7B = dict(vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128)
TOY = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)


def run_clients(engine: Engine, prompts: list[list[int]], clients: int, tokens: int) -> dict:
    """Clients each send their share of the prompts in turn; returns throughput, latencies, outputs."""
    outputs: list[list[int]] = [[] for _ in prompts]
    latency: list[float] = [0.0] * len(prompts)
    stamps: list[list[float]] = [[] for _ in prompts]  # submission, then each token's arrival
    done = threading.Semaphore(0)
    shares = [list(range(c, len(prompts), clients)) for c in range(clients)]

    def send(client: int, k: int) -> None:
        if k == len(shares[client]):
            done.release()
            return
        i, start = shares[client][k], time.perf_counter()
        stamps[i].append(start)

        def sink(item) -> None:
            if isinstance(item, End):
                assert item.error is None, item.error
                latency[i] = time.perf_counter() - start
                send(client, k + 1)
            else:
                outputs[i].append(getattr(item, "id", item))
                stamps[i].append(time.perf_counter())

        engine.submit(prompts[i], Params(max_tokens=tokens), sink)

    start = time.perf_counter()
    for c in range(clients):
        send(c, 0)
    for _ in range(clients):
        done.acquire()
    wall = time.perf_counter() - start
    generated = sum(len(o) for o in outputs)
    ttft = [s[1] - s[0] for s in stamps if len(s) > 1]
    itl = [b - a for s in stamps for a, b in zip(s[1:], s[2:], strict=False)]
    pct = lambda xs, q: round(statistics.quantiles(xs, n=100, method="inclusive")[q - 1] * 1e3, 2)
    return {"ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99), "itl_p50_ms": pct(itl, 50),
            "itl_p99_ms": pct(itl, 99), "requests": len(prompts), "generated_tokens": generated,
            "wall_s": round(wall, 3),
            "tokens_per_s": round(generated / wall, 1),
            "latency_p50_s": round(statistics.median(latency), 3),
            "latency_p99_s": round(statistics.quantiles(latency, n=100, method="inclusive")[98], 3),
            "outputs": outputs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="toy model on CPU")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128, help="mean prompt length (lengths vary by +-50%%)")
    ap.add_argument("--tokens", type=int, default=128, help="tokens generated per request")
    ap.add_argument("--max-batch", type=int, default=16, help="the batching engine's batch")
    ap.add_argument("--batching-only", action="store_true", help="skip the one-at-a-time engine")
    ap.add_argument("--warm-full", action="store_true", help="warm each engine with a whole untimed pass of the "
                    "measured load (every batch size and cache length), not just 4 tokens")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.smoke:
        args.layers, args.prompt, args.tokens, args.clients = 2, 16, 8, 4
    shapes = TOY if args.smoke else MISTRAL_7B
    cfg = MistralConfig(num_hidden_layers=args.layers, max_position_embeddings=4096, **shapes)
    torch.manual_seed(0)
    with torch.device(device):
        model = MistralForCausalLM(cfg).to(dtype)
    model.init_weights()
    g = torch.Generator().manual_seed(1)
    n = args.clients * args.requests_per_client
    lengths = torch.randint(args.prompt // 2, args.prompt * 3 // 2 + 1, (n,), generator=g).tolist()
    prompts = [torch.randint(3, cfg.vocab_size, (m,), generator=g).tolist() for m in lengths]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    results, table = {}, []
    bench_start = time.perf_counter()
    engines = (("one at a time", 1), ("batching", args.max_batch))
    for name, max_batch in engines[1:] if args.batching_only else engines:
        engine = Engine(model, eos_id=None, max_batch=max_batch, queue_depth=n)
        try:
            run_clients(engine, prompts[:2], 2, 4)  # warm-up: kernels, allocator
            if args.warm_full:
                run_clients(engine, prompts, args.clients, args.tokens)
            sync()
            for clients in (1, args.clients):
                r = run_clients(engine, prompts if clients > 1 else prompts[:2], clients, args.tokens)
                results[(name, clients)] = r
                table.append((name, max_batch, clients, r))
        finally:
            engine.close()
    base = results.get(("one at a time", args.clients), results[("batching", args.clients)])
    a, b = base["outputs"], results[("batching", args.clients)]["outputs"]
    same = sum(x == y for x, y in zip(a, b, strict=True))
    same_tokens = sum(sum(p == q for p, q in zip(x, y, strict=False)) for x, y in zip(a, b, strict=True))
    speedup = results[("batching", args.clients)]["tokens_per_s"] / base["tokens_per_s"]

    report = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": str(dtype),
        "torch": torch.__version__, "config": {k: getattr(cfg, k) for k in ("num_hidden_layers", *shapes)},
        "prompt_mean": args.prompt, "tokens_per_request": args.tokens, "requests_per_client": args.requests_per_client,
        "runs": [{"engine": name, "max_batch": mb, "clients": c, **{k: v for k, v in r.items() if k != "outputs"}}
                 for name, mb, c, r in table],
        "speedup_at_clients": round(speedup, 2),
        "greedy_equal_requests": f"{same}/{len(a)}", "greedy_equal_tokens": f"{same_tokens}/{sum(map(len, a))}",
        "bench_s": round(time.perf_counter() - bench_start, 1), "warm_full": args.warm_full,
    }
    (out / "serve_bench.json").write_text(json.dumps(report, indent=2))

    print(f"{report['device']}, {dtype}, {args.layers} layers at {'toy' if args.smoke else 'Mistral-7B'} shapes; "
          f"prompts ~{args.prompt} tokens, {args.tokens} tokens each")
    print(f"greedy outputs equal (one at a time vs batching, {args.clients} clients): requests "
          f"{report['greedy_equal_requests']}, tokens {report['greedy_equal_tokens']}")
    print(f"{'engine':<14} {'max-batch':>9} {'clients':>7} {'requests':>8} {'tokens/s':>10} {'p50 s':>8} {'p99 s':>8}")
    for name, mb, c, r in table:
        print(f"{name:<14} {mb:>9} {c:>7} {r['requests']:>8} {r['tokens_per_s']:>10.1f} {r['latency_p50_s']:>8.3f} "
              f"{r['latency_p99_s']:>8.3f}  ttft p50/p99 {r['ttft_p50_ms']}/{r['ttft_p99_ms']} ms, "
              f"itl p50/p99 {r['itl_p50_ms']}/{r['itl_p99_ms']} ms")
    print(f"aggregate tokens/s at {args.clients} clients, batching / one at a time: {speedup:.2f}x")


if __name__ == "__main__":
    main()
