"""The peer stacks for bench/gpu_bench.py, each timed on the same shapes (gpu_bench passes them), batch
and loop as ours.

hf_sdpa: transformers + PEFT LoRA, SDPA attention, gradient checkpointing.
hf_liger: the same with Liger's Mistral kernels (RoPE, RMSNorm, SwiGLU, fused linear CE).
hf_qlora: transformers + PEFT on a bitsandbytes NF4 (double-quantized) base.
unsloth_lora / unsloth_qlora: Unsloth's FastLanguageModel with its offloaded checkpointing.
The QLoRA and Unsloth variants load a random-weight checkpoint written once per shape under CKPT_ROOT.
"""

from __future__ import annotations

import os
import shutil
import time

CKPT_ROOT = os.environ.get("BENCH_CKPT", "/tmp/bench-rand")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _hf_config(shape: dict):
    from transformers import MistralConfig

    return MistralConfig(**shape, tie_word_embeddings=False)


def ensure_checkpoint(shape: dict) -> str:
    """Random bf16 weights plus a throwaway word-level tokenizer (Unsloth wants one beside them),
    written once per shape; returns its directory."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    ckpt = f"{CKPT_ROOT}-{shape['hidden_size']}x{shape['num_hidden_layers']}-v{shape['vocab_size']}"
    if os.path.exists(ckpt):
        return ckpt
    part = f"{ckpt}.part{os.getpid()}"  # renamed when complete: a run beside this one never reads half of it
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(_hf_config(shape), dtype=torch.bfloat16)
    model.save_pretrained(part)
    del model
    torch.cuda.empty_cache()
    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(shape["vocab_size"])}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="w1", eos_token="w2", unk_token="w0",
                            pad_token="w3").save_pretrained(part)
    try:
        os.rename(part, ckpt)
    except OSError:  # another run finished first
        shutil.rmtree(part)
    return ckpt


def _load_hf(name: str, shape: dict, ckpt: str | None):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if "liger" in name:
        from liger_kernel.transformers import apply_liger_kernel_to_mistral

        apply_liger_kernel_to_mistral(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True)
    if "qlora" in name:
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=quant, dtype=torch.bfloat16,
                                                     attn_implementation="sdpa", device_map={"": 0})
    else:
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(_hf_config(shape), dtype=torch.bfloat16,
                                                     attn_implementation="sdpa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none",
                                             task_type="CAUSAL_LM", target_modules=TARGETS))
    model.train()  # from_pretrained leaves eval mode, where checkpointing silently does nothing
    return model


def _load_unsloth(name: str, ckpt: str):
    import torch
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(model_name=ckpt, max_seq_length=int(os.environ["BENCH_SEQ"]),
                                                 dtype=torch.bfloat16, load_in_4bit=name.endswith("qlora"),
                                                 local_files_only=True)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, bias="none",
                                             target_modules=TARGETS, use_gradient_checkpointing="unsloth",
                                             random_state=0)
    FastLanguageModel.for_training(model)
    return model


def run_peer(name: str, shape: dict, seq: int, bs: int, steps: int, warm: int, peak_tflops: float,
             flops_tok: float) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    os.environ["BENCH_SEQ"] = str(seq)
    if name.startswith("unsloth"):
        import unsloth  # noqa: F401  (Unsloth must be imported before transformers)
    import torch

    ckpt = ensure_checkpoint(shape) if "qlora" in name or name.startswith("unsloth") else None
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    model = _load_unsloth(name, ckpt) if name.startswith("unsloth") else _load_hf(name, shape, ckpt)
    load_s = time.time() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-5, fused=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    times = []
    for step in range(warm + steps):
        ids = torch.randint(0, shape["vocab_size"], (bs, seq), device="cuda", generator=gen)
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step == 0:
            first_step_s = time.time() - t0  # load, patch, one step
        if step >= warm:
            times.append(time.perf_counter() - t)
    med = sorted(times)[len(times) // 2]
    tok_s = bs * seq / med
    return dict(variant=name, seq=seq, bs=bs, step_s=round(med, 4), tokens_per_s=round(tok_s),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2), load_s=round(load_s, 1),
                first_step_s=round(first_step_s, 1),
                mfu_useful=round(tok_s * flops_tok / (peak_tflops * 1e12), 3), loss=round(float(out.loss), 3))
