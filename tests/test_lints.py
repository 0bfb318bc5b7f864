"""Lints: advice on settings that are legal but unusual, printed by validate, plan and train (never fatal)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mistral_tune.chat import load_tokenizer
from mistral_tune.config import config_from_dict
from mistral_tune.models.load import read_config
from mistral_tune.train.lints import USUAL_LEARNING_RATE, USUAL_LORA_SCALING, model_fit_warnings

FAST = settings(max_examples=40, deadline=None)


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path):
    return tiny_model_dir, read_config(tiny_model_dir), load_tokenizer(None, tiny_model_dir)


def lints(model, lengths=None, window=None, **keys) -> list[str]:
    model_dir, model_cfg, tokenizer = model
    cfg = config_from_dict({"base_model": str(model_dir), "datasets": [{"path": "d.jsonl"}], **keys})
    return model_fit_warnings(cfg, model_dir, dataclasses.replace(model_cfg, sliding_window=window), tokenizer,
                              lengths)


def log_uniform(low: float, high: float):
    return st.floats(math.log(low), math.log(high)).map(lambda x: min(max(math.exp(x), low), high))


@st.composite
def usual_configs(draw) -> dict:
    """Settings within the usual ranges: adapters at 2e-5..5e-3, full fine-tuning at 1e-6..1e-4,
    alpha from r/2 to 4r, rows no longer than the model's positions, packing or long samples."""
    adapter = draw(st.sampled_from(["lora", "qlora", "none"]))
    low, high = USUAL_LEARNING_RATE["full" if adapter == "none" else "adapter"]
    r = draw(st.sampled_from([4, 8, 16, 32, 64, 128, 256]))
    return dict(adapter=adapter, learning_rate=draw(log_uniform(low, high)), lora_r=r,
                lora_alpha=r * draw(st.sampled_from([0.5, 1, 2, 4])), sequence_len=draw(st.sampled_from([512, 4096])),
                sample_packing=draw(st.booleans()))


@FAST
@given(keys=usual_configs(), seed=st.integers(0, 1000))
def test_usual_configs_get_no_lint(model, keys, seed) -> None:
    mean = keys["sequence_len"] // 2  # long samples: packing on or off is fine
    assert lints(model, [mean - seed % 50, mean + seed % 50], **keys) == []


@FAST
@given(adapter=st.sampled_from(["lora", "qlora", "none"]), factor=log_uniform(1.5, 100), below=st.booleans())
def test_a_learning_rate_far_from_the_usual_range_is_named(model, adapter, factor, below) -> None:
    low, high = USUAL_LEARNING_RATE["full" if adapter == "none" else "adapter"]
    lr = low / factor if below else min(high * factor, 1.0)
    found = lints(model, learning_rate=lr, adapter=adapter)
    assert len(found) == 1 and found[0].startswith(f"learning_rate {lr:g} is far {'below' if below else 'above'}")
    assert ("full fine-tuning (" if adapter == "none" else f"{adapter.upper()} (") in found[0]


def test_the_learning_rate_of_the_other_kind_is_named(model) -> None:
    assert "far above the usual range for full fine-tuning" in lints(model, adapter="none", learning_rate=2e-4)[0]
    assert "far below the usual range for LORA" in lints(model, adapter="lora", learning_rate=1e-5)[0]


@FAST
@given(r=st.sampled_from([1, 4, 16, 64, 256]), factor=log_uniform(1.5, 50), below=st.booleans(),
       rslora=st.booleans())
def test_an_unusual_lora_scale_is_named(model, r, factor, below, rslora) -> None:
    low, high = USUAL_LORA_SCALING
    scale = low / factor if below else high * factor
    alpha = scale * (math.sqrt(r) if rslora else r)
    found = lints(model, lora_r=r, lora_alpha=alpha, use_rslora=rslora)
    assert len(found) == 1 and found[0].startswith(f"lora_alpha {alpha:g} with lora_r {r}"), found
    assert lints(model, lora_r=r, lora_alpha=alpha, use_rslora=rslora, adapter="none", learning_rate=1e-5) == []


@FAST
@given(window=st.integers(64, 4096), extra=st.integers(1, 4096))
def test_rows_longer_than_the_sliding_window_are_named(model, window, extra) -> None:
    seq = min(window + extra, 4096)
    found = lints(model, window=window, sequence_len=seq)
    assert (len(found) == 1 and f"is more than the model's sliding_window {window}" in found[0]) == (seq > window)
    assert lints(model, window=window, sequence_len=window) == []


@FAST
@given(seq=st.sampled_from([256, 1024, 4096]), share=st.floats(0.01, 0.24), packing=st.booleans())
def test_short_samples_without_packing_are_named(model, seq, share, packing) -> None:
    lengths = [max(1, int(seq * share))] * 10
    found = lints(model, lengths, sequence_len=seq, sample_packing=packing)
    if packing:
        assert found == []
    else:
        assert len(found) == 1 and found[0].startswith("sample_packing is off and samples average")
    assert lints(model, [seq // 2] * 10, sequence_len=seq, sample_packing=False) == []


def test_validate_prints_the_lints_and_still_succeeds(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    import json

    from mistral_tune.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {w}."},
                                                     {"role": "assistant", "content": w}]}) + "\n"
                            for w in ("red", "green", "blue")))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"base_model: {tiny_model_dir}\ndatasets: [{{path: {data}}}]\nsequence_len: 1024\n"
                   f"output_dir: {tmp_path / 'out'}\n")
    assert main(["validate", str(cfg)]) == 0
    assert "warning" not in capsys.readouterr().out
    assert main(["validate", str(cfg), "sample_packing=false", "learning_rate=0.05"]) == 0
    out = capsys.readouterr().out
    assert "warning: learning_rate 0.05 is far above the usual range for LORA" in out
    assert "warning: sample_packing is off and samples average" in out
