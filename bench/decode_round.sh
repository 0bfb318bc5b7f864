#!/usr/bin/env bash
# The generation round on one GPU, this tree and an earlier one in one command:
#   bash bench/decode_round.sh BEFORE_SRC
# BEFORE_SRC is an earlier commit's src/ (git archive COMMIT src | tar -x -C DIR; then DIR/src).
# Runs bench/decode_bench.py (limits, parity, peers), then the 200-prompt evaluation and the serving
# load (32 layers) with this tree's benchmark scripts over each tree's package. Logs and JSON under
# $OUT; a summary last.
set -u
before=$(cd "$1" && pwd)
export OUT=${OUT:-$PWD/out} PYTHONUNBUFFERED=1
base_path=${PYTHONPATH:-}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
  date -u +%Y-%m-%dT%H:%M:%SZ; } > "$OUT/machine.txt" 2>&1
deadline=$(( $(date +%s) + ${BUDGET:-560} ))
run() {  # run NAME SRC SECONDS CMD...: one part over the package in SRC, bounded by the time left
  local name=$1 src=$2 limit=$3; shift 3
  local left=$(( deadline - $(date +%s) ))
  [ "$left" -gt 30 ] || { echo "$name skipped: out of time" >> "$OUT/summary.txt"; return; }
  [ "$limit" -lt "$left" ] || limit=$left
  local start=$(date +%s)
  mkdir -p "$OUT/$name"
  OUT="$OUT/$name" PYTHONPATH="$src:$base_path" timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? $(( $(date +%s) - start ))s" >> "$OUT/summary.txt"
}
now=$PWD/src
run decode "$now" 240 python3 bench/decode_bench.py ${DECODE_ARGS:-}
run serve16_after "$now" 45 python3 bench/serve_bench.py --layers 32 --clients 16 --max-batch 16 --batching-only
run serve16_before "$before" 60 python3 bench/serve_bench.py --layers 32 --clients 16 --max-batch 16 --batching-only
run eval_after "$now" 70 python3 bench/eval_bench.py --batch-sizes 16,64
run eval_before "$before" 50 python3 bench/eval_bench.py --batch-sizes 64
run serve64_after "$now" 40 python3 bench/serve_bench.py --layers 32 --clients 64 --max-batch 64 --batching-only
cat "$OUT/machine.txt" "$OUT/summary.txt"
for f in decode serve16_after serve16_before eval_after eval_before serve64_after; do
  echo "== $f"; tail -n 12 "$OUT/$f.log" 2>/dev/null
done
