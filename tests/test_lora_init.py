"""PiSSA and OLoRA initialisation against PEFT: the same starting factors and residual base weights,
the model unchanged at step 0, and a trained adapter saved as PEFT converts it (a rank-2r LoRA for
the original base) that PEFT loads and merges with the trained model's logits. Training, resume and
the run's adapter in PEFT: test_adapter_variants.py."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mistral_tune.config import config_from_dict
from mistral_tune.errors import ConfigError, ModelError
from mistral_tune.models.lora import LoraLinear, LoraSpec, adapters_disabled, apply_lora, merge_lora
from mistral_tune.models.peft_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    load_adapter,
    lora_init_state,
    restore_lora_init,
    save_adapter,
    save_lora_init,
)

peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
              pytest.mark.filterwarnings("ignore:(PiSSA|OLoRA) changes the base weights:UserWarning")]

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {
    "pissa": LoraSpec(r=4, alpha=8, init="pissa"),
    "pissa_rslora_attn": LoraSpec(r=8, alpha=4, init="pissa", use_rslora=True, target_modules=["q_proj", "o_proj"]),
    "pissa_niter_2": LoraSpec(r=4, alpha=8, init="pissa_niter_2"),  # randomized: the same draws as PEFT's
    "olora": LoraSpec(r=4, alpha=8, init="olora"),
    "olora_rslora": LoraSpec(r=6, alpha=16, init="olora", use_rslora=True),
}


def ids(seed=1):
    return torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def ours_and_peft(make_tiny_mistral, make_hf_mistral, spec: LoraSpec, **overrides):
    """(our model with spec's init, its base state before the init, PEFT's model with the same init)."""
    model = make_tiny_mistral(**overrides)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)  # pissa_niter_N draws from the global generator, as PEFT's does
    apply_lora(model, spec, seed=3)
    config = peft.LoraConfig(r=spec.r, lora_alpha=spec.alpha, target_modules=spec.target_modules,
                             use_rslora=spec.use_rslora, use_dora=spec.use_dora, init_lora_weights=spec.init)
    hf = make_hf_mistral(model.config, base_state)
    torch.manual_seed(0)
    ref = peft.get_peft_model(hf, config)
    return model, base_state, ref.eval()


def _layers(model) -> dict[str, LoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


@pytest.mark.parametrize("name", list(CASES))
def test_init_equals_peft_and_keeps_the_base_models_logits(name, make_tiny_mistral, make_hf_mistral):
    spec = CASES[name]
    model, base_state, ref = ours_and_peft(make_tiny_mistral, make_hf_mistral, spec)
    theirs = dict(ref.named_parameters())
    layers = _layers(model)
    assert len(layers) == 2 * len(spec.target_modules)
    for name_, layer in layers.items():
        peft_name = f"base_model.model.{name_}"
        a, b = theirs[f"{peft_name}.lora_A.default.weight"], theirs[f"{peft_name}.lora_B.default.weight"]
        assert rel(layer.lora_A.weight, a) <= 1e-5 and rel(layer.lora_B.weight, b) <= 1e-5, name_
        assert rel(layer.weight, theirs[f"{peft_name}.base_layer.weight"]) <= 1e-5, name_  # the residual
        # The factors are not zero, and the residual is the original weight without them.
        assert layer.lora_B.weight.abs().min() > 0 or spec.init == "olora"
        original = base_state[f"{name_}.weight"]
        assert (layer.weight - original).abs().max() > 1e-3 * original.abs().max()
        assert rel(layer.weight + layer.delta_weight(), original) <= 1e-5
    x = ids()
    with torch.no_grad():
        base = make_hf_mistral(model.config, base_state)(input_ids=x, use_cache=False).logits
        ours, peft_logits = model(x), ref(input_ids=x, use_cache=False).logits
    assert rel(ours, base) <= 1e-5  # training starts at the base model
    assert rel(ours, peft_logits) <= 1e-5


def _train_a_little(model) -> None:
    """A, B moved as a few optimizer steps would move them."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05 * p.abs().max())


@pytest.mark.parametrize("name", list(CASES))
def test_saved_adapter_is_peft_conversion_for_the_original_base(name, tmp_path, make_tiny_mistral, make_hf_mistral):
    spec = CASES[name]
    model, base_state, ref = ours_and_peft(make_tiny_mistral, make_hf_mistral, spec)
    ref.save_pretrained(tmp_path / "peft_init")  # PEFT's conversion reads the starting factors from here
    _train_a_little(model)
    trained = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    with torch.no_grad():
        for key, p in ref.named_parameters():
            if ".lora_" in key:
                p.copy_(trained[key.removeprefix("base_model.model.").replace(".default", "")])
    ref.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "peft_init"))
    save_adapter(model, spec, tmp_path / "ours", base_model="tiny")

    ours_cfg = json.loads((tmp_path / "ours" / ADAPTER_CONFIG).read_text())
    peft_cfg = json.loads((tmp_path / "peft" / ADAPTER_CONFIG).read_text())
    for key in ("r", "lora_alpha", "init_lora_weights", "use_rslora"):
        assert ours_cfg[key] == pytest.approx(peft_cfg[key]), key
    assert ours_cfg["r"] == 2 * spec.r
    ours_t, peft_t = (load_file(str(tmp_path / d / ADAPTER_WEIGHTS)) for d in ("ours", "peft"))
    assert ours_t.keys() == peft_t.keys()
    for key in ours_t:
        assert rel(ours_t[key], peft_t[key]) <= 1e-5, key

    # PEFT puts our file on the ORIGINAL base and gets the trained model; its merge is the same model.
    x = ids()
    loaded = peft.PeftModel.from_pretrained(make_hf_mistral(model.config, base_state), tmp_path / "ours").eval()
    with torch.no_grad():
        tuned = model.eval()(x)
        theirs = loaded(input_ids=x, use_cache=False).logits
        base = make_hf_mistral(model.config, base_state)(input_ids=x, use_cache=False).logits
    assert (tuned - base).abs().max() > 1e-3  # the training moved the model
    assert rel(theirs, tuned) <= 1e-5
    with adapters_disabled(model):  # the base, for evaluations (residual + B0 A0): not the residual alone
        assert rel(model(x), base) <= 1e-5
    ours_merged = make_tiny_mistral()
    ours_merged.load_state_dict(base_state)
    load_adapter(ours_merged, tmp_path / "ours")
    merge_lora(ours_merged)
    peft_merged = loaded.merge_and_unload().state_dict()
    for key, weight in ours_merged.state_dict().items():
        assert rel(weight, peft_merged[key]) <= 1e-5, key
    with torch.no_grad():
        assert rel(ours_merged(x), tuned) <= 1e-5


def test_dora_after_pissa_starts_at_the_base_and_loads_in_peft(tmp_path, make_tiny_mistral, make_hf_mistral):
    """PEFT allows DoRA after PiSSA (the magnitudes: the original rows' norms); our converted adapter keeps
    the magnitudes (PEFT's own conversion leaves them out of its file), so PEFT loads the trained model."""
    spec = LoraSpec(r=4, alpha=8, init="pissa", use_dora=True)
    model, base_state, ref = ours_and_peft(make_tiny_mistral, make_hf_mistral, spec)
    x = ids()
    with torch.no_grad():
        base = make_hf_mistral(model.config, base_state)(input_ids=x, use_cache=False).logits
        assert rel(model(x), base) <= 1e-5
        assert rel(ref(input_ids=x, use_cache=False).logits, base) <= 1e-5
    for name_, layer in _layers(model).items():
        peft_magnitude = dict(ref.named_parameters())[f"base_model.model.{name_}.lora_magnitude_vector.default.weight"]
        assert rel(layer.lora_magnitude_vector, peft_magnitude) <= 1e-5
    _train_a_little(model)
    save_adapter(model, spec, tmp_path, base_model="tiny")
    loaded = peft.PeftModel.from_pretrained(make_hf_mistral(model.config, base_state), tmp_path).eval()
    with torch.no_grad():
        tuned = model.eval()(x)
        assert (tuned - base).abs().max() > 1e-3
        assert rel(loaded(input_ids=x, use_cache=False).logits, tuned) <= 1e-5


def test_resume_puts_the_checkpoints_starting_factors_back(tmp_path, make_tiny_mistral):
    """A checkpoint's A0, B0 replace the ones this process computed, and the residual follows them: the
    original weight W_res + s B0 A0 stays, and the residual is the checkpoint run's."""
    saved = make_tiny_mistral()
    apply_lora(saved, CASES["pissa"])
    save_lora_init(saved, tmp_path)
    other = make_tiny_mistral()
    original = {k: v.clone() for k, v in other.state_dict().items()}
    apply_lora(other, LoraSpec(r=4, alpha=8, init="olora"))  # other starting factors
    restore_lora_init(other, tmp_path)
    for key, start in lora_init_state(saved).items():
        assert torch.equal(lora_init_state(other)[key], start), key
    theirs, ours = saved.state_dict(), other.state_dict()
    for name_, layer in _layers(other).items():
        assert rel(ours[f"{name_}.weight"], theirs[f"{name_}.weight"]) <= 1e-5, name_
        assert rel(layer.weight + layer.scaling * layer.lora_init_B @ layer.lora_init_A,
                   original[f"{name_}.weight"]) <= 1e-5
    lonely = make_tiny_mistral()
    apply_lora(lonely, LoraSpec(r=4, alpha=8, init="pissa", target_modules=["q_proj"]))
    with pytest.raises(ModelError, match="lora_init.safetensors: does not hold the starting factors"):
        restore_lora_init(lonely, tmp_path)


def test_a_rank_above_the_weights_is_refused(make_tiny_mistral):
    with pytest.raises(ModelError, match="lora_init olora: lora_r 40 is above the rank of a 32 x 64 weight"):
        apply_lora(make_tiny_mistral(), LoraSpec(r=40, init="olora", target_modules=["k_proj"]))


@pytest.mark.parametrize("settings", [dict(adapter="qlora"), dict(adapter="none"), dict(base_precision="fp8")])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_lora_init_refused_where_the_base_cannot_take_it(settings, init, tmp_path):
    cfg = dict(base_model="m", datasets=[{"path": "d.jsonl"}], output_dir=str(tmp_path), lora_init=init)
    with pytest.raises(ConfigError, match=f"lora_init: {init} needs adapter: lora with base_precision: bf16"):
        config_from_dict({**cfg, **settings})
    config_from_dict(cfg)  # allowed as such


@pytest.mark.parametrize("value", ["pisa", "pissa_niter_0", "pissa_niter_", "gaussian", "PISSA", "olora "])
def test_unknown_lora_init_is_refused_by_key(value, tmp_path):
    with pytest.raises(ConfigError, match="lora_init"):
        config_from_dict(dict(base_model="m", datasets=[{"path": "d.jsonl"}], output_dir=str(tmp_path),
                              lora_init=value))
