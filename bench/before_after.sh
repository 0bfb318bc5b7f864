#!/usr/bin/env bash
# The GPU main table (fast, lean, QLoRA, parity) of two trees in one command, variant by variant,
# each tree's run right after the other's, so that both meet the same machine state:
#   bash bench/before_after.sh BEFORE_TREE [VARIANTS]
# BEFORE_TREE holds another commit's src/ and bench/ (git archive COMMIT src bench | tar -x -C DIR).
# BUDGET seconds (default 540) bound the runs, so that the table and the files always come back:
# $OUT/table.txt, $OUT/results.json (every run's result) and $OUT/logs.tgz (every log).
set -u
before=$1
variants=${2:-ours_fast,ours_lean,ours_qlora,parity}
export OUT=${OUT:-$PWD/out} PYTHONUNBUFFERED=1
work=$(mktemp -d)
mkdir -p "$OUT" "$work/before" "$work/after"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  date -u +%Y-%m-%dT%H:%M:%SZ
} > "$work/machine.txt" 2>&1
deadline=$(( $(date +%s) + ${BUDGET:-540} ))
for v in ${variants//,/ }; do
  for side in before after; do
    left=$(( deadline - $(date +%s) ))
    [ "$left" -gt 20 ] || { echo "$side $v skipped: out of time" >> "$work/summary.txt"; continue; }
    tree=$([ "$side" = before ] && echo "$before" || echo .)
    start=$(date +%s)
    (cd "$tree" && timeout "$left" python3 bench/gpu_bench.py --variants "$v" --steps 6 --warm 2 --timeout 170 \
      --out "$work/$side/$v") > "$work/$side/$v.log" 2>&1
    echo "$side $v rc=$? $(( $(date +%s) - start ))s" >> "$work/summary.txt"
  done
done
cat "$work/machine.txt" "$work/summary.txt"
python3 - "$work" "$OUT" <<'PY' | tee "$OUT/table.txt"
import json, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
rows, flat = {}, []
for side in ("before", "after"):
    for f in sorted((work / side).glob("*/results.json")):
        for r in json.loads(f.read_text()):
            rows.setdefault(r["variant"], {})[side] = r
            flat.append({"tree": side, **r})
(out / "results.json").write_text(json.dumps(flat, indent=2))
print("| variant | before tokens/s | after tokens/s | after/before | before peak GiB | after peak GiB |")
print("|---|---|---|---|---|---|")
for v, sides in rows.items():
    b, a = sides.get("before", {}), sides.get("after", {})
    if v == "parity":
        for side, r in (("before", b), ("after", a)):
            print(f"parity {side}: " + json.dumps({k: val for k, val in r.items() if k not in ("variant", "wall_s")}))
        continue
    tb, ta = b.get("tokens_per_s"), a.get("tokens_per_s")
    ratio = f"{ta / tb:.3f}" if tb and ta else "-"
    print(f"| {v} | {tb} | {ta} | {ratio} | {b.get('peak_gib')} | {a.get('peak_gib')} |")
PY
cat "$work/machine.txt" "$work/summary.txt" >> "$OUT/table.txt"
tar czf "$OUT/logs.tgz" -C "$work" .
