#!/usr/bin/env bash
# One GPU call that runs several benchmarks, each under its own time limit, logs under $OUT.
#   bash bench/gpu_round.sh "serve:110:python3 bench/serve_bench.py" "fp8:160:python3 bench/fp8_bench.py" ...
# Prints the machine and versions first, then each benchmark's exit code and seconds, then each
# log's last lines (the benchmarks print their table last).
set -u
export OUT=${OUT:-$PWD/out} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import sys, torch, transformers, peft; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__)"
  date -u +%Y-%m-%dT%H:%M:%SZ
} > "$OUT/machine.txt" 2>&1
for spec in "$@"; do
  name=${spec%%:*}; rest=${spec#*:}; limit=${rest%%:*}; cmd=${rest#*:}
  start=$(date +%s)
  timeout --kill-after=5 "$limit" bash -c "$cmd" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? $(( $(date +%s) - start ))s (limit ${limit}s): $cmd" >> "$OUT/summary.txt"
done
cat "$OUT/machine.txt"
for spec in "$@"; do
  name=${spec%%:*}
  echo "===== $name"
  tail -n 30 "$OUT/$name.log"
done
echo "===== summary"
cat "$OUT/summary.txt"
