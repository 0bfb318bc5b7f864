"""Presets: a named set of defaults that the config's own keys (and key=value overrides) replace."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mistral_tune.cli import main
from mistral_tune.config import PRESETS, Config, config_from_dict, load_config
from mistral_tune.errors import ConfigError

BASE = {"base_model": "m", "datasets": [{"path": "d.jsonl"}]}
# A value of each preset key other than every preset's (so "the config's own value" is visible).
OWN = dict(adapter="lora", lora_r=8, lora_alpha=32, learning_rate=3e-4, sequence_len=1024, sample_packing=False,
           micro_batch_size=3, gradient_accumulation_steps=5, gradient_checkpointing=True, offload_activations=False,
           distributed="ddp", weight_decay=0.1)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(PRESETS)), data=st.data())
def test_a_preset_fills_only_the_keys_the_config_leaves_out(name, data) -> None:
    keys = PRESETS[name][1]
    own = data.draw(st.sets(st.sampled_from(sorted(keys))))
    mine = {k: OWN[k] for k in own}
    if mine.get("offload_activations") or (keys.get("offload_activations") and "offload_activations" not in own):
        mine.setdefault("gradient_checkpointing", True)  # keep the pair consistent either way
    cfg = config_from_dict({**BASE, "preset": name, **mine})
    for key, value in keys.items():
        assert getattr(cfg, key) == (mine[key] if key in mine else value), key
    assert cfg._from_preset == {k: v for k, v in keys.items() if k not in mine}
    assert cfg.preset_lines()[0].startswith(f"preset {name} set: ")


def test_every_preset_is_a_valid_config_that_differs_from_the_defaults() -> None:
    for name, (_, keys) in PRESETS.items():
        cfg = config_from_dict({**BASE, "preset": name})
        assert any(getattr(cfg, k) != Config.model_fields[k].default for k in keys), name


def test_no_preset_changes_nothing() -> None:
    cfg = config_from_dict(dict(BASE))
    assert cfg.preset is None and cfg._from_preset == {} and cfg.preset_lines() == []


def test_an_unknown_preset_is_an_error_listing_the_presets(tmp_path: Path, capsys) -> None:
    with pytest.raises(ConfigError, match="key 'preset' has value 'lora-4gb'; known presets: " + ", ".join(PRESETS)):
        config_from_dict({**BASE, "preset": "lora-4gb"})
    path = tmp_path / "c.yaml"
    path.write_text("base_model: m\ndatasets: [{path: d.jsonl}]\npreset: qlora-8gb\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"{path}: key 'preset' has value 'qlora-8gb'; known presets: " in err


def test_overrides_on_the_command_line_beat_the_preset(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("base_model: m\ndatasets: [{path: d.jsonl}]\npreset: lora-80gb\nmicro_batch_size: 4\n")
    cfg = load_config(path, ["gradient_checkpointing=true"])
    assert (cfg.gradient_checkpointing, cfg.micro_batch_size, cfg.sequence_len) == (True, 4, 4096)
    assert "(your own: gradient_checkpointing, micro_batch_size)" in cfg.preset_lines()[0]
    assert load_config(path, ["preset=qlora-24gb"]).adapter == "qlora"


def test_validate_says_which_values_came_from_the_preset(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}\n')
    path = tmp_path / "c.yaml"
    path.write_text(f"base_model: {tiny_model_dir}\ndatasets: [{{path: {data}}}]\npreset: lora-24gb\n"
                    f"sequence_len: 256\noutput_dir: {tmp_path / 'o'}\n")
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert ("preset lora-24gb set: adapter=lora, lora_r=16, lora_alpha=16, learning_rate=0.0002, sample_packing=True, "
            "micro_batch_size=2, gradient_accumulation_steps=8, gradient_checkpointing=True, offload_activations=True "
            "(your own: sequence_len)") in out
