"""How often the GPU fast path compiles during a real training run, and whether every variant runs.

Each variant trains a tiny Mistral (the quickstart's shapes) with the real trainer (`train`) on
chat records of lognormal lengths (20..900 words, rows of 1,024 tokens), in a process of its own, with
`TORCH_LOGS=recompiles`. It reports dynamo's graph count, every recompilation and its reason,
whether the recompile limit was hit (dynamo then runs the layer eagerly), the time from `train()`
to the first step's line, and the steps that took far longer than the median (a compilation in the
middle of the run). Variants: packed or unpacked rows, `bf16` auto or false, plain LoRA,
checkpointing with offload (`lean`) or QLoRA.

    python bench/compile_check.py --out "$OUT"                   # every variant, in parallel
    python bench/compile_check.py --variants unpacked --steps 1000 --src /path/to/other/src

`--src` runs another checkout's code (a before/after comparison); `--tag` names its rows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_BASE = dict(sequence_len=1024, micro_batch_size=4, gradient_accumulation_steps=1, adapter="lora", lora_r=16,
             lora_alpha=16, learning_rate=1e-3, val_set_size=0.05, eval_steps=250, save_steps=500,
             logging_steps=1, seed=1, overwrite_output_dir=True)
VARIANTS = {
    "packed": dict(sample_packing=True),
    "unpacked": dict(sample_packing=False),
    "packed_fp32": dict(sample_packing=True, bf16=False),
    "unpacked_fp32": dict(sample_packing=False, bf16=False),
    "unpacked_lean": dict(sample_packing=False, gradient_checkpointing=True, offload_activations=True),
    "unpacked_qlora": dict(sample_packing=False, adapter="qlora", gradient_checkpointing=True),
}


def _records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    words = ["river", "stone", "apple", "cloud", "lantern", "meadow", "willow", "copper", "north", "quiet"]
    out = []
    for _ in range(n):
        length = min(900, max(20, int(rng.lognormvariate(math.log(150), 0.9))))
        answer = " ".join(rng.choice(words) for _ in range(length))
        out.append({"messages": [{"role": "user", "content": f"Say {length} words."},
                                 {"role": "assistant", "content": answer}]})
    return out


def worker(name: str, steps: int, work: Path, n_records: int) -> dict:
    import torch

    from mistral_tune.config import config_from_dict
    from mistral_tune.quickstart import create_tiny_model
    from mistral_tune.train.loop import train

    work.mkdir(parents=True, exist_ok=True)
    model_dir = create_tiny_model(work / "model")
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records(n_records, 0)))
    cfg = config_from_dict({**_BASE, **VARIANTS[name], "max_steps": steps, "base_model": str(model_dir),
                            "datasets": [{"path": str(data)}], "output_dir": str(work / "run")})
    first: list[float] = []
    lines: list[str] = []
    t0 = time.perf_counter()

    def echo(line: str) -> None:
        print(line, file=sys.stderr, flush=True)
        if line.startswith("step ") and not first:
            first.append(time.perf_counter() - t0)
        if not line.startswith("step "):
            lines.append(line)

    result = train(cfg, echo=echo)
    records = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    step_s = [r["step_s"] for r in records if "step_s" in r]
    median = sorted(step_s)[len(step_s) // 2]
    slow = [(r["step"], round(r["step_s"], 2)) for r in records
            if "step_s" in r and r["step"] > 1 and r["step_s"] > max(1.0, 10 * median)]
    from torch._dynamo.utils import counters

    import mistral_tune.kernels.attention as attention
    probed = {f"{k[1:] if isinstance(k, tuple) else k}": [b.name for b in v]
              for k, v in getattr(attention, "_CAUSAL_BACKENDS", {}).items()}
    return dict(variant=name, steps=result.steps, wall_s=round(time.perf_counter() - t0, 1),
                first_step_line_s=round(first[0], 1) if first else None, first_step_s=round(step_s[0], 2),
                median_step_ms=round(1000 * median, 1), slow_steps=slow,
                unique_graphs=counters["stats"]["unique_graphs"], graph_breaks=sum(counters["graph_break"].values()),
                final_loss=[r["loss"] for r in records if "loss" in r][-1], eval_loss=result.eval_loss,
                path=[x for x in lines if x.startswith(("fast path", "plain path", "device"))],
                causal_backends=probed, torch=torch.__version__,
                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "none")


def run_variant(name: str, args) -> dict:
    work = Path(args.work) / f"{args.tag}-{name}"
    steps = args.steps if name in ("packed", "unpacked") else args.short_steps
    env = {**os.environ, "PYTHONPATH": f"{args.src}:" + os.environ.get("PYTHONPATH", ""), "TORCH_LOGS": "recompiles"}
    cmd = [sys.executable, __file__, "--worker", name, "--steps", str(steps), "--work", str(work),
           "--records", str(args.records)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
        log = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        log = f"{exc.stdout or ''}{exc.stderr or ''}\nTIMEOUT after {args.timeout}s"
        log = log if isinstance(log, str) else str(log)
    Path(args.out, f"{args.tag}-{name}.log").write_text(log)
    line = next((x for x in log.splitlines() if x.startswith("RESULT ")), None)
    res = json.loads(line[7:]) if line else dict(variant=name, error=[x for x in log.splitlines() if x.strip()][-3:])
    reasons = [x.split("- ", 1)[1] for x in log.splitlines() if "[__recompiles]" in x and "     - " in x]
    res.update(tag=args.tag, recompiles=log.count("Recompiling function"),
               recompile_limit_hit="recompile_limit" in log or "cache_size_limit" in log,
               recompile_reasons=sorted({re.sub(r"^\d+/\d+: ", "", r)[:100] for r in reasons}))
    print(json.dumps(res), flush=True)
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=1000, help="steps of the packed and unpacked variants")
    parser.add_argument("--short-steps", type=int, default=300, help="steps of the other variants")
    parser.add_argument("--records", type=int, default=3000, help="chat records (5%% held out)")
    parser.add_argument("--src", default=str(ROOT / "src"))
    parser.add_argument("--tag", default="this")
    parser.add_argument("--jobs", type=int, default=6)
    parser.add_argument("--timeout", type=int, default=420)
    parser.add_argument("--out", default=os.environ.get("OUT", "compile-check-out"))
    parser.add_argument("--work", default="/tmp/compile-check")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.steps, Path(args.work), args.records)), flush=True)
        return
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda v: run_variant(v, args), args.variants.split(",")))
    Path(args.out, f"compile-check-{args.tag}.json").write_text(json.dumps(results, indent=1) + "\n")
    print("| code | variant | steps | graphs | recompiles | limit hit | first step line s | slow steps | error |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['tag']} | {r['variant']} | {r.get('steps')} | {r.get('unique_graphs')} | {r['recompiles']} | "
              f"{r['recompile_limit_hit']} | {r.get('first_step_line_s')} | {r.get('slow_steps')} | "
              f"{r.get('error', '')} |")


if __name__ == "__main__":
    main()
