"""Mixtral (sparse mixture of experts): logits equal transformers' MixtralForCausalLM, both checkpoint
layouts load, what we write transformers reads, and the family table recognises it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from mistral_tune.errors import ModelError
from mistral_tune.generate.cache import cached_logits
from mistral_tune.models.families import MISTRAL, MIXTRAL, describe, family_of
from mistral_tune.models.load import load_model, save_model
from mistral_tune.models.mistral import Experts, MistralConfig, MistralForCausalLM

TINY_MOE = dict(vocab_size=1000, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, architecture="MixtralForCausalLM",
                num_local_experts=4, num_experts_per_tok=2)
CONFIGS = {
    "full": {},
    "window5": dict(sliding_window=5),
    "top1_8experts": dict(num_local_experts=8, num_experts_per_tok=1),
    "head_dim24_kv1": dict(head_dim=24, num_key_value_heads=1),
}


def tiny_mixtral(seed: int = 0, **overrides) -> MistralForCausalLM:
    model = MistralForCausalLM(MistralConfig(**{**TINY_MOE, **overrides}))
    model.init_weights(std=0.2, generator=torch.Generator().manual_seed(seed))  # wide: routes differ per token
    return model.eval()


def hf_mixtral(model: MistralForCausalLM, attn: str) -> transformers.MixtralForCausalLM:
    cfg = transformers.MixtralConfig(**model.config.to_hf(), attn_implementation=attn)
    ref = transformers.MixtralForCausalLM(cfg).eval()
    missing, unexpected = ref.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k], (missing, unexpected)
    return ref


def ids(batch=2, seq=24, seed=1):
    return torch.randint(0, 1000, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_equal_transformers(name, attn):
    model = tiny_mixtral(**CONFIGS[name])
    ref = hf_mixtral(model, attn)
    x = ids()
    with torch.no_grad():
        ours, theirs = model(x), ref(input_ids=x, use_cache=False).logits.float()
    rel = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    assert rel <= 1e-5, f"{name}/{attn}: {rel:.2e}"


def test_every_expert_is_used_so_the_routing_is_really_compared():
    model = tiny_mixtral()
    moe = model.model.layers[0].mlp
    with torch.no_grad():
        x = model.model.embed_tokens(ids(seq=64))
        _, index, weights = moe.route(model.model.layers[0].post_attention_layernorm(x).reshape(-1, 64))
    assert set(index.flatten().tolist()) == set(range(4))
    assert torch.allclose(weights.sum(-1), torch.ones(weights.shape[0]))


def test_packed_rows_equal_separate_samples():
    """Routing is per token, so packing with sequence ids gives each sample its own logits."""
    model = tiny_mixtral(sliding_window=5)
    a, b = ids(1, 9, seed=2), ids(1, 13, seed=3)
    packed = torch.cat([a, b], dim=1)
    seq_ids = torch.tensor([[0] * 9 + [1] * 13])
    pos = torch.cat([torch.arange(9), torch.arange(13)])[None]
    with torch.no_grad():
        together = model(packed, position_ids=pos, seq_ids=seq_ids)
        apart = torch.cat([model(a), model(b)], dim=1)
    assert torch.allclose(together, apart, atol=1e-5)


def test_kv_cache_decoding_equals_full_forward():
    model = tiny_mixtral()
    x = ids(1, 12)
    with torch.no_grad():
        full = model(x)
        steps = cached_logits(model, x, [(0, 8)] + [(i, i + 1) for i in range(8, 12)])
    assert torch.allclose(steps, full, atol=1e-5)


def test_hub_layout_round_trip_and_transformers_reads_what_we_write(tmp_path):
    model = tiny_mixtral(sliding_window=5)
    save_model(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["model_type"] == "mixtral"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ours" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in keys  # the hub's per-expert layout
    assert not any(".experts.gate_up_proj" in k for k in keys)

    loaded, _ = load_model(str(tmp_path / "ours"))
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours"), dtype=torch.float32).eval()
    x = ids()
    with torch.no_grad():
        want = model(x)
        assert torch.equal(loaded.eval()(x), want)
        assert torch.allclose(ref(input_ids=x).logits, want, atol=1e-5)


def test_reads_the_stacked_layout_transformers_5_keeps_in_memory(tmp_path):
    """A checkpoint holding mlp.experts.gate_up_proj / down_proj (3D) loads to the same model."""
    model = tiny_mixtral()
    ref = hf_mixtral(model, "sdpa")
    out = tmp_path / "stacked"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(model.config.to_hf()))
    loaded, _ = load_model(str(out))
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))


def test_a_missing_expert_is_named(tmp_path):
    model = tiny_mixtral()
    save_model(model, tmp_path / "m")
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    del state["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(state, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(ModelError, match=r"layers\.1\.block_sparse_moe\.experts\.2\.w3"):
        load_model(str(tmp_path / "m"))


def test_family_table():
    assert family_of({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral"}) is MIXTRAL
    assert family_of({"model_type": "mistral"}) is MISTRAL
    with pytest.raises(ModelError, match="LlamaForCausalLM is not supported; supported: Mistral.*MixtralForCausalLM"):
        family_of({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    with pytest.raises(ModelError):  # a mislabelled config is not guessed at
        family_of({"architectures": ["MixtralForCausalLM"], "model_type": "mistral"})
    line = describe(tiny_mixtral().config)
    assert line.startswith("Mixtral (") and "4 experts, top-2" in line


def test_lora_on_attention_equals_peft_on_transformers_mixtral(tmp_path):
    from peft import PeftModel

    model, base = _expert_lora(tmp_path, ["q_proj", "k_proj", "v_proj", "o_proj"])
    ref = PeftModel.from_pretrained(hf_mixtral(base, "sdpa"), str(tmp_path)).eval()
    x = ids()
    with torch.no_grad():
        ours, theirs = model.eval()(x), ref(input_ids=x, use_cache=False).logits.float()
        assert (ours - base(x)).abs().max() > 1e-3  # the adapter matters
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() <= 1e-5


def test_lora_targets_that_mixtral_lacks_are_refused_by_name():
    from mistral_tune.models.lora import LoraSpec, apply_lora

    with pytest.raises(ModelError, match=r"\['gate_proj', 'up_proj'\]: Mixtral has no such.*gate_up_proj, w1, w3"):
        apply_lora(tiny_mixtral(), LoraSpec(r=4))  # the default seven: down_proj names the experts' down


@pytest.mark.parametrize("targets, spec_kw, message", [
    (["w1"], {}, "w1 and w3 .* one stacked tensor"),
    (["q_proj", "w3"], {}, "w1 and w3 .* one stacked tensor"),
    (["experts"], {"dropout": 0.1}, "lora_dropout 0.1 .* experts has neither"),
    (["down_proj"], {"use_dora": True}, "use_dora True: LoRA on Mixtral's experts has neither"),
    (["experts"], {"init": "pissa"}, "lora_init pissa: not for LoRA on Mixtral's experts"),
])
def test_expert_lora_that_peft_cannot_hold_is_refused(targets, spec_kw, message):
    from mistral_tune.models.lora import LoraSpec, apply_lora

    with pytest.raises(ModelError, match=message):
        apply_lora(tiny_mixtral(), LoraSpec(r=4, target_modules=targets, **spec_kw))


def test_dora_and_dropout_stay_allowed_on_attention():
    from mistral_tune.models.lora import LoraSpec, apply_lora

    apply_lora(tiny_mixtral(), LoraSpec(r=4, target_modules=["q_proj"], dropout=0.1, use_dora=True))


def test_merged_expert_lora_equals_peft_merge_and_unload(tmp_path):
    """`mistral-tune merge` folds the experts' adapters: transformers reads the merged model with the
    logits of transformers + PEFT's own merge of the same adapter."""
    from peft import PeftModel

    from mistral_tune.export.hf import merge_to_dir

    model, base_dir = _saved_expert_lora(tmp_path, ["o_proj", "experts"])
    merged = merge_to_dir(tmp_path / "adapter", tmp_path / "merged", echo=lambda *_: None)
    ours = transformers.AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    theirs = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).merge_and_unload().eval()
    x = torch.randint(3, 32768, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = theirs(input_ids=x).logits
        assert (model.eval()(x) - want).abs().max() <= 1e-5  # PEFT's merge is our unmerged model
        assert (ours(input_ids=x).logits - want).abs().max() <= 1e-5


def test_train_mixtral_and_merge_to_a_model_transformers_loads(tmp_path):
    from mistral_tune.config import config_from_dict
    from mistral_tune.export.hf import merge_to_dir
    from mistral_tune.models.peft_format import load_adapter
    from mistral_tune.quickstart import create_tiny_model
    from mistral_tune.train.loop import train

    base_dir = create_tiny_model(tmp_path / "base", "v3", **{k: v for k, v in TINY_MOE.items() if k != "vocab_size"})
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"say {w}"},
                                                     {"role": "assistant", "content": w}]}) + "\n"
                            for w in ["apple", "river", "stone", "cloud", "tiger", "maple"]))
    cfg = config_from_dict({"base_model": str(base_dir), "datasets": [{"path": str(data)}], "max_steps": 4,
                            "output_dir": str(tmp_path / "run"), "sequence_len": 64, "dataset_cache": False,
                            "lora_r": 4, "learning_rate": 0.05})  # the default targets: attention and experts
    result = train(cfg, echo=lambda *_: None)  # (they were the dense seven, which Mixtral lacks: an error)
    adapter_cfg = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert sorted(adapter_cfg["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert adapter_cfg["target_parameters"]
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "grad_norm" in r]
    assert len(steps) == 4 and all(r["router_aux_loss"] > 1.0 for r in steps)  # even routing: top_k (2)
    trained, _ = load_model(str(base_dir))
    load_adapter(trained, result.adapter_dir)
    merged = merge_to_dir(result.adapter_dir, tmp_path / "merged", echo=lambda *_: None)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    x = torch.randint(3, 32768, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = trained.eval()(x)
        assert torch.allclose(ref(input_ids=x).logits, want, atol=1e-4)


def _random_lora(model, targets, **spec_kw):
    """Random LoRA (B too, so the adapters matter) on `targets` of `model`; returns its spec."""
    from mistral_tune.models.lora import LoraSpec, apply_lora

    spec = LoraSpec(r=3, alpha=6, target_modules=targets, **spec_kw)
    apply_lora(model, spec, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    return spec


def _expert_lora(tmp_path, targets, seed=0, **spec_kw):
    """A tiny Mixtral with random LoRA on `targets`, saved as PEFT's adapter; and the base model it went on."""
    from mistral_tune.models.peft_format import save_adapter

    model = tiny_mixtral(seed, sliding_window=5)
    base = tiny_mixtral(seed, sliding_window=5)
    save_adapter(model, _random_lora(model, targets, **spec_kw), tmp_path, base_model="tiny")
    return model.eval(), base


def _saved_expert_lora(tmp_path, targets, **spec_kw):
    """A tiny Mixtral model folder (tmp_path/base) and, loaded from it, the model with random LoRA on
    `targets`, saved as PEFT's adapter in tmp_path/adapter."""
    from mistral_tune.models.peft_format import save_adapter
    from mistral_tune.quickstart import create_tiny_model

    base_dir = create_tiny_model(tmp_path / "base", "v3", **{k: v for k, v in TINY_MOE.items() if k != "vocab_size"})
    model, _ = load_model(str(base_dir))
    save_adapter(model, _random_lora(model, targets, **spec_kw), tmp_path / "adapter", base_model=str(base_dir))
    return model, base_dir


EXPERT_TARGET_SETS = {
    "experts": ["experts"],
    "gate_up_only": ["gate_up_proj"],
    "down_only_w2": ["w2"],
    "w1_w3_with_attention": ["q_proj", "v_proj", "w1", "w3"],
    "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"],
}


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("name", list(EXPERT_TARGET_SETS))
def test_lora_on_experts_equals_peft_target_parameters_on_transformers(tmp_path, name, rslora):
    from peft import PeftModel

    model, base = _expert_lora(tmp_path, EXPERT_TARGET_SETS[name], use_rslora=rslora)
    ref = PeftModel.from_pretrained(hf_mixtral(base, "sdpa"), str(tmp_path)).eval()
    x = ids()
    with torch.no_grad():
        ours, theirs = model(x), ref(input_ids=x, use_cache=False).logits.float()
        assert (ours - base(x)).abs().max() > 1e-2  # the adapter matters
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() <= 1e-5


def test_lora_on_experts_loads_back_and_a_peft_saved_adapter_loads(tmp_path):
    """What PEFT writes for transformers' Mixtral loads onto ours with the same logits, and ours round-trips."""
    from peft import LoraConfig, get_peft_model

    from mistral_tune.models.peft_format import load_adapter

    model, base = _expert_lora(tmp_path / "ours", ["k_proj", "experts"])
    again = tiny_mixtral(sliding_window=5)
    load_adapter(again, tmp_path / "ours")
    ref = get_peft_model(hf_mixtral(base, "sdpa"), LoraConfig(
        r=2, lora_alpha=5, target_modules=["o_proj"], target_parameters=["mlp.experts.down_proj",
                                                                         "mlp.experts.gate_up_proj"]))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    ref.save_pretrained(str(tmp_path / "peft"))
    theirs = tiny_mixtral(sliding_window=5)
    load_adapter(theirs, tmp_path / "peft")
    x = ids()
    with torch.no_grad():
        assert torch.equal(again.eval()(x), model(x))
        want = ref.eval()(input_ids=x, use_cache=False).logits
        assert ((theirs.eval()(x) - want).abs().max() / want.abs().max()).item() <= 1e-5


VLLM_TARGET_SETS = {  # a zero pair stands in for a stacked weight without LoRA (vLLM needs w1, w2 and w3)
    "experts_rslora": (["q_proj", "experts"], True),
    "gate_up_only": (["gate_up_proj"], False),
    "down_only_with_attention": (["o_proj", "w2"], False),
}


@pytest.mark.parametrize("name", list(VLLM_TARGET_SETS))
def test_export_adapter_writes_expert_lora_per_expert_with_peft_merge_deltas(tmp_path, name):
    """`export adapter --out` writes LoRA on the stacked experts as one pair per expert and projection, the
    layout vLLM's Mixtral reads. Reference: PEFT's merge_and_unload of the original (stacked) adapter on
    transformers' Mixtral; each expert's merged w1 / w3 (halves of gate_up_proj) and w2 (down_proj) is the base
    plus (alpha / r) B_e A_e of the exported file's pairs."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from mistral_tune.export.adapter import export_adapter, vllm_adapter_problems

    targets, rslora = VLLM_TARGET_SETS[name]
    _, base_dir = _saved_expert_lora(tmp_path, targets, use_rslora=rslora)
    source = tmp_path / "adapter"
    before = {f.name: f.read_bytes() for f in source.iterdir()}
    out, cfg = export_adapter(source, tmp_path / "vllm")
    assert {f.name: f.read_bytes() for f in source.iterdir()} == before  # the source is never modified
    assert vllm_adapter_problems(out) == [] and json.loads((out / "adapter_config.json").read_text()) == cfg
    assert "target_parameters" not in cfg and not cfg["use_rslora"]
    assert {"w1", "w2", "w3"} <= set(cfg["target_modules"])
    exported, stacked = (load_file(str(d / "adapter_model.safetensors")) for d in (out, source))
    scale = cfg["lora_alpha"] / cfg["r"]
    rs = (3 ** 0.5) if rslora else 1.0  # vLLM scales experts by alpha / r: rsLoRA's B take sqrt(r)
    for key, value in stacked.items():  # attention pairs are kept
        if ".experts." not in key:
            torch.testing.assert_close(exported[key], value * (rs if ".lora_B." in key else 1.0), rtol=1e-6, atol=0)

    base, merged = (transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
                    for _ in range(2))
    merged = PeftModel.from_pretrained(merged, str(source)).merge_and_unload()
    width = TINY_MOE["intermediate_size"]
    adapted = {"w1": "gate_up_proj" in targets or "experts" in targets, "w3": "gate_up_proj" in targets
               or "experts" in targets, "w2": "w2" in targets or "experts" in targets}
    for layer in range(TINY_MOE["num_hidden_layers"]):
        ours, theirs = base.model.layers[layer].mlp.experts, merged.model.layers[layer].mlp.experts
        for e in range(TINY_MOE["num_local_experts"]):
            rows = {"w1": slice(0, width), "w3": slice(width, 2 * width), "w2": slice(None)}
            for w, stacked_name in (("w1", "gate_up_proj"), ("w3", "gate_up_proj"), ("w2", "down_proj")):
                pair = f"base_model.model.model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.lora_"
                delta = scale * exported[pair + "B.weight"] @ exported[pair + "A.weight"]
                want = getattr(theirs, stacked_name)[e][rows[w]]
                assert (delta.abs().max() > 1e-3) == adapted[w], (w, e)
                torch.testing.assert_close(getattr(ours, stacked_name)[e][rows[w]] + delta, want, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def vllm_adapter(tmp_path_factory):
    """A stacked expert adapter and its export in vLLM's per-expert layout."""
    from mistral_tune.export.adapter import export_adapter

    root = tmp_path_factory.mktemp("vllm")
    _expert_lora(root / "stacked", ["q_proj", "experts"])
    return root / "stacked", export_adapter(root / "stacked", root / "exported")[0]


def _changed(adapter, tmp, cfg=None, rename=None, drop=(), reshape=()):
    """A copy of `adapter` with its config updated by `cfg`, keys renamed by rename(key), `drop`ped keys
    left out and `reshape` keys given one more row."""
    from safetensors.torch import load_file

    shutil.copytree(adapter, tmp, dirs_exist_ok=True)
    config = {**json.loads((adapter / "adapter_config.json").read_text()), **(cfg or {})}
    (tmp / "adapter_config.json").write_text(json.dumps(config))
    tensors = {(rename(k) if rename else k): (torch.cat([v, v[:1]]) if k in reshape else v)
               for k, v in load_file(str(adapter / "adapter_model.safetensors")).items() if k not in drop}
    save_file(tensors, str(tmp / "adapter_model.safetensors"))
    return tmp


@pytest.mark.parametrize("change", ["none", "mlp", "hf_name", "drop_pair", "drop_B", "past_last", "rank"])
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layer=st.integers(0, 1), expert=st.integers(0, 3), proj=st.sampled_from(["w1", "w2", "w3"]))
def test_vllm_rules_for_the_per_expert_layout(vllm_adapter, change, layer, expert, proj):
    """What `export adapter` writes passes vLLM's rules; one expert's pair renamed, left out or reshaped fails them."""
    import tempfile

    from mistral_tune.export.adapter import vllm_adapter_problems

    _, exported = vllm_adapter
    module = f"base_model.model.model.layers.{layer}.block_sparse_moe.experts.{expert}.{proj}"
    pair = [f"{module}.lora_A.weight", f"{module}.lora_B.weight"]
    other = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}[proj]
    renamed = module.replace("block_sparse_moe", "mlp") if change == "mlp" else module.replace(proj, other)
    named = (renamed, "vLLM's Mixtral adapts an expert as model.layers.<L>.block_sparse_moe.experts.<e>.w1/w2/w3")
    edits = {
        "none": ({}, ""),
        "mlp": (dict(rename=lambda k: k.replace(module, renamed)), named),
        "hf_name": (dict(rename=lambda k: k.replace(module, renamed)), named),
        "drop_pair": (dict(drop=pair), f"no pair for {expert}.{proj}"),
        "drop_B": (dict(drop=pair[1:]), "lora_B.weight missing"),
        "past_last": (dict(rename=lambda k: k.replace(f"{module}.", f"{module[:-4]}4.{proj}.")), "no pair for"),
        "rank": (dict(reshape=pair[:1]), "does not match r=3"),
    }
    kwargs, message = edits[change]
    with tempfile.TemporaryDirectory() as tmp:
        problems = vllm_adapter_problems(_changed(exported, Path(tmp), **kwargs))
    message = (message,) if isinstance(message, str) else message
    assert problems == [] if change == "none" else any(all(m in p for m in message) for p in problems), problems


@pytest.mark.parametrize("changes, message", [
    (dict(cfg={"use_dora": True}), "use_dora: vLLM does not support DoRA"),
    (dict(cfg={"target_modules": ["gate", "q_proj", "w1", "w2", "w3"]},
          rename=lambda k: k.replace(".self_attn.q_proj.", ".block_sparse_moe.gate.")), r"\['gate'\]"),
])
def test_what_vllm_refuses_in_a_per_expert_adapter_is_named(vllm_adapter, tmp_path, changes, message):
    from mistral_tune.export.adapter import export_adapter

    with pytest.raises(ModelError, match=f"vLLM would not load.*{message}.*Merge it"):
        export_adapter(_changed(vllm_adapter[1], tmp_path / "changed", **changes))


def test_stacked_expert_lora_needs_out_and_router_lora_is_refused(vllm_adapter, tmp_path, capsys):
    """Without --out the stacked adapter is named as what vLLM cannot read; LoRA on the router (PEFT's
    target_parameters mlp.gate.weight) is not written for vLLM; a Mixtral adapter on attention passes as it is."""
    from peft import LoraConfig, get_peft_model

    from mistral_tune.cli import main
    from mistral_tune.export.adapter import export_adapter, vllm_adapter_problems

    stacked, _ = vllm_adapter
    assert any("`export adapter --out DIR` writes" in p for p in vllm_adapter_problems(stacked))
    assert main(["export", "adapter", str(stacked)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass --out DIR to write it one pair per expert" in err
    assert main(["export", "adapter", str(stacked), "--out", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "adapter OK for vLLM's LoRA loader" in out and "--enable-lora --max-lora-rank 8" in out

    router = get_peft_model(hf_mixtral(tiny_mixtral(), "sdpa"), LoraConfig(r=2, target_parameters=["mlp.gate.weight"]))
    router.save_pretrained(str(tmp_path / "router"))
    with pytest.raises(ModelError, match=r"\['mlp.gate.weight'\]: only LoRA on Mixtral's experts.*Merge it"):
        export_adapter(tmp_path / "router", tmp_path / "router_out")
    assert not (tmp_path / "router_out").exists()

    _expert_lora(tmp_path / "attention", ["q_proj", "o_proj"])
    assert vllm_adapter_problems(tmp_path / "attention") == []


def _balance(model, x, real, **kw):
    from mistral_tune.models.mistral import router_balance

    seq_ids = torch.where(real, 0, -1) if real.dtype == torch.bool else real
    with router_balance(model, seq_ids >= 0) as balance:
        model(x, seq_ids=seq_ids, **kw)
    return balance.loss()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_router_balance_loss_equals_transformers_aux_loss_with_padding(seed):
    model = tiny_mixtral(seed, num_local_experts=8, num_experts_per_tok=2)
    ref = hf_mixtral(model, "eager")
    x = ids(3, 20, seed=seed)
    lengths = torch.randint(5, 21, (3,), generator=torch.Generator().manual_seed(seed))
    real = torch.arange(20)[None] < lengths[:, None]  # right padding
    with torch.no_grad():
        ours = _balance(model, x, real)
        theirs = ref(input_ids=x, attention_mask=real.long(), output_router_logits=True, use_cache=False).aux_loss
        unmasked = ref(input_ids=x, output_router_logits=True, use_cache=False).aux_loss
    assert abs(ours.item() - theirs.item()) <= 1e-5 * theirs.item()
    assert abs(ours.item() - unmasked.item()) > 1e-4  # the padding is really left out


def test_router_balance_loss_of_packed_rows_counts_each_sample_and_no_padding():
    """A packed row (two samples, then padding) gives transformers' loss over the samples' own router logits."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    model = tiny_mixtral(num_local_experts=8)
    ref = hf_mixtral(model, "eager")
    a, b = ids(1, 9, seed=2), ids(1, 13, seed=3)
    packed = torch.cat([a, b, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    seq_ids = torch.tensor([[0] * 9 + [1] * 13 + [-1] * 6])
    pos = torch.cat([torch.arange(9), torch.arange(13), torch.arange(6)])[None]
    with torch.no_grad():
        ours = _balance(model, packed, seq_ids, position_ids=pos)
        logits = [ref(input_ids=s, output_router_logits=True, use_cache=False).router_logits for s in (a, b)]
    per_layer = tuple(torch.cat([la, lb]) for la, lb in zip(*logits, strict=True))
    theirs = load_balancing_loss_func(per_layer, 8, 2)
    assert abs(ours.item() - theirs.item()) <= 1e-5 * theirs.item()


@pytest.mark.parametrize("checkpointing", [False, True, "by_row"])
def test_router_balance_gradient_equals_autograd_through_transformers_loss(checkpointing):
    """The injected gradient (also through checkpointed layers, run again in backward) equals autograd
    through transformers' load_balancing_loss_func on the same router logits and mask."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from mistral_tune.models.mistral import router_balance

    x = ids(2, 16)
    real = torch.ones(2, 16, dtype=torch.bool)
    real[1, 11:] = False
    grads = []
    for inject in (False, True):
        model = tiny_mixtral().train()
        # by row: not with a trained balance loss, which takes the whole batch
        model.configure(gradient_checkpointing=bool(checkpointing) and inject,
                        recompute_by_row=checkpointing == "by_row")
        logits = []
        hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, o, kept=logits: kept.append(o))
                 for layer in model.model.layers]
        with router_balance(model, real, grad_scale=0.7 if inject else 0.0):
            out = model(x, seq_ids=torch.where(real, 0, -1)).square().mean()
            if not inject:
                out = out + 0.7 * load_balancing_loss_func(tuple(logits), 4, 2, attention_mask=real.long())
            out.backward()
        for h in hooks:
            h.remove()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0]["model.layers.0.mlp.gate.weight"].abs().max() > 0
    for n in grads[0]:
        _close_grads(grads[1][n], grads[0][n], n)


def test_nf4_experts_are_bitsandbytes_nf4_per_expert_and_compute_as_their_dequantized_weights():
    import bitsandbytes.functional as bnbf

    from mistral_tune.models.quant import quantize_model

    model = tiny_mixtral()
    stacked = {k: v.clone() for k, v in model.model.layers[1].mlp.experts.named_parameters()}
    assert quantize_model(model, ["q_proj", "experts"]) == 2 * (1 + 4 * 2)  # per layer: q_proj, 4 experts x 2 weights
    experts = model.model.layers[1].mlp.experts
    assert not list(experts.parameters())  # the stacked weights are gone: only the NF4 codes remain
    dense = tiny_mixtral()
    with torch.no_grad():
        for name, w in stacked.items():
            for e in range(4):
                packed, state = bnbf.quantize_4bit(w[e], blocksize=64, quant_type="nf4", compress_statistics=True)
                assert torch.equal(experts.nf4[name][e].dequantized(), bnbf.dequantize_4bit(packed, state))
        for layer, q_layer in zip(dense.model.layers, model.model.layers, strict=True):
            layer.self_attn.q_proj.weight.copy_(q_layer.self_attn.q_proj.dequantized())
            for name, layers in q_layer.mlp.experts.nf4.items():
                getattr(layer.mlp.experts, name).copy_(torch.stack([q.dequantized() for q in layers]))
        x = ids()
        want = dense(x)
        assert ((model(x) - want).abs().max() / want.abs().max()).item() <= 1e-5
    held = sum(t.numel() * t.element_size() for q in experts.nf4.values() for layer in q
               for t in layer._tensors() if t is not None)
    full = sum(v.numel() for v in stacked.values())
    # 4 bits a weight, a one-byte scale per block of 64, and per expert matrix bitsandbytes' 256-entry float
    # code table, one second-level scale and its offset: 4.13 bits a weight at Mixtral 8x7B's shapes
    assert held == full // 2 + full // 64 + 8 * (256 * 4 + 4 + 4)


def test_qlora_on_mixtral_experts_trains_saves_and_loads_as_trained(tmp_path):
    from mistral_tune.config import config_from_dict
    from mistral_tune.models.peft_format import BASE_QUANTIZATION, load_adapter
    from mistral_tune.models.quant import quantize_model
    from mistral_tune.models.tuned import load_tuned
    from mistral_tune.quickstart import create_tiny_model
    from mistral_tune.train.loop import train

    base_dir = create_tiny_model(tmp_path / "base", "v3", **{k: v for k, v in TINY_MOE.items() if k != "vocab_size"})
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"say {w}"},
                                                     {"role": "assistant", "content": w}]}) + "\n"
                            for w in ["apple", "river", "stone", "cloud"]))
    targets = ["q_proj", "experts"]
    cfg = config_from_dict({"base_model": str(base_dir), "datasets": [{"path": str(data)}], "max_steps": 3,
                            "output_dir": str(tmp_path / "run"), "sequence_len": 64, "dataset_cache": False,
                            "adapter": "qlora", "lora_r": 4, "learning_rate": 0.05, "lora_target_modules": targets})
    result = train(cfg, echo=lambda *_: None)
    assert (result.adapter_dir / BASE_QUANTIZATION).is_file()
    trained, _ = load_model(str(base_dir))  # as training held it: NF4 base, the adapter on top
    quantize_model(trained, targets)
    load_adapter(trained, result.adapter_dir)
    x = torch.randint(3, 32768, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = trained.eval()(x)
        assert (want - load_model(str(base_dir))[0].eval()(x)).abs().max() > 1e-4  # it trained
        for merge in (False, True):
            got = load_tuned(result.adapter_dir, merge=merge).model(x)
            assert (got - want).abs().max() <= 1e-5, merge


def _close_grads(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """float32 gradients summed in another order: within 1e-5 of the tensor's largest entry (seen: 3e-7;
    an element-wise atol of 1e-7 failed on another machine's build)."""
    diff, scale = float((got - want).abs().max()), float(want.abs().max())
    assert diff <= 1e-5 * scale, (name, diff, scale)


def test_a_training_step_adds_the_weighted_balance_loss_gradient_and_reports_its_mean():
    """accumulate_gradients: each micro-batch's balance loss joins with router_aux_loss_coef times its share of
    the window's trained tokens (as its token loss does), and the reported value is the real-token mean."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from mistral_tune.data.pack import IGNORE, Batch
    from mistral_tune.train.loop import Runtime, accumulate_gradients

    def batch(seed, n_pad, n_prompt):
        x = ids(1, 14, seed=seed)
        labels = torch.roll(x, -1, 1)
        labels[:, :n_prompt] = IGNORE
        seq = torch.zeros(1, 14, dtype=torch.long)
        if n_pad:
            labels[:, -n_pad:], seq[:, -n_pad:] = IGNORE, -1
        return Batch(x, labels, torch.arange(14)[None], seq)

    micro = [batch(1, 5, 2), batch(2, 0, 9)]
    n_tokens = sum(b.n_trained for b in micro)
    grads, reported = [], None
    for ours in (True, False):
        model = tiny_mixtral().train()
        if ours:
            model.configure(router_aux_loss_coef=0.3)
            reported = accumulate_gradients(model, micro, Runtime(torch.device("cpu"), None)).router_aux
        else:
            aux = []
            for b in micro:
                logits = []
                hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, o, kept=logits: kept.append(o))
                         for layer in model.model.layers]
                loss = model.token_loss(b)
                for h in hooks:
                    h.remove()
                aux.append(load_balancing_loss_func(tuple(logits), 4, 2, attention_mask=(b.seq_ids >= 0).long()))
                (loss / n_tokens + 0.3 * b.n_trained / n_tokens * aux[-1]).backward()
            want = sum(a.item() * b.n_real for a, b in zip(aux, micro, strict=True)) / sum(b.n_real for b in micro)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert reported == pytest.approx(want, rel=1e-5)
    for n in grads[0]:
        _close_grads(grads[0][n], grads[1][n], n)


@pytest.mark.parametrize("top1_unused", [False, True])
def test_grouped_expert_products_equal_the_loop_with_lora_and_gradients(top1_unused):
    from mistral_tune.models.lora import LoraSpec, apply_lora

    model = tiny_mixtral(num_local_experts=8, num_experts_per_tok=1 if top1_unused else 2)
    apply_lora(model, LoraSpec(r=3, alpha=6, target_modules=["experts"]), seed=0)
    experts, moe = model.model.layers[0].mlp.experts, model.model.layers[0].mlp
    for p in experts.parameters():
        p.requires_grad_(True)
    with torch.no_grad():
        for name, p in experts.lora.named_parameters():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    n = 5 if top1_unused else 40  # 5 tokens, top-1: some of the 8 experts get none
    x = torch.randn(n, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    _, index, weights = moe.route(x)
    if top1_unused:
        assert len(set(index.flatten().tolist())) < 8
    results = []
    for run in (Experts._loop, lambda ex, *a: ex(*a)):  # the loop (as NF4 experts run), then the default
        out = run(experts, x, index, weights)
        grads = torch.autograd.grad(out.square().sum(), [x, *experts.parameters()], retain_graph=True)
        results.append((out, grads))
    (want, want_grads), (got, got_grads) = results
    for g, w in zip((got, *got_grads), (want, *want_grads), strict=True):
        assert (g - w).abs().max() <= 1e-5 * w.abs().max(), (g.shape, (g - w).abs().max(), w.abs().max())


def test_grouped_mm_fast_kernel_equals_the_padded_product_in_bf16():
    """torch._grouped_mm (bf16, aligned shapes) and the padded batched product give the same rows and gradients."""
    from mistral_tune.models import mistral

    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([5, 0, 11, 3])
    x = torch.randn(19, 32, generator=gen).bfloat16().requires_grad_(True)
    w = torch.randn(4, 16, 32, generator=gen).bfloat16().requires_grad_(True)
    fast = mistral.grouped_mm(x, w, counts)
    padded = mistral.grouped_mm(x.float(), w.float(), counts)  # float32: the padded product
    assert torch.allclose(fast.float(), padded, rtol=2e-2, atol=2e-2)
    (gx, gw), (px, pw) = (torch.autograd.grad(y.float().square().sum(), [x, w]) for y in (fast, padded))
    assert torch.allclose(gx.float(), px.float(), rtol=3e-2, atol=0.5)
    assert torch.allclose(gw.float(), pw.float(), rtol=3e-2, atol=0.5)


def test_a_measured_only_balance_keeps_the_row_by_row_backward(monkeypatch):
    """Reporting the balance loss (not training it) leaves checkpointing's one-row-at-a-time backward on,
    and measures the same loss as a pass without checkpointing."""
    from mistral_tune.models.mistral import router_balance

    x, real = ids(2, 16), torch.ones(2, 16, dtype=torch.bool)
    real[0, 12:] = False
    seen = []
    values = []
    for checkpointing in (False, True):
        model = tiny_mixtral().train()
        model.configure(gradient_checkpointing=checkpointing, recompute_by_row=checkpointing)
        row_args = model._row_args
        monkeypatch.setattr(model, "_row_args", lambda *a, f=row_args: seen.append(f(*a)) or seen[-1])
        with router_balance(model, real) as balance:
            model(x, seq_ids=torch.where(real, 0, -1)).square().mean().backward()
        values.append(balance.loss().item())
    assert seen and all(rows is not None for rows in seen)
    assert values[0] == pytest.approx(values[1], rel=1e-6)


def test_gguf_from_an_expert_lora_adapter_holds_the_merged_experts(tmp_path):
    """export gguf takes an adapter directory: the experts' adapters are folded in, expert by expert."""
    pytest.importorskip("gguf")
    from gguf import GGUFReader

    from mistral_tune.export.gguf import export_gguf
    from mistral_tune.models.lora import merge_lora

    model, base_dir = _saved_expert_lora(tmp_path, ["experts"])
    out = export_gguf(tmp_path / "adapter", tmp_path / "m.gguf", "f16", warn=lambda *_: None)
    merge_lora(model)
    tensors = {t.name: torch.from_numpy(t.data.astype("float32")) for t in GGUFReader(str(out)).tensors}
    experts = model.model.layers[1].mlp.experts
    gate, up = experts.gate_up_proj.detach().chunk(2, dim=1)
    for name, want in (("gate", gate), ("up", up), ("down", experts.down_proj.detach())):
        got = tensors[f"blk.1.ffn_{name}_exps.weight"]
        assert got.shape == want.shape and (got - want).abs().max() <= 1e-3 * want.abs().max(), name
    base_gate = load_model(str(base_dir))[0].model.layers[1].mlp.experts.gate_up_proj.detach().chunk(2, dim=1)[0]
    assert (gate - base_gate).abs().max() > 1e-3  # the adapter changed the experts


@pytest.mark.parametrize("targets, warned", [(["q_proj", "v_proj"], True), (["q_proj", "w2"], False)])
def test_qlora_on_mixtral_without_expert_targets_says_the_experts_stay_full_precision(tmp_path, targets, warned):
    from mistral_tune.config import config_from_dict
    from mistral_tune.train.lints import model_fit_warnings

    cfg = config_from_dict({"base_model": "tiny", "datasets": [{"path": "d.jsonl"}], "adapter": "qlora",
                            "output_dir": str(tmp_path / "run"), "lora_target_modules": targets})
    warnings = model_fit_warnings(cfg, tmp_path, MistralConfig(**TINY_MOE), None)
    assert any("experts are not in lora_target_modules" in w for w in warnings) == warned


@pytest.mark.parametrize("nf4", [False, True])
def test_experts_in_a_compiled_layer_compile_once(nf4):
    """Routing is known only at run time: compiled with the layer, the experts broke the graph and
    recompiled once per expert index, past dynamo's limit (then the whole layer ran eagerly)."""
    import torch._dynamo

    model = tiny_mixtral()
    if nf4:
        pytest.importorskip("bitsandbytes")
        from mistral_tune.models.quant import quantize_model

        quantize_model(model, ["experts"])
    moe = model.model.layers[0].mlp
    torch._dynamo.reset()
    compiled = torch.compile(moe, backend="eager")
    g = torch.Generator().manual_seed(0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            x = torch.randn(2, 12, model.config.hidden_size, generator=g)
            torch.testing.assert_close(compiled(x), moe(x))
    torch._dynamo.reset()
