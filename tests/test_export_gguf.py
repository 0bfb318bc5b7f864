"""GGUF export: metadata read back by the gguf reader, and the file run by real llama.cpp
(llama-cpp-python) with its tokens and logits compared against ours."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from export_fixtures import tiny_adapter, tiny_model
from mistral_tune.cli import main
from mistral_tune.errors import ModelError
from mistral_tune.export.gguf import export_gguf
from mistral_tune.models.tuned import load_tuned
from plain_decoding import plain_greedy

gguf = pytest.importorskip("gguf")

TEXT = "Hello there,  how are you? Ünïcödé 日本語 🙂 [INST]"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there, how are you?"}]


@pytest.fixture(scope="module")
def v3_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("gguf") / "tiny-v3", "v3", num_hidden_layers=2)


def _fields(path: Path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}, reader


def test_metadata_follows_llama_cpp_converter(v3_model: Path, tmp_path: Path) -> None:
    out = export_gguf(v3_model, tmp_path / "m.gguf", "q8_0")
    meta, reader = _fields(out)
    cfg = load_tuned(v3_model).model.config
    assert meta["general.architecture"] == "llama"
    assert meta["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    expected = {
        "llama.context_length": cfg.max_position_embeddings, "llama.embedding_length": cfg.hidden_size,
        "llama.block_count": cfg.num_hidden_layers, "llama.feed_forward_length": cfg.intermediate_size,
        "llama.attention.head_count": cfg.num_attention_heads,
        "llama.attention.head_count_kv": cfg.num_key_value_heads, "llama.rope.dimension_count": cfg.head_dim,
        "llama.vocab_size": cfg.vocab_size, "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.add_bos_token": True,
    }
    assert {k: meta[k] for k in expected} == expected
    assert meta["llama.rope.freq_base"] == pytest.approx(cfg.rope_theta)
    assert "llama.attention.sliding_window" not in meta
    assert "[INST]" in meta["tokenizer.chat_template"]
    assert len(meta["tokenizer.ggml.tokens"]) == cfg.vocab_size
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0


def test_sliding_window_is_recorded_and_warned(tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "swa", "v1", sliding_window=4096, max_position_embeddings=32768)  # as 7B v0.1
    warnings: list[str] = []
    out = export_gguf(model, tmp_path / "swa.gguf", "f16", warn=warnings.append)
    assert _fields(out)[0]["llama.attention.sliding_window"] == 4096
    assert any("4096-token sliding window" in w for w in warnings)


def test_k_quants_without_llama_cpp_say_what_to_install(v3_model: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no llama-quantize
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # and no binding
    with pytest.raises(ModelError, match="llama-quantize"):
        export_gguf(v3_model, tmp_path / "k.gguf", "q4_k_m")
    assert not (tmp_path / "k.gguf").exists()
    with pytest.raises(ModelError, match="expected one of"):
        export_gguf(v3_model, tmp_path / "k.gguf", "q3_xs")


def test_cli_export_gguf_from_a_run(v3_model: Path, tmp_path: Path) -> None:
    tiny_adapter(v3_model, tmp_path / "run" / "adapter")
    assert main(["export", "gguf", str(tmp_path / "run"), "--quant", "q4_0"]) == 0
    assert _fields(tmp_path / "run-q4_0.gguf")[0]["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q4_0)


# ---------------------------------------------------------------------- real llama.cpp


def _require_llama_cpp():
    """The binding, or a skip; CI sets MISTRAL_TUNE_REQUIRE_LLAMA=1 so a missing build fails loudly."""
    if os.environ.get("MISTRAL_TUNE_REQUIRE_LLAMA") == "1":
        import llama_cpp

        return llama_cpp
    return pytest.importorskip("llama_cpp")


def _llama(path: Path):
    llama_cpp = _require_llama_cpp()
    return llama_cpp.Llama(str(path), n_ctx=256, n_gpu_layers=0, logits_all=True, verbose=False)


def _check_against_llama_cpp(model_dir: Path, gguf_path: Path, logit_atol: float, free_running: bool) -> None:
    """Tokens equal; logits along our greedy continuation within logit_atol; llama.cpp's greedy
    choice equal to ours at every step where our top-2 margin exceeds what the format's rounding
    can flip (2 * logit_atol); with free_running, llama.cpp's own greedy continuation equals ours."""
    loaded = load_tuned(model_dir)
    tok = loaded.tokenizer
    llm = _llama(gguf_path)
    try:
        # Tokenizer: llama.cpp's tokens for plain text equal mistral-common's (BOS included).
        assert llm.tokenize(TEXT.encode(), add_bos=True, special=False) == tok.encode_text(TEXT, eos=False)
        ids = tok.encode_prompt(CHAT)
        want = plain_greedy(loaded.model, ids, 12)  # our greedy continuation, no stop at EOS
        seq = ids + want
        llm.eval(seq)
        theirs = np.array(llm.scores[: len(seq)])
        with torch.no_grad():
            ours = loaded.model(torch.tensor([seq]))[0].numpy()
        np.testing.assert_allclose(theirs, ours, atol=logit_atol, rtol=0)
        steps = range(len(ids) - 1, len(seq) - 1)
        top2 = np.sort(ours[list(steps)], axis=-1)[:, -2:]
        decidable = [p for p, (b, a) in zip(steps, top2, strict=True) if a - b > 2 * logit_atol]
        assert len(decidable) >= 3, "too few clear-cut steps to compare greedy choices"
        for p in decidable:
            assert theirs[p].argmax() == ours[p].argmax() == seq[p + 1]
        if free_running:
            llm.reset()
            llm.eval(ids)
            got = []
            for _ in range(len(want)):
                got.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
                llm.eval([got[-1]])
            assert got == want
    finally:
        llm.close()


@pytest.mark.slow
@pytest.mark.parametrize(("quant", "atol", "exact"), [("f16", 3e-3, True), ("bf16", 1.5e-2, False),
                                                      ("q8_0", 3e-2, False)])
def test_llama_cpp_runs_the_file_like_we_run_the_model(v3_model: Path, tmp_path: Path, quant, atol, exact) -> None:
    _require_llama_cpp()
    out = export_gguf(v3_model, tmp_path / f"m-{quant}.gguf", quant)
    _check_against_llama_cpp(v3_model, out, atol, exact)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tekken", "v1"])
def test_llama_cpp_other_tokenizers(name: str, tmp_path: Path) -> None:
    _require_llama_cpp()
    model = tiny_model(tmp_path / name, name)
    _check_against_llama_cpp(model, export_gguf(model, tmp_path / "m.gguf", "f16"), 3e-3, True)


@pytest.mark.slow
def test_k_quant_through_llama_cpp(v3_model: Path, tmp_path: Path) -> None:
    _require_llama_cpp()
    out = export_gguf(v3_model, tmp_path / "m-q4km.gguf", "q4_k_m")
    assert _fields(out)[0]["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    loaded = load_tuned(v3_model)
    ids = loaded.tokenizer.encode_prompt(CHAT)
    llm = _llama(out)
    try:
        llm.eval(ids)
        theirs = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
    with torch.no_grad():
        ours = loaded.model(torch.tensor([ids]))[0].numpy()
    assert np.corrcoef(theirs.ravel(), ours.ravel())[0, 1] > 0.98


@pytest.mark.slow
@pytest.mark.parametrize("name", ["v1", "v3", "v7", "tekken"])
def test_llama_cpp_chat_template_gives_mistral_common_ids(name: str, tmp_path: Path) -> None:
    """The GGUF's chat template, rendered by llama-cpp-python's own chat formatter and tokenized
    by llama.cpp, gives mistral-common's ids (as create_chat_completion would)."""
    llama_cpp = _require_llama_cpp()
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from test_export_hf import CONVERSATIONS, _mistral_common_ids

    model = tiny_model(tmp_path / name, name)
    out = export_gguf(model, tmp_path / "m.gguf", "q8_0" if name != "tekken" else "f16")
    llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    try:
        formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="</s>", bos_token="<s>")
        source = load_tuned(model).tokenizer.source_file
        for conv in CONVERSATIONS:
            prompt = formatter(messages=conv).prompt
            assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == _mistral_common_ids(source, conv)
    finally:
        llm.close()


@pytest.mark.slow
def test_llama_cpp_runs_a_mixtral_file_like_we_run_the_model(tmp_path: Path) -> None:
    """Mixtral: the router and the stacked experts as llama.cpp's ffn_*_exps tensors, checked by llama.cpp."""
    _require_llama_cpp()
    model_dir = tiny_model(tmp_path / "tiny-mixtral", "v3", num_hidden_layers=2, intermediate_size=96,
                           architecture="MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2)
    out = export_gguf(model_dir, tmp_path / "mixtral-f16.gguf", "f16")
    meta, reader = _fields(out)
    assert meta["llama.expert_count"] == 4 and meta["llama.expert_used_count"] == 2
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    assert shapes["blk.0.ffn_gate_exps.weight"] == (64, 96, 4)  # GGUF lists dimensions innermost first
    assert shapes["blk.0.ffn_down_exps.weight"] == (96, 64, 4)
    assert shapes["blk.1.ffn_gate_inp.weight"] == (64, 4)
    _check_against_llama_cpp(model_dir, out, 3e-3, True)
