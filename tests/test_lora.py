"""Tests for models.lora / peft_format and export.hf: adapters must mean to PEFT/transformers what they mean to us."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from peft import PeftModel
from safetensors.torch import load_file, save_file

from mistral_tune.chat import load_tokenizer
from mistral_tune.errors import ModelError, OutputError
from mistral_tune.export.hf import merge_to_dir
from mistral_tune.models.load import load_model
from mistral_tune.models.lora import LoraLinear, LoraSpec, TrainableTokens, adapters_disabled, apply_lora, merge_lora
from mistral_tune.models.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter, save_adapter
from mistral_tune.quickstart import create_tiny_model

# PEFT calls a transformers API that transformers 5 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

RTOL = 1e-5
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def ids(batch: int = 2, seq: int = 16, seed: int = 1, vocab: int = 1000) -> torch.Tensor:
    x = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    x[:, 3:8] = torch.tensor([3, 17, 999, 5, 6]) % vocab  # the rows SPECS train as tokens
    return x


def randomize_b(model: torch.nn.Module, seed: int = 5, std: float = 0.1) -> None:
    """PEFT and we both start every adapter part at the base model (lora_B zero, DoRA magnitudes at
    the base norms, trained rows and modules as the base's); move each off it so it matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLinear):
                m.lora_B.weight.normal_(0.0, std, generator=gen)
                if m.lora_magnitude_vector is not None:
                    m.lora_magnitude_vector.mul_(torch.rand(m.out_features, generator=gen) + 0.5)
            elif isinstance(m, TrainableTokens):
                m.trainable_tokens_delta.normal_(0.0, 1.0, generator=gen)
        for p in model.parameters():  # modules trained whole: every other trainable weight
            if p.requires_grad and p.ndim == 2 and p.shape[0] == model.config.vocab_size:
                p.add_(torch.randn(p.shape, generator=gen) * std)


def adapted(make_tiny_mistral, spec: LoraSpec, **overrides):
    """(model with a non-trivial adapter, its base state dict)."""
    model = make_tiny_mistral(**overrides)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, spec, seed=3)
    randomize_b(model)
    return model.eval(), base_state


SPECS = {
    "default": LoraSpec(r=4, alpha=8),
    "rslora": LoraSpec(r=4, alpha=8, use_rslora=True),
    "dropout": LoraSpec(r=4, alpha=16, dropout=0.1),
    "attn_only_r8": LoraSpec(r=8, alpha=4, target_modules=["q_proj", "v_proj"]),
    "dora": LoraSpec(r=4, alpha=8, use_dora=True),
    "dora_rslora_attn": LoraSpec(r=8, alpha=4, use_dora=True, use_rslora=True, target_modules=["q_proj", "o_proj"]),
    "modules_to_save": LoraSpec(r=4, alpha=8, modules_to_save=["embed_tokens", "lm_head"]),
    "trainable_tokens": LoraSpec(r=4, alpha=8,
                                 trainable_tokens={"embed_tokens": [3, 17, 999], "lm_head": [3, 17, 999]}),
    "dora_lm_head_tokens": LoraSpec(r=4, alpha=8, use_dora=True, modules_to_save=["lm_head"],
                                    trainable_tokens={"embed_tokens": [5, 6]}),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_peft_loads_our_adapter(name, tmp_path: Path, make_tiny_mistral, make_hf_mistral):
    spec = SPECS[name]
    model, base_state = adapted(make_tiny_mistral, spec, sliding_window=5, num_key_value_heads=1)
    save_adapter(model, spec, tmp_path, base_model="tiny")
    base = make_hf_mistral(model.config, base_state)
    ref = PeftModel.from_pretrained(base, str(tmp_path)).eval()
    x = ids()
    with torch.no_grad():
        ours = model(x)
        theirs = ref(input_ids=x, use_cache=False).logits.float()
        with ref.disable_adapter():
            base_logits = ref(input_ids=x, use_cache=False).logits.float()
    # The adapter matters (so equality below is not the base model twice) ...
    assert (ours - base_logits).abs().max() > 1e-3
    # ... and PEFT applies it exactly as we do.
    assert rel_diff(ours, theirs) <= RTOL, f"{name}: rel diff {rel_diff(ours, theirs):.2e}"
    scaling = {m.scaling for m in model.modules() if isinstance(m, LoraLinear)}
    assert scaling == {spec.scaling}
    peft_scaling = [m.scaling["default"] for m in ref.modules() if isinstance(getattr(m, "scaling", None), dict)]
    assert len(peft_scaling) == sum(isinstance(m, LoraLinear) for m in model.modules())
    assert peft_scaling == pytest.approx([spec.scaling] * len(peft_scaling))


def _peft_name(name: str) -> str:
    """A PEFT model's parameter name -> ours."""
    name = name.removeprefix("base_model.model.").replace(".default", "")
    name = name.replace("modules_to_save.", "").replace("token_adapter.", "")
    return name.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")


@pytest.mark.parametrize("name", ["default", "dora", "modules_to_save", "trainable_tokens", "dora_lm_head_tokens"])
def test_gradients_equal_peft(name, tmp_path: Path, make_tiny_mistral, make_hf_mistral):
    """Training sees what PEFT trains: the same loss gives every trained tensor PEFT's gradient
    (DoRA's row norm is a constant in backward, as in PEFT; trained token rows get only their rows')."""
    spec = SPECS[name]
    model, base_state = adapted(make_tiny_mistral, spec)
    save_adapter(model, spec, tmp_path, base_model="tiny")
    ref = PeftModel.from_pretrained(make_hf_mistral(model.config, base_state), str(tmp_path), is_trainable=True)
    x, targets = ids(), ids(seed=2)
    loss = torch.nn.functional.cross_entropy(model.train()(x).flatten(0, 1), targets.flatten())
    ref_logits = ref.train()(input_ids=x, use_cache=False).logits.float()
    ref_loss = torch.nn.functional.cross_entropy(ref_logits.flatten(0, 1), targets.flatten())
    loss.backward()
    ref_loss.backward()
    ours = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    theirs = {_peft_name(n): p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys()
    for n in ours:
        assert theirs[n].abs().max() > 0, n
        assert rel_diff(ours[n], theirs[n]) <= 1e-4, f"{n}: {rel_diff(ours[n], theirs[n]):.2e}"


def test_loraplus_learning_rates_equal_peft(tmp_path: Path, make_tiny_mistral, make_hf_mistral):
    """LoRA+ gives each trained tensor the learning rate PEFT's create_loraplus_optimizer gives it
    (lora_B and vectors such as DoRA's magnitudes: lr x ratio; the rest lr)."""
    from peft.optimizers import create_loraplus_optimizer

    from mistral_tune.config import config_from_dict
    from mistral_tune.train.optim import make_optimizer

    spec = SPECS["dora_lm_head_tokens"]
    model, base_state = adapted(make_tiny_mistral, spec)
    save_adapter(model, spec, tmp_path, base_model="tiny")
    cfg = config_from_dict({"base_model": "tiny", "datasets": [{"path": "d.jsonl"}], "learning_rate": 1e-4,
                            "loraplus_lr_ratio": 16})
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    names = {id(p): n for n, p in named.items()}
    ours = {names[id(p)]: cfg.learning_rate * g["lr_scale"]
            for g in make_optimizer(named, cfg, torch.device("cpu")).param_groups for p in g["params"]}
    ref = PeftModel.from_pretrained(make_hf_mistral(model.config, base_state), str(tmp_path), is_trainable=True)
    ref_names = {id(p): _peft_name(n) for n, p in ref.named_parameters()}
    theirs = {ref_names[id(p)]: g["lr"] for g in create_loraplus_optimizer(
        ref, torch.optim.AdamW, lr=1e-4, loraplus_lr_ratio=16).param_groups for p in g["params"]}
    assert ours == pytest.approx(theirs)
    assert [v for k, v in ours.items() if ".lora_B." in k] == pytest.approx([1.6e-3] * 2 * 7)


@pytest.mark.parametrize("name", ["default", "dora", "modules_to_save", "trainable_tokens", "dora_lm_head_tokens"])
def test_adapters_disabled_matches_peft_disable_adapter(name, tmp_path: Path, make_tiny_mistral, make_hf_mistral):
    """The base side of every evaluation. Modules trained whole and trainable tokens used to stay on."""
    spec = SPECS[name]
    model, base_state = adapted(make_tiny_mistral, spec)
    save_adapter(model, spec, tmp_path, base_model="tiny")
    ref = PeftModel.from_pretrained(make_hf_mistral(model.config, base_state), str(tmp_path)).eval()
    x = ids()
    with torch.no_grad():
        tuned = model(x)
        with adapters_disabled(model):
            ours_off = model(x)
            with adapters_disabled(model):  # nested: the outer block still holds when the inner ends
                inner_off = model(x)
            still_off = model(x)
        back_on = model(x)
        with ref.disable_adapter():
            theirs_off = ref(input_ids=x, use_cache=False).logits.float()
        base = make_tiny_mistral()
        base.load_state_dict(base_state)
        plain = base.eval()(x)
    assert (tuned - ours_off).abs().max() > 1e-3  # the adapter matters
    assert rel_diff(ours_off, theirs_off) <= RTOL
    assert torch.equal(ours_off, plain)  # exactly the base model
    assert torch.equal(still_off, ours_off) and torch.equal(inner_off, ours_off)
    assert torch.equal(back_on, tuned)


def test_adapter_files_are_peft_format(tmp_path: Path, make_tiny_mistral):
    spec = SPECS["default"]
    model, _ = adapted(make_tiny_mistral, spec)
    save_adapter(model, spec, tmp_path, base_model="some/base", dtype=torch.bfloat16)
    cfg = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["base_model_name_or_path"] == "some/base"
    tensors = load_file(str(tmp_path / ADAPTER_WEIGHTS))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert tensors[key].shape == (4, 64) and tensors[key].dtype == torch.bfloat16
    assert len(tensors) == 2 * 7 * model.config.num_hidden_layers


def test_only_lora_parameters_train(make_tiny_mistral):
    model = make_tiny_mistral()
    wrapped = apply_lora(model, LoraSpec(r=4, alpha=8))
    assert len(wrapped) == 7 * model.config.num_hidden_layers
    assert {w.rsplit(".", 1)[1] for w in wrapped} == set(ALL_TARGETS)
    assert "model.layers.0.self_attn.q_proj" in wrapped and "lm_head" not in wrapped
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(wrapped)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "model.embed_tokens.weight" in frozen and "model.layers.0.self_attn.q_proj.weight" in frozen
    # Base parameter names are unchanged (HF names), so the base state dict still fits.
    base_keys = {k for k in model.state_dict() if ".lora_" not in k}
    assert base_keys == set(make_tiny_mistral().state_dict())
    # A backward pass gives gradients to lora_A/B only (B is zero at init, so A's grad is zero; B's is not).
    model.train()
    model(ids()).sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_B." in n)


def test_apply_lora_no_match_raises(make_tiny_mistral):
    with pytest.raises(ModelError, match=r"\['wq'\]: Mistral has no such projection \(its projections: q_proj"):
        apply_lora(make_tiny_mistral(), LoraSpec(target_modules=["wq"]))
    # one unmatched name among matched ones is refused too, not silently skipped
    with pytest.raises(ModelError, match=r"\['wq'\]"):
        apply_lora(make_tiny_mistral(), LoraSpec(target_modules=["q_proj", "wq"]))


def test_fresh_adapter_is_identity(make_tiny_mistral):
    model = make_tiny_mistral()
    x = ids()
    with torch.no_grad():
        before = model(x)
        apply_lora(model, LoraSpec(r=4, alpha=8), seed=0)
        after = model(x)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["default", "rslora", "attn_only_r8"])
def test_load_adapter_round_trip(name, tmp_path: Path, make_tiny_mistral):
    spec = SPECS[name]
    model, base_state = adapted(make_tiny_mistral, spec)
    save_adapter(model, spec, tmp_path, base_model="tiny")
    fresh = make_tiny_mistral()
    fresh.load_state_dict(base_state)
    loaded_spec = load_adapter(fresh, tmp_path)
    assert sorted(loaded_spec.target_modules) == sorted(spec.target_modules)
    assert (loaded_spec.r, loaded_spec.alpha, loaded_spec.use_rslora) == (spec.r, spec.alpha, spec.use_rslora)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["default", "rslora", "dropout", "dora", "trainable_tokens", "modules_to_save"])
def test_merge_lora_equals_unmerged(name, make_tiny_mistral, make_hf_mistral):
    spec = SPECS[name]
    model, _ = adapted(make_tiny_mistral, spec)
    x = ids()
    with torch.no_grad():
        unmerged = model(x)
        layers = 7 * model.config.num_hidden_layers + len(spec.trainable_tokens)
        assert merge_lora(model) == layers
        merged = model(x)
    assert not any(isinstance(m, (LoraLinear, TrainableTokens)) for m in model.modules())
    assert not any(".lora_" in k for k in model.state_dict())
    assert rel_diff(merged, unmerged) <= RTOL
    # The merged weights are plain HF weights: transformers agrees.
    ref = make_hf_mistral(model.config, model.state_dict())
    with torch.no_grad():
        assert rel_diff(merged, ref(input_ids=x, use_cache=False).logits) <= RTOL


@pytest.mark.parametrize("name", ["default", "dora", "dora_rslora_attn", "modules_to_save", "trainable_tokens",
                                  "dora_lm_head_tokens"])
def test_merge_equals_peft_merge_and_unload(name, tmp_path: Path, make_tiny_mistral, make_hf_mistral):
    spec = SPECS[name]
    model, base_state = adapted(make_tiny_mistral, spec)
    save_adapter(model, spec, tmp_path, base_model="tiny")
    ref = PeftModel.from_pretrained(make_hf_mistral(model.config, base_state), str(tmp_path))
    theirs = ref.merge_and_unload().state_dict()
    merge_lora(model)
    ours = model.state_dict()
    assert ours.keys() == theirs.keys()
    changed = [k for k in ours if not torch.equal(ours[k], base_state[k])]
    assert len(changed) == len(spec.target_modules) * model.config.num_hidden_layers + len(
        set(spec.modules_to_save) | set(spec.trainable_tokens))
    worst = max(rel_diff(ours[k], theirs[k]) for k in ours)
    assert worst <= 1e-6, f"{name}: merged weights differ from PEFT's by {worst:.2e}"


def test_merge_to_dir_loads_in_transformers(tmp_path: Path):
    base_dir = create_tiny_model(
        tmp_path / "base", "v3", num_hidden_layers=1, hidden_size=64, intermediate_size=128
    )
    model, _ = load_model(str(base_dir))
    spec = LoraSpec(r=4, alpha=8)
    apply_lora(model, spec, seed=1)
    randomize_b(model)
    adapter_dir = tmp_path / "run" / "adapter"
    save_adapter(model, spec, adapter_dir, base_model=str(base_dir))
    vocab = model.config.vocab_size
    x = ids(vocab=vocab)
    with torch.no_grad():
        ours = model.eval()(x)
        base_logits = load_model(str(base_dir))[0](x)
    assert (ours - base_logits).abs().max() > 1e-3

    out = merge_to_dir(tmp_path / "run", tmp_path / "merged")  # a run directory works as well as adapter/
    assert out == tmp_path / "merged"
    assert not list(tmp_path.glob(".merged.tmp-*"))
    tok = load_tokenizer(None, out)
    assert tok.vocab_size == vocab and (out / tok.save_name()).is_file()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = ref(input_ids=x, use_cache=False).logits.float()
    assert rel_diff(ours, theirs) <= RTOL, f"rel diff {rel_diff(ours, theirs):.2e}"
    # Merging again over the earlier merged model replaces it, when asked to.
    with pytest.raises(OutputError, match="holds an earlier merged model; pass --overwrite"):
        merge_to_dir(adapter_dir, out)
    assert merge_to_dir(adapter_dir, out, overwrite=True) == out


def _saved_adapter(tmp_path: Path, make_tiny_mistral, **overrides) -> Path:
    spec = LoraSpec(r=4, alpha=8)
    model, _ = adapted(make_tiny_mistral, spec, **overrides)
    save_adapter(model, spec, tmp_path / "adapter", base_model="tiny")
    return tmp_path / "adapter"


def test_bad_adapter_dirs_raise_model_error(tmp_path: Path, make_tiny_mistral):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match=ADAPTER_CONFIG):
        load_adapter(make_tiny_mistral(), empty)
    with pytest.raises(ModelError):
        merge_to_dir(empty, tmp_path / "out")

    adapter = _saved_adapter(tmp_path, make_tiny_mistral)
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())

    (adapter / ADAPTER_CONFIG).write_text("{broken")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_adapter(make_tiny_mistral(), adapter)

    (adapter / ADAPTER_CONFIG).write_text(json.dumps({**config, "peft_type": "PREFIX_TUNING"}))
    with pytest.raises(ModelError, match="not LORA"):
        load_adapter(make_tiny_mistral(), adapter)

    # Config names modules the tensors do not cover.
    (adapter / ADAPTER_CONFIG).write_text(json.dumps({**config, "target_modules": ["q_proj", "lm_head"]}))
    with pytest.raises(ModelError, match="does not fit"):
        load_adapter(make_tiny_mistral(), adapter)
    (adapter / ADAPTER_CONFIG).write_text(json.dumps(config))

    # Tensors missing from the weights file.
    tensors = load_file(str(adapter / ADAPTER_WEIGHTS))
    save_file({k: v for k, v in tensors.items() if "layers.1." not in k}, str(adapter / ADAPTER_WEIGHTS))
    with pytest.raises(ModelError, match="does not fit"):
        load_adapter(make_tiny_mistral(), adapter)

    (adapter / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(ModelError, match=ADAPTER_WEIGHTS):
        load_adapter(make_tiny_mistral(), adapter)


def test_adapter_for_another_model_raises_model_error(tmp_path: Path, make_tiny_mistral):
    """An adapter trained on a model of another size must not load (shape mismatch)."""
    adapter = _saved_adapter(tmp_path, make_tiny_mistral, hidden_size=96, num_attention_heads=4)
    with pytest.raises(ModelError, match="shape"):
        load_adapter(make_tiny_mistral(), adapter)

    # Same with a rank that disagrees with the config's r.
    adapter = _saved_adapter(tmp_path / "r", make_tiny_mistral)
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    (adapter / ADAPTER_CONFIG).write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(ModelError, match="shape"):
        load_adapter(make_tiny_mistral(), adapter)
