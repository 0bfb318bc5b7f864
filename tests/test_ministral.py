"""Ministral: per-layer attention types (sliding or full) equal transformers' MinistralForCausalLM,
in plain and packed rows, checkpointed training and decoding with a cache."""

from __future__ import annotations

import pytest
import torch
import transformers

from mistral_tune.generate.cache import cached_logits
from mistral_tune.models.families import MINISTRAL, describe, family_of
from mistral_tune.models.load import load_model, save_model
from mistral_tune.models.mistral import MistralConfig, MistralForCausalLM

INTERLEAVED = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, architecture="MinistralForCausalLM", sliding_window=5, layer_types=INTERLEAVED)


def tiny(**overrides) -> MistralForCausalLM:
    model = MistralForCausalLM(MistralConfig(**{**TINY, **overrides}))
    model.init_weights(generator=torch.Generator().manual_seed(0))
    return model.eval()


def ids(batch=2, seq=24, seed=1):
    return torch.randint(0, 1000, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("layer_types", [INTERLEAVED, ["sliding_attention"] * 4, ["full_attention"] * 4])
def test_logits_equal_transformers(layer_types, attn):
    model = tiny(layer_types=layer_types)
    cfg = transformers.MinistralConfig(**model.config.to_hf(), attn_implementation=attn)
    assert cfg.layer_types == layer_types
    ref = transformers.MinistralForCausalLM(cfg).eval()
    ref.load_state_dict(model.state_dict(), strict=False)
    x = ids()
    with torch.no_grad():
        ours, theirs = model(x), ref(input_ids=x, use_cache=False).logits.float()
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() <= 1e-5


def test_the_layer_types_matter():
    """A window shorter than the row changes the full layers' output, so the test above can fail."""
    x = ids()
    with torch.no_grad():
        assert not torch.allclose(tiny()(x), tiny(layer_types=["sliding_attention"] * 4)(x), atol=1e-4)


def test_packed_rows_and_cached_decoding_equal_separate_full_forwards():
    model = tiny()
    a, b = ids(1, 9, seed=2), ids(1, 13, seed=3)
    seq_ids = torch.tensor([[0] * 9 + [1] * 13])
    pos = torch.cat([torch.arange(9), torch.arange(13)])[None]
    with torch.no_grad():
        together = model(torch.cat([a, b], 1), position_ids=pos, seq_ids=seq_ids)
        apart = torch.cat([model(a), model(b)], dim=1)
        steps = cached_logits(model, b, [(0, 6)] + [(i, i + 1) for i in range(6, 13)])
    assert torch.allclose(together, apart, atol=1e-5)
    assert torch.allclose(steps, model(b), atol=1e-5)


@pytest.mark.parametrize("by_row", [False, True])
def test_checkpointed_gradients_equal_plain(by_row):
    x = ids(2, 16)
    grads = []
    for checkpointing in (False, True):
        model = tiny().train()
        model.configure(gradient_checkpointing=checkpointing, recompute_by_row=by_row)
        model(x).logsumexp(-1).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, recomputed in zip(*grads, strict=True):
        assert torch.allclose(plain, recomputed, atol=1e-5)


def test_saved_and_loaded_as_ministral(tmp_path):
    model = tiny()
    save_model(model, tmp_path)
    loaded, _ = load_model(str(tmp_path))
    assert loaded.config.layer_types == INTERLEAVED
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert type(ref).__name__ == "MinistralForCausalLM"
    x = ids()
    with torch.no_grad():
        assert torch.allclose(ref(input_ids=x).logits, model(x), atol=1e-5)
    assert family_of({"architectures": ["MinistralForCausalLM"]}) is MINISTRAL
    assert "sliding window 5 in 2 of 4 layers" in describe(loaded.config)


def test_layer_types_are_checked():
    with pytest.raises(ValueError, match="3 entries for 4 layers"):
        MistralConfig(**{**TINY, "layer_types": INTERLEAVED[:3]})
    with pytest.raises(ValueError, match="chunked_attention"):
        MistralConfig(**{**TINY, "layer_types": ["chunked_attention"] * 4})
