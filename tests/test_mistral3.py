"""Mistral 3 vision-language checkpoints (Mistral Small 3.x, Magistral Small): the text model is
trained, the vision tower and projector are carried through unchanged, and the output is the
original architecture that transformers loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from mistral_tune.chat import load_tokenizer
from mistral_tune.errors import ModelError
from mistral_tune.models.families import describe
from mistral_tune.models.load import load_model

TEXT = dict(model_type="mistral", vocab_size=32768, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e6)
VISION = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              image_size=32, patch_size=16, head_dim=16)
IDS = torch.randint(3, 32768, (2, 16), generator=torch.Generator().manual_seed(0))


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def vlm_dir(request, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = transformers.Mistral3Config(text_config=TEXT, vision_config=VISION, tie_word_embeddings=request.param)
    model = transformers.Mistral3ForConditionalGeneration(cfg)
    out = tmp_path_factory.mktemp("vlm") / "mistral3"
    model.save_pretrained(out)
    load_tokenizer("v3").save(out)
    return out


def _reference(path: Path):
    return transformers.Mistral3ForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()


def test_text_model_logits_equal_transformers(vlm_dir):
    ours, _ = load_model(str(vlm_dir))
    assert describe(ours.config).startswith("Mistral 3 (text model")
    with torch.no_grad():
        want = _reference(vlm_dir)(input_ids=IDS).logits
        assert torch.allclose(ours.eval()(IDS), want, rtol=1e-5, atol=1e-5)


def test_lora_adapter_loads_in_peft_and_the_merge_keeps_the_architecture(vlm_dir, tmp_path):
    from peft import PeftModel

    from mistral_tune.config import config_from_dict
    from mistral_tune.export.hf import merge_to_dir
    from mistral_tune.models.peft_format import load_adapter
    from mistral_tune.train.loop import train

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"say {w}"},
                                                     {"role": "assistant", "content": w}]}) + "\n"
                            for w in ["apple", "river", "stone", "cloud"]))
    cfg = config_from_dict({"base_model": str(vlm_dir), "datasets": [{"path": str(data)}], "max_steps": 3,
                            "output_dir": str(tmp_path / "run"), "sequence_len": 64, "dataset_cache": False,
                            "lora_r": 4, "learning_rate": 0.05})
    adapter = train(cfg, echo=lambda *_: None).adapter_dir
    trained, _ = load_model(str(vlm_dir))
    load_adapter(trained, adapter)
    with torch.no_grad():
        want = trained.eval()(IDS)
        peft = PeftModel.from_pretrained(_reference(vlm_dir), str(adapter)).eval()
        assert torch.allclose(peft(input_ids=IDS).logits, want, rtol=1e-5, atol=1e-5)
        with peft.disable_adapter():
            assert (peft(input_ids=IDS).logits - want).abs().max() > 1e-4  # the adapter matters

    merged = merge_to_dir(adapter, tmp_path / "merged", echo=lambda *_: None)
    config = json.loads((merged / "config.json").read_text())
    assert config["architectures"] == ["Mistral3ForConditionalGeneration"]
    assert config["vision_config"] == json.loads((vlm_dir / "config.json").read_text())["vision_config"]
    before, after = _tensors(vlm_dir), _tensors(merged)
    assert set(before) == set(after)  # the same names: the layout transformers writes
    for key in before:
        if not key.startswith("language_model."):
            assert torch.equal(before[key], after[key]), key  # the vision tower and projector, untouched
    with torch.no_grad():
        assert torch.allclose(_reference(merged)(input_ids=IDS).logits, want, rtol=1e-4, atol=1e-4)


def test_a_text_config_of_an_unknown_kind_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3",
        "text_config": {**TEXT, "model_type": "llama"}}))
    with pytest.raises(ModelError, match=r"text_config.*'llama'"):
        load_model(str(tmp_path))
