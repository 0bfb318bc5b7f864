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

from mistral_tune.models.mistral import MistralConfig, MistralForCausalLM
from mistral_tune.serve.engine import End, Engine, Params

MISTRAL_7B = dict(vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128)
TOY = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)


def run_clients(engine: Engine, prompts: list[list[int]], clients: int, tokens: int) -> dict:
    """Clients each send their share of the prompts in turn; returns throughput, latencies, outputs."""
    outputs: list[list[int]] = [[] for _ in prompts]
    latency: list[float] = [0.0] * len(prompts)
    done = threading.Semaphore(0)
    shares = [list(range(c, len(prompts), clients)) for c in range(clients)]

    def send(client: int, k: int) -> None:
        if k == len(shares[client]):
            done.release()
            return
        i, start = shares[client][k], time.perf_counter()

        def sink(item) -> None:
            if isinstance(item, End):
                assert item.error is None, item.error
                latency[i] = time.perf_counter() - start
                send(client, k + 1)
            else:
                outputs[i].append(item)

        engine.submit(prompts[i], Params(max_tokens=tokens), sink)

    start = time.perf_counter()
    for c in range(clients):
        send(c, 0)
    for _ in range(clients):
        done.acquire()
    wall = time.perf_counter() - start
    generated = sum(len(o) for o in outputs)
    return {"requests": len(prompts), "generated_tokens": generated, "wall_s": round(wall, 3),
            "tokens_per_s": round(generated / wall, 1),
            "latency_p50_s": round(statistics.median(latency), 3),
            "latency_p99_s": round(statistics.quantiles(latency, n=100, method="inclusive")[98], 3),
            "outputs": outputs}


def decode_probe(model, prompt: list[int], tokens: int, sync) -> tuple[list[float], dict]:
    """Per-token wall times (ms) of one row decoded alone with the KV cache, no engine: the floor
    under the engine's per-step time; and where the run's time went: this thread's CPU time, the
    whole process's CPU time (other threads' work shows as the difference), the GPU's time between
    the first and last token (CUDA events)."""
    from mistral_tune.models.mistral import KVCache
    from mistral_tune.serve.generate import _last_logits

    dev = model.lm_head.weight.device
    times = []
    cuda = dev.type == "cuda"
    events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if cuda else None
    with torch.no_grad():
        cache = KVCache(model.config.num_hidden_layers)
        logits = _last_logits(model, torch.tensor([prompt], device=dev), kv_cache=cache)
        pos, mask = len(prompt), torch.ones(1, len(prompt), dtype=torch.bool, device=dev)
        sync()
        wall0, cpu0, proc0 = time.perf_counter(), time.thread_time(), time.process_time()
        if cuda:
            events[0].record()
        for _ in range(tokens):
            t0 = time.perf_counter()
            tok = logits.argmax(-1)
            int(tok[0])
            mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.bool, device=dev)], dim=1)
            logits = model(tok[:, None], position_ids=torch.tensor([[pos]], device=dev), kv_cache=cache,
                           key_mask=mask)[:, -1]
            pos += 1
            sync()
            times.append(1e3 * (time.perf_counter() - t0))
        if cuda:
            events[1].record()
            sync()
    split = {"wall_ms_per_token": round(1e3 * (time.perf_counter() - wall0) / tokens, 2),
             "this_thread_cpu_ms_per_token": round(1e3 * (time.thread_time() - cpu0) / tokens, 2),
             "process_cpu_ms_per_token": round(1e3 * (time.process_time() - proc0) / tokens, 2)}
    if cuda:
        split["gpu_span_ms_per_token"] = round(events[0].elapsed_time(events[1]) / tokens, 2)
    return times, split


class StackSampler:
    """Every 20 ms, the innermost frame of each thread other than the sampled one: which Python
    threads run while the decoding loop waits."""

    def __init__(self) -> None:
        import threading

        self.counts: dict[str, int] = {}
        self.main = threading.get_ident()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stack-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import sys
        import threading
        import traceback

        me = threading.get_ident()
        names = {}
        while not self._stop.wait(0.02):
            names.update({t.ident: t.name for t in threading.enumerate()})
            for ident, frame in sys._current_frames().items():
                if ident in (me, self.main):
                    continue
                top = traceback.extract_stack(frame)[-3:]
                key = f"{names.get(ident, ident)}: " + " <- ".join(
                    f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in reversed(top))
                self.counts[key] = self.counts.get(key, 0) + 1

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return dict(sorted(self.counts.items(), key=lambda kv: -kv[1])[:12])


def probe_report(model, prompts, tokens: int, sync, out: Path) -> dict:
    """The bare loop three times on the same prompt (threads sampled), once on a new prompt length
    under the profiler, and once with a short GIL switch interval: which of them is slow, and what
    else runs meanwhile, says where the time goes."""
    import sys
    import threading

    def stats(run: tuple[list[float], dict]) -> dict:
        t, split = run
        s = sorted(t)
        return {"first5_ms": [round(x, 2) for x in t[:5]], "median_ms": round(statistics.median(t), 2),
                "p90_ms": round(s[int(0.9 * (len(s) - 1))], 2), "max_ms": round(s[-1], 2),
                "over_10ms": sum(x > 10 for x in t), **split}

    res = {"threads": [t.name for t in threading.enumerate()], "switchinterval_s": sys.getswitchinterval(),
           "torch_threads": torch.get_num_threads(), "cpus": len(os.sched_getaffinity(0)),
           "loadavg": Path("/proc/loadavg").read_text().strip() if Path("/proc/loadavg").exists() else None}
    sampler = StackSampler()
    for k in range(3):
        res[f"bare_run{k + 1}"] = stats(decode_probe(model, prompts[0], tokens, sync))
    res["other_threads_sampled"] = sampler.stop()
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        res["bare_profiled_new_length"] = stats(decode_probe(model, prompts[1][:len(prompts[1]) - 7], tokens, sync))
    table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=40)
    (out / "serve_probe_profile.txt").write_text(table)
    old = sys.getswitchinterval()
    sys.setswitchinterval(0.0002)
    try:
        res["bare_switch_0.2ms"] = stats(decode_probe(model, prompts[2], tokens, sync))
    finally:
        sys.setswitchinterval(old)
    res["bare_after"] = stats(decode_probe(model, prompts[3], tokens, sync))
    res["threads_after"] = [t.name for t in threading.enumerate()]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="toy model on CPU")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128, help="mean prompt length (lengths vary by +-50%%)")
    ap.add_argument("--tokens", type=int, default=128, help="tokens generated per request")
    ap.add_argument("--max-batch", type=int, default=16, help="the batching engine's batch")
    ap.add_argument("--probe", action="store_true", help="first time a bare decoding loop (per-token times, "
                    "a profile in $OUT/serve_probe_profile.txt)")
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
    probe = probe_report(model, prompts, args.tokens, sync, out) if args.probe else None
    if probe:
        print(json.dumps(probe, indent=1), flush=True)
    for name, max_batch in (("one at a time", 1), ("batching", args.max_batch)):
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
    a, b = results[("one at a time", args.clients)]["outputs"], results[("batching", args.clients)]["outputs"]
    same = sum(x == y for x, y in zip(a, b, strict=True))
    same_tokens = sum(sum(p == q for p, q in zip(x, y, strict=False)) for x, y in zip(a, b, strict=True))
    speedup = results[("batching", args.clients)]["tokens_per_s"] / results[("one at a time", args.clients)][
        "tokens_per_s"]

    report = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": str(dtype),
        "torch": torch.__version__, "config": {k: getattr(cfg, k) for k in ("num_hidden_layers", *shapes)},
        "prompt_mean": args.prompt, "tokens_per_request": args.tokens, "requests_per_client": args.requests_per_client,
        "runs": [{"engine": name, "max_batch": mb, "clients": c, **{k: v for k, v in r.items() if k != "outputs"}}
                 for name, mb, c, r in table],
        "speedup_at_clients": round(speedup, 2),
        "greedy_equal_requests": f"{same}/{len(a)}", "greedy_equal_tokens": f"{same_tokens}/{sum(map(len, a))}",
        "bench_s": round(time.perf_counter() - bench_start, 1), "warm_full": args.warm_full, "probe": probe,
    }
    (out / "serve_bench.json").write_text(json.dumps(report, indent=2))

    print(f"{report['device']}, {dtype}, {args.layers} layers at {'toy' if args.smoke else 'Mistral-7B'} shapes; "
          f"prompts ~{args.prompt} tokens, {args.tokens} tokens each")
    print(f"greedy outputs equal (one at a time vs batching, {args.clients} clients): requests "
          f"{report['greedy_equal_requests']}, tokens {report['greedy_equal_tokens']}")
    print(f"{'engine':<14} {'max-batch':>9} {'clients':>7} {'requests':>8} {'tokens/s':>10} {'p50 s':>8} {'p99 s':>8}")
    for name, mb, c, r in table:
        print(f"{name:<14} {mb:>9} {c:>7} {r['requests']:>8} {r['tokens_per_s']:>10.1f} {r['latency_p50_s']:>8.3f} "
              f"{r['latency_p99_s']:>8.3f}")
    print(f"aggregate tokens/s at {args.clients} clients, batching / one at a time: {speedup:.2f}x")


if __name__ == "__main__":
    main()
