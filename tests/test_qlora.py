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
from mistral_tune.lora import BASE_QUANTIZATION, LoraLinear, load_adapter  # noqa: E402
from mistral_tune.models.load import load_model  # noqa: E402
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
