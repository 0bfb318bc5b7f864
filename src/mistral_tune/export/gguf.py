"""GGUF export for llama.cpp (and Ollama, LM Studio, llama-cpp-python).

Written with the `gguf` package (the writer llama.cpp's own converter uses), following
llama.cpp's converter for MistralForCausalLM: architecture "llama", q/k rows permuted from HF's
rotate-half RoPE layout back to the interleaved layout GGML's RoPE expects, norms in F32,
everything else in the chosen type. f16, bf16, q8_0 and q4_0 are written directly; K-quants
(q4_k_m, q5_k_m, q6_k) are made from an f16 file by llama.cpp's quantizer: the `llama-quantize`
program if it is on PATH, else the same function through llama-cpp-python if installed.

Tokenizer metadata: SentencePiece vocabularies as `llama` (pieces, scores, types), tekken as
`gpt2` BPE with pre-tokenizer `tekken` (byte-level tokens and merges), plus bos/eos/unk/pad
ids and the chat template of export/vocab.py (mistral-common's, adapted to llama.cpp encoding each
text between control tokens on its own, with SentencePiece's "▁" in front).

Mistral 7B v0.1's 4096-token sliding window has no llama-architecture key in llama.cpp, so
llama.cpp attends over the full context; we record it (`llama.attention.sliding_window`, read
by nothing today) and warn: outputs agree up to 4096 tokens of context.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelError
from ..fsutil import atomic_path, check_target
from ..models.tuned import load_tuned
from .vocab import chat_template, extract_vocab

DIRECT = ("f16", "bf16", "q8_0", "q4_0")
K_QUANTS = ("q4_k_m", "q5_k_m", "q6_k")
QUANTS = DIRECT + K_QUANTS


def _require_gguf():
    try:
        import gguf
    except ImportError:
        raise ModelError("GGUF export needs the gguf package: pip install 'mistral-tune[gguf]'") from None
    return gguf


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # HF -> GGML RoPE layout (llama.cpp convert_hf_to_gguf: LlamaModel.permute); rows = heads * head_dim.
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_name(hf: str) -> str:
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf in names:
        return names[hf]
    parts = hf.split(".")  # model.layers.N.<module>.<proj>.weight
    layer, module = parts[2], ".".join(parts[3:-1])
    per_layer = {
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    return f"blk.{layer}.{per_layer[module]}.weight"


def _gguf_tensors(state: dict[str, torch.Tensor], n_head: int, n_kv: int):
    """(GGUF name, float32 tensor) for each weight: q/k rows permuted to GGML's RoPE layout, and
    Mixtral's stacked experts split into llama.cpp's ffn_{gate,up,down}_exps (E, rows, cols)."""
    for key, value in state.items():
        t = value.detach().float()
        layer = key.split(".")[2] if key.startswith("model.layers.") else None
        if key.endswith("self_attn.q_proj.weight"):
            t = _permute(t, n_head)
        elif key.endswith("self_attn.k_proj.weight"):
            t = _permute(t, n_kv)
        elif key.endswith("mlp.gate.weight"):  # Mixtral's router
            yield f"blk.{layer}.ffn_gate_inp.weight", t
            continue
        elif key.endswith("mlp.experts.gate_up_proj"):
            gate, up = t.chunk(2, dim=1)
            yield f"blk.{layer}.ffn_gate_exps.weight", gate.contiguous()
            yield f"blk.{layer}.ffn_up_exps.weight", up.contiguous()
            continue
        elif key.endswith("mlp.experts.down_proj"):
            yield f"blk.{layer}.ffn_down_exps.weight", t
            continue
        yield _tensor_name(key), t


def export_gguf(
    source: Path, out: Path, quant: str = "f16", base_model: str | None = None, warn=print, overwrite: bool = False
) -> Path:
    """Write `out` (a .gguf file) from a merged model, run or adapter directory. `out` must be new, or
    (overwrite) a GGUF file (fsutil.check_target); it is written beside and renamed into place."""
    if quant not in QUANTS:
        raise ModelError(f"--quant {quant!r}: expected one of {', '.join(QUANTS)}")
    gguf = _require_gguf()
    out = check_target(out, "gguf", sources=[source, base_model], overwrite=overwrite)
    if quant in K_QUANTS:
        quantizer = _k_quantizer()  # fail before the slow part
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
            f16, quantized = Path(tmp) / "f16.gguf", Path(tmp) / "quantized.gguf"
            export_gguf(source, f16, "f16", base_model, warn)
            quantizer(f16, quantized, quant)
            os.replace(quantized, out)
        return out

    loaded = load_tuned(source, base_model)
    model, tok = loaded.model, loaded.tokenizer
    cfg = model.config
    if cfg.sliding_window is not None and cfg.sliding_window < cfg.max_position_embeddings:
        warn(f"warning: this model uses a {cfg.sliding_window}-token sliding window; llama.cpp's llama "
             f"architecture attends over the full context, so its outputs match ours only up to "
             f"{cfg.sliding_window} tokens of context")
    vocab = extract_vocab(tok)
    if len(vocab.tokens) != cfg.vocab_size:
        raise ModelError(f"tokenizer has {len(vocab.tokens)} tokens but the model's vocab_size is {cfg.vocab_size}")

    qtype = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[quant]
    ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant]

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, contextlib.closing(gguf.GGUFWriter(str(tmp), arch="llama")) as w:
        w.add_name(loaded.name)
        w.add_file_type(int(ftype))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_rope_freq_base(float(cfg.rope_theta))
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        w.add_vocab_size(cfg.vocab_size)
        w.add_rope_dimension_count(cfg.head_dim)
        if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:  # Nemo, Small: explicit head_dim
            w.add_key_length(cfg.head_dim)
            w.add_value_length(cfg.head_dim)
        if cfg.sliding_window is not None:
            w.add_sliding_window(cfg.sliding_window)
        if cfg.moe:
            w.add_expert_count(cfg.num_local_experts)
            w.add_expert_used_count(cfg.num_experts_per_tok)

        if vocab.kind == "spm":
            w.add_tokenizer_model("llama")
            w.add_tokenizer_pre("default")
            w.add_token_scores(vocab.scores)
        else:
            w.add_tokenizer_model("gpt2")
            w.add_tokenizer_pre("tekken")
            w.add_token_merges([f"{a} {b}" for a, b in vocab.merges])
        w.add_token_list(vocab.tokens)
        w.add_token_types(vocab.types)
        w.add_bos_token_id(vocab.bos_id)
        w.add_eos_token_id(vocab.eos_id)
        w.add_unk_token_id(vocab.unk_id)
        if vocab.pad_id is not None:
            w.add_pad_token_id(vocab.pad_id)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        w.add_chat_template(chat_template(tok))

        n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        state = model.state_dict()
        if cfg.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # llama.cpp reuses token_embd
        for name, t in _gguf_tensors(state, n_head, n_kv):
            arr = t.numpy()
            if arr.ndim == 1:  # norms stay F32, as llama.cpp's converter writes them
                w.add_tensor(name, arr.astype(np.float32))
                continue
            kind = qtype
            block = gguf.GGML_QUANT_SIZES[kind][0]
            if arr.shape[-1] % block:  # rows that do not fill whole blocks fall back to f16
                kind = gguf.GGMLQuantizationType.F16
            if kind == gguf.GGMLQuantizationType.F16:
                w.add_tensor(name, arr.astype(np.float16))
            else:
                w.add_tensor(name, gguf.quants.quantize(arr, kind), raw_dtype=kind)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    return out


def _k_quantizer():
    """A function (f16_path, out_path, quant) backed by llama.cpp, or a ModelError saying how to get one."""
    exe = shutil.which("llama-quantize")
    if exe:
        def run_tool(src: Path, dst: Path, quant: str) -> None:
            proc = subprocess.run([exe, str(src), str(dst), quant.upper()], capture_output=True, text=True)
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                raise ModelError(f"llama-quantize failed ({proc.returncode}): {' '.join(tail)}")
        return run_tool
    try:
        import llama_cpp
    except ImportError:
        raise ModelError(
            "K-quants (q4_k_m, q5_k_m, q6_k) are made by llama.cpp's quantizer and neither "
            "`llama-quantize` (on PATH) nor llama-cpp-python was found. Build llama.cpp "
            "(cmake -B build && cmake --build build --target llama-quantize) and put build/bin on PATH, "
            "or pip install llama-cpp-python; or export --quant q8_0 / q4_0, which need no llama.cpp."
        ) from None

    def run_library(src: Path, dst: Path, quant: str) -> None:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, "q5_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
                        "q6_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K}[quant]
        code = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
        if code != 0:
            raise ModelError(f"llama.cpp's quantizer failed with code {code} for {quant}")
    return run_library
