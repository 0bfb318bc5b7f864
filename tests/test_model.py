"""Tests for mistral_tune.models: logits must equal transformers' MistralForCausalLM (the reference)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from mistral_tune.errors import ModelError
from mistral_tune.generate.cache import cached_logits
from mistral_tune.models.load import INDEX_NAME, WEIGHTS_NAME, load_model, save_model

SEQ = 24
RTOL = 1e-5

# (a) full attention, (b) sliding window shorter than the sequence, (c) head_dim != hidden/heads,
# (d) GQA with one KV head and with as many KV heads as query heads (plain multi-head attention).
CONFIGS = {
    "full": dict(sliding_window=None),
    "window5": dict(sliding_window=5),
    "head_dim24": dict(head_dim=24),
    "gqa_kv1": dict(num_key_value_heads=1),
    "mha_kv4": dict(num_key_value_heads=4),
    "tied_window7": dict(tie_word_embeddings=True, sliding_window=7, head_dim=24, num_key_value_heads=1),
}


def rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|."""
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def ids(batch: int = 2, seq: int = SEQ, seed: int = 1, vocab: int = 1000) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_equal_transformers(name, attn, make_tiny_mistral, make_hf_mistral):
    model = make_tiny_mistral(**CONFIGS[name])
    ref = make_hf_mistral(model.config, model.state_dict(), attn)
    x = ids()
    with torch.no_grad():
        ours = model(x)
        theirs = ref(input_ids=x, use_cache=False).logits.float()
    assert ours.shape == theirs.shape == (2, SEQ, 1000)
    assert rel_diff(ours, theirs) <= RTOL, f"{name}/{attn}: rel diff {rel_diff(ours, theirs):.2e}"


def test_hf_config_round_trip(make_tiny_mistral):
    """The HF form of our config means the same model to transformers (theta, head_dim, window, GQA)."""
    model = make_tiny_mistral(sliding_window=5, head_dim=24, num_key_value_heads=1, rope_theta=12345.0)
    hf = transformers.MistralConfig(**model.config.to_hf())
    assert hf.head_dim == 24
    assert hf.sliding_window == 5
    assert hf.num_key_value_heads == 1
    rope = getattr(hf, "rope_parameters", None) or {"rope_theta": getattr(hf, "rope_theta", None)}
    assert rope["rope_theta"] == 12345.0


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_sliding_window_changes_logits(attn, make_tiny_mistral, make_hf_mistral):
    """Guards the window tests against passing vacuously: the window must matter beyond its length."""
    window = 5
    windowed = make_tiny_mistral(sliding_window=window)
    full = make_tiny_mistral(sliding_window=None)
    full.load_state_dict(windowed.state_dict())
    x = ids()
    with torch.no_grad():
        a, b = windowed(x), full(x)
        # Positions 0..window-1 see the same keys either way; later ones must not.
        torch.testing.assert_close(a[:, :window], b[:, :window], rtol=0, atol=0)
        assert (a[:, window:] - b[:, window:]).abs().amax(-1).min() > 1e-3
        # The reference also applies the window (else the equality tests above would prove nothing).
        ref_w = make_hf_mistral(windowed.config, windowed.state_dict(), attn)(input_ids=x, use_cache=False).logits
        ref_f = make_hf_mistral(full.config, full.state_dict(), attn)(input_ids=x, use_cache=False).logits
    assert (ref_w - ref_f)[:, window:].abs().max() > 1e-3
    assert rel_diff(a, ref_w) <= RTOL and rel_diff(b, ref_f) <= RTOL


def test_head_dim_and_gqa_shapes(make_tiny_mistral):
    model = make_tiny_mistral(head_dim=24, num_key_value_heads=1)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (4 * 24, 64)
    assert attn.k_proj.weight.shape == (24, 64)
    assert attn.o_proj.weight.shape == (64, 4 * 24)


# ---------------------------------------------------------------------- saving and loading


def test_sharded_save_load_round_trip(tmp_path: Path, make_tiny_mistral):
    model = make_tiny_mistral(sliding_window=5, head_dim=24)
    save_model(model, tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tmp_path / s).is_file() for s in shards)
    assert not (tmp_path / WEIGHTS_NAME).exists()
    assert set(index["weight_map"]) == set(model.state_dict())
    loaded, model_dir = load_model(str(tmp_path))
    assert model_dir == tmp_path
    assert loaded.config == model.config
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("sharded", [True, False])
def test_transformers_loads_saved_dir(tmp_path: Path, sharded: bool, make_tiny_mistral):
    model = make_tiny_mistral(sliding_window=5, head_dim=24, num_key_value_heads=1)
    save_model(model, tmp_path, max_shard_bytes=200_000 if sharded else 5 * 1024**3)
    assert (tmp_path / INDEX_NAME).is_file() == sharded
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(ref).__name__ == "MistralForCausalLM"
    x = ids()
    with torch.no_grad():
        ours = model(x)
        theirs = ref(input_ids=x, use_cache=False).logits.float()
    assert rel_diff(ours, theirs) <= RTOL


def test_tied_embeddings_save_without_lm_head(tmp_path: Path, make_tiny_mistral):
    model = make_tiny_mistral(tie_word_embeddings=True)
    save_model(model, tmp_path)
    assert "lm_head.weight" not in load_file(str(tmp_path / WEIGHTS_NAME))
    loaded, _ = load_model(str(tmp_path))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # one Parameter, not two sharing storage
    assert len(list(loaded.parameters())) == len(list(model.parameters()))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
        assert rel_diff(model(x), ref(input_ids=x, use_cache=False).logits) <= RTOL


def test_load_bfloat16_checkpoint(tmp_path: Path, make_tiny_mistral):
    model = make_tiny_mistral()
    save_model(model, tmp_path, dtype="bfloat16")
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded, _ = load_model(str(tmp_path), dtype=torch.float32)
    for key, value in model.state_dict().items():
        assert loaded.state_dict()[key].dtype == torch.float32
        torch.testing.assert_close(loaded.state_dict()[key], value.to(torch.bfloat16).float(), rtol=0, atol=0)


def test_load_missing_path_raises(tmp_path: Path):
    with pytest.raises(ModelError, match="not found"):
        load_model(str(tmp_path / "does-not-exist"))


def test_load_dir_without_config_raises(tmp_path: Path):
    with pytest.raises(ModelError, match="config.json"):
        load_model(str(tmp_path))


def test_wrong_shaped_tensor_raises_naming_it(tmp_path: Path, make_tiny_mistral):
    save_model(make_tiny_mistral(), tmp_path)
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    bad = "model.layers.1.self_attn.k_proj.weight"
    tensors[bad] = torch.zeros(8, 64)
    save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(ModelError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_model(str(tmp_path))


def test_missing_tensor_raises(tmp_path: Path, make_tiny_mistral):
    save_model(make_tiny_mistral(), tmp_path)
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    del tensors["model.norm.weight"]
    save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(ModelError, match=r"model\.norm\.weight"):
        load_model(str(tmp_path))


def test_missing_shard_raises(tmp_path: Path, make_tiny_mistral):
    save_model(make_tiny_mistral(), tmp_path, max_shard_bytes=200_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(ModelError, match=shard.name):
        load_model(str(tmp_path))


@pytest.mark.parametrize(
    "patch",
    [
        {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "num_local_experts": 8},
        {"model_type": "mixtral"},
    ],
)
def test_mixtral_config_raises(tmp_path: Path, patch: dict, make_tiny_mistral):
    save_model(make_tiny_mistral(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(patch)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="mixtral"):
        load_model(str(tmp_path))


def test_invalid_config_json_raises(tmp_path: Path, make_tiny_mistral):
    save_model(make_tiny_mistral(), tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_model(str(tmp_path))


# ---------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("window", [None, 5])
def test_kv_cache_decoding_equals_full_sequence(window, make_tiny_mistral):
    model = make_tiny_mistral(sliding_window=window)
    x = ids(batch=2, seq=SEQ)
    with torch.no_grad():
        full = model(x)
        # Prefill 7 tokens, one chunk of 3 with a warm cache, then token by token.
        incremental = cached_logits(model, x, [(0, 7), (7, 10)] + [(i, i + 1) for i in range(10, SEQ)])
    assert rel_diff(incremental, full) <= RTOL


def test_kv_cache_matches_transformers_decoding(make_tiny_mistral, make_hf_mistral):
    """Token-by-token logits also equal transformers' own cached decoding (window shorter than the text)."""
    model = make_tiny_mistral(sliding_window=5)
    ref = make_hf_mistral(model.config, model.state_dict(), "sdpa")
    x = ids(batch=1, seq=16)
    with torch.no_grad():
        ours = [cached_logits(model, x, [(0, 4)] + [(i, i + 1) for i in range(4, 16)])]
        out = ref(input_ids=x[:, :4], use_cache=True)
        theirs, past = [out.logits], out.past_key_values
        for i in range(4, 16):
            out = ref(input_ids=x[:, i:i + 1], past_key_values=past, use_cache=True)
            theirs.append(out.logits)
            past = out.past_key_values
    assert rel_diff(torch.cat(ours, 1), torch.cat(theirs, 1).float()) <= RTOL


def test_checkpoint_saved_by_transformers_loads_with_its_rope_theta(make_tiny_mistral, make_hf_mistral, tmp_path):
    """transformers >= 5 writes rope_theta inside rope_parameters; reading only the top-level key
    would silently fall back to the default theta and change every logit."""
    ours = make_tiny_mistral(seed=4, rope_theta=12345.0)
    hf = make_hf_mistral(ours.config, ours.state_dict())
    hf.save_pretrained(tmp_path / "hf")
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "rope_theta" in saved or saved.get("rope_parameters", {}).get("rope_theta") == 12345.0
    loaded, _ = load_model(str(tmp_path / "hf"))
    assert loaded.config.rope_theta == 12345.0
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = loaded.eval()(ids), hf(ids).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()

    saved["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 12345.0, "factor": 4.0}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ModelError, match="yarn"):
        load_model(str(tmp_path / "hf"))
