"""The pass-key probe on a model known to retrieve (adapter on) and known not to (adapter off), with
and without a sliding window; the probe's prompts; the token budget."""

from __future__ import annotations

import pytest
import torch

from mistral_tune.chat import load_tokenizer
from mistral_tune.config import NeedleConfig
from mistral_tune.evaluate.base import ModelPair
from mistral_tune.evaluate.needle import FILLER, NeedleEval, NeedleProbe, default_lengths, plan
from mistral_tune.models.lora import LoraLinear, LoraSpec, apply_lora
from mistral_tune.models.mistral import MistralConfig, MistralForCausalLM

BIAS, FLAG, ID0, SLOT = 0, 1, 2, 12  # embedding dimensions: constant, "is a digit", digit one-hot, retrieved digit
LOW = 7  # the rotary pair (7, 15) of head_dim 16 turns slowest: attention by content, nearly blind to position


def retriever(sliding_window: int | None = None) -> tuple[MistralForCausalLM, object]:
    """A one-layer Mistral whose LoRA adapter retrieves the single digit in its context, built by hand.

    With the adapter, head 0 attends to digit tokens (query from the constant dimension, key from
    the digit flag), copies the digit's one-hot into a slot of the residual, and the output layer
    reads the slot back as that digit's token. Without it, attention writes nothing and every logit
    is 0, so the model answers token 0 (nothing, once decoded): the base cannot retrieve.
    """
    tokenizer = load_tokenizer("v3")
    digits = [tokenizer.encode_text(str(d), bos=False, eos=False)[-1] for d in range(10)]
    cfg = MistralConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                        rope_theta=10000.0, sliding_window=sliding_window)
    model = MistralForCausalLM(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for m in model.modules():
            if hasattr(m, "eps"):  # RMSNorm
                m.weight.fill_(1.0)
        emb = model.model.embed_tokens.weight
        emb[:, 32:] = torch.randn(cfg.vocab_size, 32, generator=gen) * 0.2  # tokens differ from one another
        emb[:, BIAS] = 1.0
        for d, tok in enumerate(digits):
            emb[tok, 32:] = 0.0
            emb[tok, FLAG] = emb[tok, ID0 + d] = 1.0
            model.lm_head.weight[tok, SLOT + d] = 10.0
    apply_lora(model, LoraSpec(r=10, alpha=10, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        for lora in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
            assert isinstance(lora, LoraLinear) and lora.scaling == 1.0
            lora.lora_A.weight.zero_()
            lora.lora_B.weight.zero_()
        attn.q_proj.lora_A.weight[0, BIAS] = 1.0
        attn.q_proj.lora_B.weight[LOW, 0] = 3.0  # head 0
        attn.k_proj.lora_A.weight[0, FLAG] = 1.0
        attn.k_proj.lora_B.weight[LOW, 0] = 3.0  # kv head 0, which head 0 reads
        for d in range(10):
            attn.v_proj.lora_A.weight[d, ID0 + d] = 1.0
            attn.v_proj.lora_B.weight[d, d] = 1.0
            attn.o_proj.lora_A.weight[d, d] = 1.0  # head 0's output dimension d
            attn.o_proj.lora_B.weight[SLOT + d, d] = 1.0
    return model.eval(), tokenizer


def needle_cfg(**kw) -> NeedleConfig:
    return NeedleConfig.model_validate({"depths": [0.0, 0.5, 1.0], "trials": 2, "key_digits": 1, **kw})


def test_retriever_found_by_the_probe_and_base_not():
    model, tokenizer = retriever()
    cfg = needle_cfg(lengths=[40, 120])
    result = NeedleEval(tokenizer, cfg, sequence_len=64, model_config=model.config).run(ModelPair(model, tokenizer))
    grids = result.figures[0]["grids"]
    assert grids["tuned"] == [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    assert grids["base"] == [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert result.metrics["accuracy"] == {"base": 0.0, "tuned": 1.0}
    assert result.metrics["accuracy_trained_len"] == {"base": 0.0, "tuned": 1.0}  # the 40-token row
    assert "no sliding window" in " ".join(result.notes)


def test_sliding_window_hides_a_needle_further_back_than_the_window():
    model, tokenizer = retriever(sliding_window=48)
    cfg = needle_cfg(lengths=[40, 120])
    result = NeedleEval(tokenizer, cfg, sequence_len=64, model_config=model.config).run(ModelPair(model, tokenizer))
    fig = result.figures[0]
    # One layer: a needle at the start of 120 tokens is out of the 48-token window; near the end it is not.
    assert fig["grids"]["tuned"] == [[1.0, 1.0, 1.0], [0.0, 0.0, 1.0]]
    assert fig["y"] == ["40", "120 *"]
    assert any("sliding window 48: it covers lengths up to 48; beyond it (marked *: 120)" in n for n in result.notes)


@pytest.mark.parametrize("length", [48, 100, 300])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_probe_prompts_have_the_length_and_the_needle_where_asked(length, depth):
    tokenizer = load_tokenizer("v3")
    cfg = needle_cfg()
    probe = NeedleProbe(tokenizer, cfg)
    ids = probe.prompt(length, depth, "7")
    assert abs(len(ids) - length) <= probe.tokens_per_sentence
    text = tokenizer.decode(ids)
    assert text.count("7") == 1 and not any(ch.isdigit() for ch in " ".join(FILLER))
    before = text.split(cfg.needle.format(key="7"))[0]
    n_sentences = text.count(".") - cfg.needle.count(".") - cfg.question.count(".")
    assert before.count(".") == round(depth * n_sentences)


def test_budget_drops_the_longest_lengths_first():
    assert plan([256, 64, 128], n_depths=2, trials=1, budget=10_000) == ([64, 128, 256], [])
    assert plan([256, 64, 128], n_depths=2, trials=1, budget=400) == ([64, 128], [256])
    assert plan([256], n_depths=5, trials=2, budget=10) == ([], [256])
    assert default_lengths(4096, 32768) == [1024, 2048, 4096, 8192]
    assert default_lengths(256, 512) == [64, 128, 256, 512]
