"""A LoRA training step on Mixtral's experts: ours (grouped expert products, and the per-expert loop
they replaced) against transformers + PEFT (LoRA on the stacked expert parameters).

Two decoder layers at Mixtral 8x7B's shapes (hidden 4096, 8 experts of width 14336, top-2, 32/8
heads), random bf16 weights, LoRA r=16 on q/k/v/o and on both stacked expert weights, adapters in
float32 under bf16 autocast (as training holds them). One step is forward, cross-entropy over every
token, and backward. Reports milliseconds a step, tokens a second and peak memory per case, and the
first step's loss of each case against transformers + PEFT's (the same weights and adapters). About
a minute on one H200; `--smoke` runs toy sizes on the CPU to check the script.

`--qlora` quantizes the frozen base as QLoRA does on each side: ours puts the attention projections
and every expert in NF4 (as `adapter: qlora` trains Mixtral); transformers + PEFT loads the same
weights through bitsandbytes' 4-bit config, which quantizes its nn.Linear layers (attention) and
leaves transformers 5's stacked expert tensors in bf16. `--trainer-path` runs our side as the
trainer does on a GPU: compiled layers, the causal kernel, the fused loss (our loss is then the sum
over tokens, divided here by their count to compare).

    python bench/moe_bench.py            # JSON in $OUT (default ./out)/moe_bench.json, table last
    python bench/moe_bench.py --qlora --trainer-path --seq 4096 --batch 2
    python bench/moe_bench.py --smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mistral_tune.models.families import ATTENTION_PROJECTIONS
from mistral_tune.models.lora import LoraSpec, apply_lora
from mistral_tune.models.mistral import Experts, MistralConfig, MistralForCausalLM
from mistral_tune.models.peft_format import save_adapter

FULL = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
            num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, architecture="MixtralForCausalLM")
SMOKE = dict(FULL, vocab_size=1000, hidden_size=64, intermediate_size=48, num_attention_heads=4,
             num_key_value_heads=2, num_local_experts=4)
ATTENTION = list(ATTENTION_PROJECTIONS)
PROFILE_DIR: Path | None = None  # --profile: each case's profile is written there


def _built(make, dtype: torch.dtype, device):
    """make() with its parameters created in dtype on device (no float32 copy of the whole model)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return make()
    finally:
        torch.set_default_dtype(before)


def _ours(cfg: MistralConfig, state: dict, rank: int, device, qlora: bool = False) -> MistralForCausalLM:
    model = _built(lambda: MistralForCausalLM(cfg), state["lm_head.weight"].dtype, device)
    model.load_state_dict(state)
    if qlora:
        from mistral_tune.models.quant import quantize_model

        quantize_model(model, model_spec(rank).target_modules, device)
    apply_lora(model, model_spec(rank), seed=0)
    return model


def model_spec(rank: int) -> LoraSpec:
    return LoraSpec(r=rank, alpha=2 * rank, target_modules=ATTENTION + ["experts"])


def _lora_values(model, seed: int = 1) -> None:
    """Adapters as after some training (B non-zero), trainable in float32."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.data = p.data.float()
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.01)


def _peft(cfg: MistralConfig, state: dict, adapter: Path, device, qlora: bool = False):
    import transformers
    from peft import PeftModel

    hf = transformers.MixtralConfig(**cfg.to_hf("bfloat16"))
    ref = _built(lambda: transformers.MixtralForCausalLM(hf), state["lm_head.weight"].dtype, device)
    ref.load_state_dict(state, strict=False)
    if qlora:  # through a saved folder, as a user loads a checkpoint with a 4-bit config
        folder = Path(tempfile.mkdtemp(prefix="moe_bench_hf_"))
        try:
            ref.save_pretrained(folder)
            del ref
            torch.cuda.empty_cache()
            q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                bnb_4bit_compute_dtype=torch.bfloat16)
            ref = transformers.MixtralForCausalLM.from_pretrained(folder, quantization_config=q, dtype=torch.bfloat16,
                                                                  device_map={"": device.index or 0})
        finally:
            shutil.rmtree(folder)
    return PeftModel.from_pretrained(ref, str(adapter), is_trainable=True)


def _step(model, x, labels, peft: bool, autocast: bool) -> float:
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        if getattr(model, "fused_loss", False):  # the trainer's path: the summed loss, never the logits
            from types import SimpleNamespace


            batch = SimpleNamespace(input_ids=x, position_ids=None, seq_ids=None, labels=labels)
            loss = model.token_loss(batch) / labels.numel()
        else:
            logits = model(input_ids=x, use_cache=False).logits if peft else model(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
    loss.backward()
    model.zero_grad(set_to_none=True)
    return float(loss)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_case(name: str, build, x, labels, reps: int, device, autocast: bool) -> dict:
    """One case's row; a case that fails gives its error in the row (the other cases still run)."""
    try:
        return _run_case(name, build, x, labels, reps, device, autocast)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        return {"case": name, "error": f"{type(exc).__name__}: {exc}"[:300]}


def _run_case(name: str, build, x, labels, reps: int, device, autocast: bool) -> dict:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, peft = build()
    model.train()
    first = _step(model, x, labels, peft, autocast)  # warm-up (and the loss compared)
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        _step(model, x, labels, peft, autocast)
    _sync(device)
    ms = (time.perf_counter() - start) / reps * 1e3
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    if PROFILE_DIR is not None:  # one more step under the profiler: where the step's time goes
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            _step(model, x, labels, peft, autocast)
            _sync(device)
        key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        slug = "".join(c if c.isalnum() else "_" for c in name)
        (PROFILE_DIR / f"moe_profile_{slug}.txt").write_text(prof.key_averages().table(sort_by=key, row_limit=30))
    del model
    return {"case": name, "step_ms": round(ms, 2), "tokens_per_s": round(x.numel() / ms * 1e3),
            "peak_gib": None if peak is None else round(peak, 2), "first_loss": first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: checks the script")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--qlora", action="store_true", help="NF4 base on both sides (see above)")
    parser.add_argument("--trainer-path", action="store_true", help="our side compiled, causal kernel, fused loss")
    parser.add_argument("--profile", action="store_true", help="profile one more step of each case into $OUT")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    if args.profile:
        global PROFILE_DIR
        PROFILE_DIR = out
    batch, seq, reps = (2, 32, 1) if args.smoke else (args.batch, args.seq, args.reps)
    cfg = MistralConfig(**(SMOKE if args.smoke else FULL))
    dtype = torch.float32 if args.smoke else torch.bfloat16
    autocast = not args.smoke

    torch.manual_seed(0)
    base = _built(lambda: MistralForCausalLM(cfg), dtype, device)
    base.init_weights(std=0.02)
    state = base.state_dict()
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen).to(device)
    labels = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen).to(device)

    adapter = Path(tempfile.mkdtemp(prefix="moe_bench_"))

    def ours():
        model = _ours(cfg, state, args.rank, device, args.qlora)
        _lora_values(model)
        if not (adapter / "adapter_config.json").exists():  # PEFT's case loads the same adapters
            save_adapter(model, model_spec(args.rank), adapter, base_model="random")
        if args.trainer_path and device.type == "cuda":
            model.use_fast_path(one_sample_rows=True)
        return model, False

    def peft():
        model = _peft(cfg, state, adapter, device, args.qlora)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        return model, True

    grouped = Experts._grouped
    if args.qlora:  # NF4 experts run the per-expert loop (each expert dequantized in turn)
        rows = [run_case("ours, NF4 experts", ours, x, labels, reps, device, autocast)]
    else:
        rows = [run_case("ours, grouped experts", ours, x, labels, reps, device, autocast)]
        Experts._grouped = Experts._loop  # the per-expert loop for every expert, as NF4 experts run
        try:
            rows.append(run_case("ours, per-expert loop", ours, x, labels, reps, device, autocast))
        finally:
            Experts._grouped = grouped
    rows.append(run_case("transformers + PEFT", peft, x, labels, reps, device, autocast))
    shutil.rmtree(adapter)
    ref = rows[-1]
    for r in rows:
        if "error" not in r and "error" not in ref:
            r["speedup_vs_peft"] = round(ref["step_ms"] / r["step_ms"], 2)
            r["first_loss_rel_diff_vs_peft"] = abs(r["first_loss"] - ref["first_loss"]) / abs(ref["first_loss"])

    shape = (f"{'QLoRA, ' if args.qlora else ''}{'our trainer path, ' if args.trainer_path else ''}"
             f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_local_experts} experts x "
             f"{cfg.intermediate_size}, top-{cfg.num_experts_per_tok}, LoRA r={args.rank}, {batch}x{seq} tokens")
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    (out / "moe_bench.json").write_text(json.dumps({"device": device_name, "torch": torch.__version__,
                                                    "shape": shape, "rows": rows}, indent=2) + "\n")
    print(f"\n{device_name}, torch {torch.__version__}: {shape}")
    print("| case | step ms | tokens/s | peak GiB | speed-up vs PEFT | first loss rel. diff vs PEFT |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['case']} | error: {r['error']} | | | | |")
            continue
        diff = r.get("first_loss_rel_diff_vs_peft")
        print(f"| {r['case']} | {r['step_ms']} | {r['tokens_per_s']} | {r['peak_gib']} | "
              f"{r.get('speedup_vs_peft', '')} | {'' if diff is None else f'{diff:.1e}'} |")


if __name__ == "__main__":
    main()
