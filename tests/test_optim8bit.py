"""optimizer: adamw_8bit (bitsandbytes' AdamW8bit, on its CPU backend here): the runs follow float32
AdamW's closely with 8-bit moments, LoRA+ and the schedule reach it, a checkpoint resumes it exactly,
and sharded weights are refused because its update cannot take them."""

from __future__ import annotations

import shutil

import pytest
import torch

from _runs import config, make_assets, metrics, same_tensors, tensors
from mistral_tune.train.loop import train

bnb = pytest.importorskip("bitsandbytes")

# The tiny model's projections have 4,096 values or more (bitsandbytes keeps float32 moments below
# that); lora_r 64 gives its LoRA matrices 64 x 64 = 4,096, so they are 8-bit too.
RUNS = {"none": dict(adapter="none", learning_rate=1e-3), "lora": dict(lora_r=64)}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"))


def _losses(out) -> list[float]:
    return [m["loss"] for m in metrics(out) if "loss" in m]


@pytest.mark.parametrize("adapter", RUNS)
def test_8bit_states_follow_float32_adamw(assets, tmp_path, adapter):
    """8 steps (3 of warm-up, then cosine decay; weight decay on matrices): each step's loss is within
    2% of the loss drop of float32 AdamW's, yet not equal to it, and the checkpointed moments of every
    matrix but the input embedding are 8-bit with a float32 scale per block of 256."""
    model, data = assets
    runs = {}
    for optimizer in ("adamw", "adamw_8bit"):
        out = tmp_path / optimizer
        train(config(model, data, out, optimizer=optimizer, max_steps=8, save_steps=8, weight_decay=0.1,
                     **RUNS[adapter]), echo=lambda _: None)
        runs[optimizer] = out
    ref, eight = _losses(runs["adamw"]), _losses(runs["adamw_8bit"])
    drop = ref[0] - min(ref)
    assert len(eight) == len(ref) == 8 and drop > 0.3
    assert max(abs(a - b) for a, b in zip(ref, eight)) <= 0.02 * drop
    assert ref != eight  # the 8-bit optimizer really ran
    state = tensors(runs["adamw_8bit"] / "checkpoint-8" / "optimizer.safetensors")
    weights = tensors(runs["adamw_8bit"] / "checkpoint-8" / "trainable.safetensors")
    # float32: the norms, k_proj and v_proj (64 x 32) and their lora_B (32 x 64), under 4,096 values; the
    # input embedding, as transformers' Trainer keeps it for adamw_bnb_8bit
    eight_bit = {n for n, w in weights.items() if w.numel() >= 4096 and not n.endswith("embed_tokens.weight")}
    assert len(eight_bit) == {"none": 6, "lora": 12}[adapter]
    for name, w in weights.items():
        if name not in eight_bit:
            assert state[f"{name}::state1"].dtype == torch.float32
            continue
        for i in (1, 2):
            assert state[f"{name}::state{i}"].dtype == torch.uint8 and state[f"{name}::state{i}"].shape == w.shape
            assert state[f"{name}::absmax{i}"].dtype == torch.float32
            assert state[f"{name}::absmax{i}"].shape == (-(-w.numel() // 256),)


def test_8bit_resume_repeats_the_uninterrupted_run(assets, tmp_path):
    """Full fine-tuning with adamw_8bit, resumed from step 4 of 8: metrics, weights and the 8-bit
    optimizer state at step 8 equal the uninterrupted run's, bit for bit."""
    model, data = assets
    out = tmp_path / "full"
    cfg = config(model, data, out, optimizer="adamw_8bit", max_steps=8, save_steps=4, **RUNS["none"])
    train(cfg, echo=lambda _: None)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    again = train(cfg.model_copy(update={"output_dir": str(copy), "resume": str(copy / "checkpoint-4")}),
                  echo=lambda _: None)
    assert again.steps == 8
    assert metrics(copy) == metrics(out)
    for part in ("trainable.safetensors", "optimizer.safetensors"):
        assert same_tensors(tensors(copy / "checkpoint-8" / part), tensors(out / "checkpoint-8" / part)), part
    assert tensors(copy / "checkpoint-8" / "optimizer.safetensors")["lm_head.weight::state1"].dtype == torch.uint8


def test_loraplus_reaches_the_8bit_optimizer(assets, tmp_path):
    """Adam's first step moves every element by about its learning rate, 8-bit moments too: lora_B
    (zero before) by lr x loraplus_lr_ratio, lora_A by lr."""
    model, data = assets
    out = tmp_path / "run"
    train(config(model, data, out, optimizer="adamw_8bit", lora_r=64, max_steps=1, warmup_steps=0,
                 loraplus_lr_ratio=16.0), echo=lambda _: None)
    saved = tensors(out / "adapter" / "adapter_model.safetensors")
    b = max(float(t.abs().max()) for k, t in saved.items() if ".lora_B." in k)
    assert b == pytest.approx(16 * 1e-2, rel=0.05)
    state = tensors(out / "checkpoint-1" / "optimizer.safetensors")
    assert any(k.endswith(".lora_B.weight::state1") and v.dtype == torch.uint8 for k, v in state.items())


def test_8bit_update_does_not_take_sharded_weights(tmp_path):
    """Why distributed: fsdp refuses adamw_8bit (runtime.check_distributed_config): bitsandbytes' 8-bit
    update fails on FSDP2's DTensor weights. When it stops failing, the refusal can go."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        layer = torch.nn.Linear(128, 128, bias=False)
        fully_shard(layer)
        optimizer = bnb.optim.AdamW8bit(layer.parameters(), lr=1e-3)
        layer(torch.randn(4, 128)).sum().backward()
        with pytest.raises(RuntimeError, match="DTensor"):
            optimizer.step()
    finally:
        dist.destroy_process_group()


def test_without_bitsandbytes_the_error_names_the_extra(monkeypatch):
    import sys

    from mistral_tune.config import config_from_dict
    from mistral_tune.errors import ConfigError
    from mistral_tune.train.optim import make_optimizer

    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)  # as if it were not installed
    cfg = config_from_dict({"base_model": "tiny", "datasets": [{"path": "d.jsonl"}], "optimizer": "adamw_8bit"})
    with pytest.raises(ConfigError, match=r"optimizer: adamw_8bit needs bitsandbytes.*mistral-tune\[qlora\]"):
        make_optimizer({"w": torch.nn.Parameter(torch.zeros(2, 2))}, cfg, torch.device("cpu"))


def test_without_bitsandbytes_train_stops_before_loading_or_writing(assets, tmp_path, monkeypatch):
    """The missing package is reported by train's checks, before the weights are read or the run's
    folder exists (it was reported only when the optimizer was built, after the model had loaded)."""
    import sys

    from mistral_tune.errors import ConfigError
    from mistral_tune.train import loop

    model, data = assets
    loads = []
    real = loop.load_model
    monkeypatch.setattr(loop, "load_model", lambda *a, **k: loads.append(1) or real(*a, **k))
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)  # as if it were not installed
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"optimizer: adamw_8bit needs bitsandbytes"):
        train(config(model, data, out, optimizer="adamw_8bit", max_steps=2), echo=lambda *a: None)
    assert not out.exists() and not loads
