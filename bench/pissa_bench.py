"""PiSSA / OLoRA initialisation (`lora_init`) on one GPU, at Mistral-7B's projection shapes.

For each init (pissa: exact SVD; pissa_niter_4: randomized SVD; olora: QR) it builds the adapters of
one decoder layer's seven projections (bf16 weights, r=16, alpha 16) as training does (LoraLinear),
and reports:
- seconds for the layer's seven inits, and that times 32 (Mistral-7B's layers: the one-off cost at
  the start of a run, before the fast path compiles);
- the largest relative error of residual + s B0 A0 against the original weight (the bf16 rounding of
  the residual: what the step-0 model differs from the base by);
- for pissa_niter_4, how much of the exact top-r part it captures: |W_r(niter)|_F / |W_r(exact)|_F.
The weights are random with a power-law spectrum (singular values ~ i^-0.5), as trained weights
roughly have; a flat random spectrum would make the randomized SVD look worse than it is.

    python bench/pissa_bench.py            # about a minute on one H200; JSON under $OUT
    python bench/pissa_bench.py --smoke    # toy sizes on the CPU (checks the script runs)
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

import torch  # noqa: E402

from mistral_tune.models.lora import LoraLinear, LoraSpec  # noqa: E402

# (name, out, in) of one Mistral-7B decoder layer's projections.
SHAPES = [("q_proj", 4096, 4096), ("k_proj", 1024, 4096), ("v_proj", 1024, 4096), ("o_proj", 4096, 4096),
          ("gate_proj", 14336, 4096), ("up_proj", 14336, 4096), ("down_proj", 4096, 14336)]
TOY = [(name, max(8, out // 64), max(8, inp // 64)) for name, out, inp in SHAPES]
INITS = ["pissa", "pissa_niter_4", "olora"]
LAYERS = 32


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _weight(out: int, inp: int, device, dtype, gen) -> torch.Tensor:
    k = min(out, inp)
    decay = torch.arange(1, k + 1, device=device, dtype=torch.float32) ** -0.5
    left = torch.randn(out, k, device=device, generator=gen) * decay
    w = left @ torch.randn(k, inp, device=device, generator=gen)
    return (w * (0.02 / w.std())).to(dtype)


def run(args) -> list[dict]:
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    shapes = TOY if args.smoke else SHAPES
    gen = torch.Generator(device=device).manual_seed(0)
    weights = {name: _weight(out, inp, device, dtype, gen) for name, out, inp in shapes}
    # One warm-up of each solver (cuSOLVER handles, kernels) on a small matrix.
    small = torch.randn(64, 64, device=device)
    torch.linalg.svd(small, full_matrices=False), torch.linalg.qr(small), torch.svd_lowrank(small, q=4, niter=1)
    rows, exact_parts = [], {}
    for init in INITS:
        seconds, worst = 0.0, 0.0
        captured = []
        for name, out, inp in shapes:
            linear = torch.nn.Linear(inp, out, bias=False, device=device, dtype=dtype)
            with torch.no_grad():
                linear.weight.copy_(weights[name])
            torch.manual_seed(0)
            _sync()
            began = time.perf_counter()
            layer = LoraLinear(linear, LoraSpec(r=args.r, alpha=args.r, init=init))
            _sync()
            seconds += time.perf_counter() - began
            with torch.no_grad():
                original = weights[name].float()
                part = layer.delta_weight()
                rebuilt = layer.weight.float() + part
                worst = max(worst, float((rebuilt - original).abs().max() / original.abs().max()))
                if init == "pissa":
                    exact_parts[name] = float(torch.linalg.matrix_norm(part))
                elif init.startswith("pissa_niter_"):
                    captured.append(float(torch.linalg.matrix_norm(part)) / exact_parts[name])
            del layer, linear
        rows.append({"init": init, "layer_s": seconds, "model_s": seconds * LAYERS, "rebuild_rel_err": worst,
                     "captured": min(captured) if captured else None})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="toy sizes on the CPU")
    p.add_argument("--r", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = p.parse_args()
    if args.smoke:
        args.r = 4
    device = "cpu" if args.smoke or not torch.cuda.is_available() else torch.cuda.get_device_name()
    rows = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pissa_bench.json").write_text(json.dumps({"device": device, "r": args.r, "layers": LAYERS,
                                                      "smoke": args.smoke, "rows": rows}, indent=2) + "\n")
    print(f"lora_init at {'toy' if args.smoke else 'Mistral-7B'} shapes, r={args.r}, {device}")
    head = f"{'init':<16}{'1 layer (s)':>12}{f'x{LAYERS} layers (s)':>18}{'|W_res+sBA-W| rel':>20}"
    print(head + f"{'top-r captured':>16}")
    for row in rows:
        captured = f"{row['captured']:.4f}" if row["captured"] is not None else "-"
        print(f"{row['init']:<16}{row['layer_s']:>12.3f}{row['model_s']:>18.1f}{row['rebuild_rel_err']:>20.2e}"
              f"{captured:>16}")


if __name__ == "__main__":
    main()
