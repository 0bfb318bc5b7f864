"""Streaming check: a 1M-record JSONL (~660 MB) through build_dataset; prints the peak RSS of the
reading process and of the workers, which must stay far below the file size.

    PYTHONPATH=src python bench/data_stream_check.py --records 1000000 --workers 2
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    from mistral_tune.chat import load_tokenizer
    from mistral_tune.config import config_from_dict
    from mistral_tune.data.build import build_dataset

    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.jsonl"
        with path.open("w") as f:
            for i in range(args.records):
                msgs = [{"role": "user", "content": f"q{i} " + " ".join(rng.choices(words, k=12))},
                        {"role": "assistant", "content": " ".join(rng.choices(words, k=20)) + f" {i}"}]
                # An unused 400-byte field makes the file large next to the tokens it yields.
                f.write(json.dumps({"messages": msgs, "meta": "x" * 400}) + "\n")
        size = path.stat().st_size / 2**20
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        cfg = config_from_dict({"base_model": "unused", "datasets": [{"path": str(path)}], "sequence_len": 512,
                                "dataset_cache_dir": str(Path(tmp) / "cache"), "dataset_num_workers": args.workers})
        t0 = time.perf_counter()
        data = build_dataset(cfg, load_tokenizer("v3"))
        took = time.perf_counter() - t0
    print("\n".join(data.report.lines()))
    print(f"file {size:.0f} MiB; build {took:.0f} s ({args.records / took:,.0f} records/s); peak RSS: reading process "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB ({before:.0f} before the build), "
          f"workers {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
