"""QLoRA: frozen NF4 projections (bitsandbytes) under LoRA adapters, trained, saved and merged."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("bitsandbytes")

from mistral_tune.config import config_from_dict  # noqa: E402
from mistral_tune.errors import ConfigError  # noqa: E402
from mistral_tune.export.hf import merge_to_dir  # noqa: E402
from mistral_tune.models.load import load_model  # noqa: E402
from mistral_tune.models.lora import LoraLinear  # noqa: E402
from mistral_tune.models.peft_format import BASE_QUANTIZATION, load_adapter  # noqa: E402
from mistral_tune.models.quant import NF4Linear, quantize_model  # noqa: E402
from mistral_tune.train.loop import train  # noqa: E402


def test_nf4_linear_is_a_linear_with_the_dequantized_weight():
    gen = torch.Generator().manual_seed(0)
    dense = nn.Linear(128, 96, bias=False)
    nn.init.normal_(dense.weight, 0, 0.05, generator=gen)
    q = NF4Linear.from_linear(dense)
    w = q.dequantized()
    # 4-bit: close to the original, not equal to it.
    rel = float((w - dense.weight.detach()).norm() / dense.weight.detach().norm())
    assert 0.0 < rel < 0.15

    x = torch.randn(5, 7, 128, generator=gen, requires_grad=True)
    out = q(x)
    assert torch.allclose(out, F.linear(x, w), atol=1e-6)
    grad = torch.randn_like(out)
    out.backward(grad)
    x_ref = x.detach().clone().requires_grad_(True)
    F.linear(x_ref, w).backward(grad)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-6)


def _data(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
            for w in ["apple", "river", "stone", "cloud", "tiger", "maple", "candle", "violin"]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_qlora_trains_saves_and_merges_to_the_trained_model(tiny_model_dir, tmp_path):
    cfg = config_from_dict({
        "base_model": str(tiny_model_dir), "datasets": [{"path": str(_data(tmp_path))}],
        "output_dir": str(tmp_path / "run"), "adapter": "qlora", "lora_r": 4, "learning_rate": 0.02,
        "max_steps": 6, "sequence_len": 64, "micro_batch_size": 2, "dataset_cache": False,
    })
    result = train(cfg, echo=lambda *_: None)
    adapter = result.adapter_dir
    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / BASE_QUANTIZATION).read_text())["quant_type"] == "nf4"

    # The trained model: the NF4 base with the saved adapter on top.
    trained, _ = load_model(str(tiny_model_dir))
    assert quantize_model(trained, list(cfg.lora_target_modules)) == 7
    load_adapter(trained, adapter)
    assert all(m.quantized is not None for m in trained.modules() if isinstance(m, LoraLinear))
    assert any(float(m.lora_B.weight.abs().max()) > 0 for m in trained.modules() if isinstance(m, LoraLinear))

    messages = []
    merged_dir = merge_to_dir(adapter, tmp_path / "merged", echo=messages.append)
    assert any("dequantizing the NF4 base" in m for m in messages)
    merged, _ = load_model(str(merged_dir))
    ids = torch.randint(3, 32768, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = trained.eval()(ids), merged.eval()(ids)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)

    # Merging into the original (not NF4) weights would give a different model: the round trip matters.
    plain, _ = load_model(str(tiny_model_dir))
    load_adapter(plain, adapter)
    with torch.no_grad():
        assert not torch.allclose(plain.eval()(ids), want, rtol=1e-4, atol=1e-4)


def test_qlora_without_bitsandbytes_says_how_to_install(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    cfg = config_from_dict({"base_model": str(tiny_model_dir), "datasets": [{"path": str(_data(tmp_path))}],
                            "output_dir": str(tmp_path / "run"), "adapter": "qlora", "dataset_cache": False})
    with pytest.raises(ConfigError, match=r"mistral-tune\[qlora\]"):
        train(cfg, echo=lambda *_: None)
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def bnb_4bit_dir(tmp_path_factory):
    """A bnb-4bit checkpoint written by transformers + bitsandbytes (like the *-bnb-4bit hub repos)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from mistral_tune.quickstart import create_tiny_model

    root = tmp_path_factory.mktemp("bnb")
    plain = create_tiny_model(root / "plain", "v3", hidden_size=64, intermediate_size=128, num_hidden_layers=1)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(str(plain), quantization_config=quant, device_map={"": "cpu"})
    out = root / "bnb-4bit"
    hf.save_pretrained(out)
    (out / "tokenizer.model.v3").write_bytes((plain / "tokenizer.model.v3").read_bytes())
    return out, hf


def test_bnb_4bit_checkpoint_loads_as_nf4_and_matches_transformers(bnb_4bit_dir):
    """Our NF4 model is transformers' model on bitsandbytes' own dequantized weights.

    Two references, two tolerances. Against a dense transformers model holding the weights that
    bitsandbytes dequantizes, ours must agree to float32 round-off. Against transformers' 4-bit
    forward, the allowance is that forward's own distance from the dense one (its CPU kernels
    compute the same product in another order, by an amount that changes between versions), not a
    constant fitted to one version.
    """
    import bitsandbytes.functional as bnbf
    from transformers import AutoModelForCausalLM

    path, hf = bnb_4bit_dir
    ours, _ = load_model(str(path))
    nf4 = {name: m for name, m in ours.named_modules() if isinstance(m, NF4Linear)}
    assert len(nf4) == 7  # every projection of the one layer stayed 4-bit

    dense = AutoModelForCausalLM.from_pretrained(str(path.parent / "plain"), dtype=torch.float32)
    state = dense.state_dict()
    for name, module in hf.named_modules():
        quant_state = getattr(getattr(module, "weight", None), "quant_state", None)
        if quant_state is not None:
            w = bnbf.dequantize_4bit(module.weight.data, quant_state).float()
            assert torch.equal(nf4[name].dequantized(), w), name  # the same 4-bit codes, read the same way
            state[f"{name}.weight"] = w
    dense.load_state_dict(state)

    ids = torch.randint(3, 32768, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = dense.eval()(ids).logits
        bnb_forward = hf.eval()(ids).logits
        got = ours.eval()(ids)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    reference_noise = float((bnb_forward - want).abs().max())
    assert float((got - bnb_forward).abs().max()) <= reference_noise + 1e-5


def test_bnb_4bit_checkpoint_trains_with_qlora_and_refuses_plain_lora(bnb_4bit_dir, tmp_path):
    path, _ = bnb_4bit_dir
    base = {"base_model": str(path), "datasets": [{"path": str(_data(tmp_path))}], "max_steps": 3,
            "sequence_len": 64, "dataset_cache": False, "lora_r": 4}
    with pytest.raises(ConfigError, match="adapter: qlora"):
        train(config_from_dict({**base, "output_dir": str(tmp_path / "lora")}), echo=lambda *_: None)
    assert not (tmp_path / "lora").exists()
    result = train(config_from_dict({**base, "output_dir": str(tmp_path / "q"), "adapter": "qlora"}),
                   echo=lambda *_: None)
    assert result.steps == 3 and (result.adapter_dir / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("kind", ["nf4", "fp8"])
def test_a_quantized_base_counts_as_the_weights_it_stands_for(tiny_model_dir, kind):
    """The run's "X of Y parameters trained" line counted an NF4 base as its packed bytes (half the
    weights) and an FP8 base as nothing, so the trained share came out too high."""
    from mistral_tune.models.fp8 import fp8_model
    from mistral_tune.models.lora import LoraSpec, apply_lora
    from mistral_tune.models.stats import count_params

    model, _ = load_model(str(tiny_model_dir))
    _, dense = count_params(model)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    (quantize_model if kind == "nf4" else fp8_model)(model, targets, "cpu")
    apply_lora(model, LoraSpec(r=4, alpha=8))
    trainable, total = count_params(model)
    assert trainable > 0 and total == dense + trainable
