"""The one loader of a tuned model (models/tuned.py): every consumer of a QLoRA run gets the model
that was trained, and a full fine-tune's model folder is a complete HF model folder."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mistral_tune.chat import load_tokenizer
from mistral_tune.cli import _load, build_parser, main
from mistral_tune.config import config_from_dict
from mistral_tune.errors import ModelError
from mistral_tune.models.load import load_model
from mistral_tune.models.lora import merge_lora
from mistral_tune.models.peft_format import load_adapter
from mistral_tune.models.tuned import load_tuned, resolve_source
from mistral_tune.train.loop import train

transformers = pytest.importorskip("transformers")
IDS = torch.randint(3, 32768, (2, 24), generator=torch.Generator().manual_seed(3))
TIGHT = dict(rtol=1e-5, atol=1e-5)


def _data(tmp_path: Path) -> Path:
    path = tmp_path / "d.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
            for w in ["apple", "river", "stone", "cloud", "tiger", "maple", "candle", "violin"]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS)


@pytest.fixture(scope="module")
def qlora_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A QLoRA run's output directory: adapter/ only (no merged/), as `train` leaves it."""
    pytest.importorskip("bitsandbytes")
    root = tmp_path_factory.mktemp("qlora")
    cfg = config_from_dict({
        "base_model": str(tiny_model_dir), "datasets": [{"path": str(_data(root))}],
        "output_dir": str(root / "run"), "adapter": "qlora", "lora_r": 4, "learning_rate": 0.02,
        "max_steps": 4, "sequence_len": 64, "micro_batch_size": 2, "dataset_cache": False,
    })
    result = train(cfg, echo=lambda *_: None)
    assert not (result.output_dir / "merged").exists()
    return result.output_dir


@pytest.fixture(scope="module")
def qlora_merged(qlora_run: Path) -> Path:
    """What `mistral-tune merge` writes for the QLoRA run (float32, so it compares tightly)."""
    out = qlora_run.parent / "merged"
    assert main(["merge", str(qlora_run), "--out", str(out), "--dtype", "fp32"]) == 0
    return out


def test_every_consumer_of_a_qlora_run_gets_the_trained_model(qlora_run: Path, qlora_merged: Path,
                                                              tiny_model_dir: Path, tmp_path: Path) -> None:
    from mistral_tune.models.quant import quantize_model

    adapter = qlora_run / "adapter"
    # The model that was trained: NF4 projections (bitsandbytes) under the adapter, not merged.
    trained, _ = load_model(str(tiny_model_dir))
    quantize_model(trained, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    load_adapter(trained, adapter)
    want = _logits(trained)
    # The full-precision base with the adapter is another model: a loader that skips the NF4 round
    # trip fails every comparison below.
    plain, _ = load_model(str(tiny_model_dir))
    load_adapter(plain, adapter)
    assert (_logits(plain) - want).abs().max() > 100 * TIGHT["atol"]

    for source, merge in ((qlora_run, True), (qlora_run, False), (adapter, True)):
        tuned = load_tuned(source, merge=merge)
        assert tuned.qlora and tuned.adapter_dir == adapter and tuned.model_dir == tiny_model_dir
        torch.testing.assert_close(_logits(tuned.model), want, **TIGHT)

    # merge: the folder it writes, read by us and by transformers.
    torch.testing.assert_close(_logits(load_model(str(qlora_merged))[0]), want, **TIGHT)
    hf = transformers.AutoModelForCausalLM.from_pretrained(qlora_merged, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(IDS).logits, want, rtol=1e-4, atol=1e-4)

    # chat, generate and serve: the model each command loads.
    for argv in (["chat"], ["generate", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o.jsonl")], ["serve"]):
        args = build_parser().parse_args([argv[0], str(qlora_run), *argv[1:]])
        torch.testing.assert_close(_logits(_load(args).model), want, **TIGHT)


def test_export_gguf_of_a_qlora_run_converts_the_trained_model(qlora_run: Path, qlora_merged: Path,
                                                               tiny_model_dir: Path, tmp_path: Path) -> None:
    """The f16 file holds the merged model's tensors rounded to f16, exactly (q/k rows in GGML's order)."""
    gguf = pytest.importorskip("gguf")
    from mistral_tune.export.gguf import _permute, _tensor_name

    plain, _ = load_model(str(tiny_model_dir))  # the full-precision base with the adapter
    load_adapter(plain, qlora_run / "adapter")
    merge_lora(plain)

    def as_gguf(state: dict, cfg) -> dict[str, np.ndarray]:
        out = {}
        for key, t in state.items():
            if key.endswith("q_proj.weight"):
                t = _permute(t, cfg.num_attention_heads)
            elif key.endswith("k_proj.weight"):
                t = _permute(t, cfg.num_key_value_heads)
            out[_tensor_name(key)] = t.float().numpy().astype(np.float16 if t.ndim == 2 else np.float32)
        return out

    trained_model = load_model(str(qlora_merged))[0]
    want = as_gguf(trained_model.state_dict(), trained_model.config)
    other = as_gguf(plain.state_dict(), plain.config)
    out = tmp_path / "m.gguf"
    assert main(["export", "gguf", str(qlora_run), "--out", str(out), "--quant", "f16"]) == 0
    got = {t.name: np.asarray(t.data).reshape(want[t.name].shape) for t in gguf.GGUFReader(str(out)).tensors}
    assert got.keys() == want.keys()
    for name in got:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert not np.array_equal(got["blk.0.attn_q.weight"], other["blk.0.attn_q.weight"])


LAYOUT = ("config.json", "merged/config.json", "model/config.json", "adapter_config.json",
          "adapter/adapter_config.json")


@pytest.mark.parametrize("present", list(itertools.product([False, True], repeat=len(LAYOUT))))
def test_resolve_source_prefers_a_model_then_merged_then_model_then_an_adapter(present, tmp_path: Path) -> None:
    for name, there in zip(LAYOUT, present, strict=True):
        if there:
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text("{}")
    first = next((name for name, there in zip(LAYOUT, present, strict=True) if there), None)
    if first is None:
        with pytest.raises(ModelError, match="no config.json, merged/, model/ or adapter/"):
            resolve_source(tmp_path)
        return
    found = tmp_path / first.rpartition("/")[0] if "/" in first else tmp_path
    adapter = found if first.endswith("adapter_config.json") else None
    assert resolve_source(tmp_path) == (found, adapter)


@pytest.fixture(scope="module")
def full_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("full")
    cfg = config_from_dict({
        "base_model": str(tiny_model_dir), "datasets": [{"path": str(_data(root))}],
        "output_dir": str(root / "run"), "adapter": "none", "learning_rate": 1e-3,
        "max_steps": 2, "sequence_len": 64, "micro_batch_size": 2, "dataset_cache": False,
    })
    result = train(cfg, echo=lambda *_: None)
    assert result.model_dir == result.output_dir / "model"
    return result.model_dir


def test_full_fine_tune_folder_loads_in_transformers(full_run: Path) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(full_run, dtype=torch.float32)
    ours = load_tuned(full_run.parent)  # the run directory resolves to its model/
    assert ours.model_dir == full_run and ours.adapter_dir is None and not ours.qlora
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(IDS).logits, _logits(ours.model), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def full_run_tokenizers(full_run: Path):
    return transformers.AutoTokenizer.from_pretrained(full_run), load_tokenizer(None, full_run)


@settings(max_examples=40, deadline=None)
# No "<" or "[": HF tokenizers read control-token strings ("</s>", "[INST]") in text as control
# tokens, mistral-common as text.
@given(text=st.text(st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="<["), max_size=60))
def test_full_fine_tune_folder_tokenizes_like_mistral_common(full_run_tokenizers, text: str) -> None:
    hf, ours = full_run_tokenizers
    assert hf(text).input_ids == ours.encode_text(text, eos=False)


def test_a_qlora_base_quantized_from_bf16_is_rebuilt_from_bf16(tiny_model_dir: Path, tmp_path: Path) -> None:
    """On a GPU, training quantizes the base from bf16; the loader must quantize the same values, not
    the float32 checkpoint's (whose NF4 codes and block scales differ)."""
    pytest.importorskip("bitsandbytes")
    from torch import nn

    from mistral_tune.models.lora import LoraSpec, apply_lora
    from mistral_tune.models.peft_format import save_adapter
    from mistral_tune.models.quant import NF4Linear

    trained, _ = load_model(str(tiny_model_dir))
    for module in list(trained.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and name.endswith("_proj"):
                setattr(module, name, NF4Linear.from_linear(child.to(torch.bfloat16)))  # as the GPU path does
    spec = LoraSpec(r=4, alpha=8)
    apply_lora(trained, spec, seed=0)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    save_adapter(trained, spec, tmp_path / "adapter", base_model=str(tiny_model_dir))
    load_tokenizer(None, tiny_model_dir).save(tmp_path / "adapter")
    info = json.loads((tmp_path / "adapter" / "base_quantization.json").read_text())
    assert info["quantized_from"] == "bfloat16"

    want = _logits(trained)
    got = _logits(load_tuned(tmp_path / "adapter").model)
    assert torch.allclose(got, want, **TIGHT)
    info.pop("quantized_from")  # an adapter that does not say: read as quantized from float32
    (tmp_path / "adapter" / "base_quantization.json").write_text(json.dumps(info))
    assert not torch.allclose(_logits(load_tuned(tmp_path / "adapter").model), want, **TIGHT)
