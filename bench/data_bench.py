"""Benchmark: tokenize + clean + cache + pack N chat records of about 300 tokens (CPU).

    PYTHONPATH=src python bench/data_bench.py --records 100000 --workers 2

Prints one table row: records/s for the build (read, format, clean, tokenize, write the token
cache), the packing time, the packed fill and the peak memory. Not a test: timings depend on the
machine; docs/benchmarks.md records them with the machine and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the model data train token answer question system user value error result because which "
         "should would could about there their other after first never always people number water "
         "paris london weather function return string integer memory cache python mistral").split()


def make_records(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            user = f"Question {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(40, 90)))
            answer = " ".join(rng.choices(WORDS, k=rng.randint(150, 260))) + "."
            msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
            if i % 3 == 0:
                msgs.insert(0, {"role": "system", "content": "You are a helpful assistant."})
            f.write(json.dumps({"messages": msgs}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tokenizer", default="v3")
    ap.add_argument("--sequence-len", type=int, default=4096)
    ap.add_argument("--no-clean", action="store_true", help="switch every cleaning step off")
    args = ap.parse_args()

    from mistral_tune.chat import load_tokenizer
    from mistral_tune.config import config_from_dict
    from mistral_tune.data.build import build_dataset
    from mistral_tune.data.pack import pack_rows

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "chat.jsonl"
        make_records(data, args.records)
        cleaning = ({"unicode": False, "dedup": False, "redact_pii": False, "prompt_injection": "off"}
                    if args.no_clean else {})
        cfg = config_from_dict({
            "base_model": "unused", "datasets": [{"path": str(data)}], "sequence_len": args.sequence_len,
            "dataset_cache_dir": str(Path(tmp) / "cache"), "dataset_num_workers": args.workers,
            "cleaning": cleaning,
        })
        tok = load_tokenizer(args.tokenizer)
        t0 = time.perf_counter()
        ds = build_dataset(cfg, tok)
        t_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        rows = pack_rows(ds.train.lengths.tolist(), args.sequence_len)
        t_pack = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = build_dataset(cfg, tok)
        t_cached = time.perf_counter() - t0
        assert again.report.cache[str(data)] == "reused"
        tokens = int(ds.train.lengths.sum())
        fill = tokens / (len(rows) * args.sequence_len)
        peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                   resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    import mistral_common
    import numpy
    import torch

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, {args.workers} workers; "
          f"python {sys.version.split()[0]}, mistral-common {mistral_common.__version__}, numpy {numpy.__version__}, "
          f"torch {torch.__version__}; tokenizer {args.tokenizer}; cleaning {'off' if args.no_clean else 'default'}")
    print("| records | tokens/record | build s | records/s | tokens/s | pack s | rows | fill | cached load s "
          "| peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.records} | {tokens / len(ds.train):.0f} | {t_build:.1f} | {args.records / t_build:,.0f} | "
          f"{tokens / t_build:,.0f} | {t_pack:.1f} | {len(rows)} | {100 * fill:.1f}% | {t_cached:.1f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
