"""Adapter variants from the config to the files others read: each trains, learns and resumes
exactly, and PEFT loads the run's adapter with the logits our loader gives; NEFTune's noise is
transformers'; new special tokens against mistral-common and transformers' tokenizer; vLLM's rules."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from _runs import base_config, config, make_assets, metrics, same_tensors, tensors, write_yaml
from mistral_tune.chat import ADDED_TOKENS, BUNDLED, load_tokenizer
from mistral_tune.cli import main
from mistral_tune.errors import ConfigError, ModelError
from mistral_tune.export.adapter import export_adapter, vllm_adapter_problems
from mistral_tune.export.hf_tokenizer import save_hf_tokenizer
from mistral_tune.models.load import load_model
from mistral_tune.models.quant import nf4_round_trip
from mistral_tune.models.tuned import load_tuned
from mistral_tune.train.loop import train

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

VARIANTS = {
    "dora": dict(use_dora=True),
    "qlora_dora": dict(adapter="qlora", use_dora=True),
    "loraplus": dict(loraplus_lr_ratio=16.0),
    "modules_to_save": dict(lora_modules_to_save=["embed_tokens", "lm_head"]),
    "new_special_tokens": dict(new_special_tokens=["<think>", "</think>"]),
    "neftune": dict(neftune_noise_alpha=0.5),
    "pissa": dict(lora_init="pissa"),
    "olora_dora": dict(lora_init="olora", use_dora=True),
}
THINK = [{"messages": [{"role": "user", "content": f"count to {n}"},
                       {"role": "assistant", "content": f"<think>{n} is small</think> {list(range(n))}"}]}
         for n in range(1, 9)]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    model, data = make_assets(tmp_path_factory.mktemp("assets"))
    with data.open("a") as f:  # records that use the new tokens
        f.writelines(json.dumps(r) + "\n" for r in THINK)
    return model, data


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_trains_resumes_and_loads_in_peft(name, assets, tmp_path):
    model_dir, data = assets
    out = tmp_path / "run"
    cfg = config(model_dir, data, out, max_steps=8, save_steps=4, **VARIANTS[name])
    first = train(cfg, echo=lambda _: None)
    losses = [m["loss"] for m in metrics(out)]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.05, losses

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    again = train(cfg.model_copy(update={"output_dir": str(copy), "resume": str(copy / "checkpoint-4")}),
                  echo=lambda _: None)
    assert again.steps == first.steps == 8
    assert metrics(copy) == metrics(out)
    adapter = tensors(out / "adapter" / "adapter_model.safetensors")
    assert same_tensors(tensors(copy / "adapter" / "adapter_model.safetensors"), adapter)

    # PEFT on transformers' model reads the run's adapter as our loader does, merged or not.
    ids = torch.randint(3, 32768, (2, 20), generator=torch.Generator().manual_seed(0))
    ids[:, 5] = 14  # the first reserved slot of v3: <think> in the new_special_tokens run
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if cfg.adapter == "qlora":  # PEFT gets the NF4 weights the adapter was trained on
        trained_base, _ = load_model(str(model_dir))
        nf4_round_trip(trained_base, list(cfg.lora_target_modules))
        base.load_state_dict(trained_base.state_dict())
    ref = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
    unmerged, merged = load_tuned(out, merge=False), load_tuned(out)
    with torch.no_grad():
        theirs = ref(input_ids=ids, use_cache=False).logits
        with ref.disable_adapter():
            base_logits = ref(input_ids=ids, use_cache=False).logits
        ours, ours_merged = unmerged.model(ids), merged.model(ids)
    assert (theirs - base_logits).abs().max() > 1e-4  # the trained adapter changes the model
    scale = theirs.abs().max()
    assert (ours - theirs).abs().max() <= 1e-5 * scale
    assert (ours_merged - theirs).abs().max() <= 1e-5 * scale
    if cfg.lora_init != "kaiming":  # PEFT's own PiSSA / OLoRA model with the trained factors is that model too
        peft_init = peft.get_peft_model(
            transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
            peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.lora_target_modules),
                            use_dora=cfg.use_dora, init_lora_weights=cfg.lora_init)).eval()
        trained = tensors(out / "checkpoint-8" / "trainable.safetensors")
        with torch.no_grad():
            for key, p in peft_init.named_parameters():
                if p.requires_grad:
                    p.copy_(trained[key.removeprefix("base_model.model.").replace(".default", "")
                                    .replace("lora_magnitude_vector.weight", "lora_magnitude_vector")])
            assert (peft_init(input_ids=ids, use_cache=False).logits - theirs).abs().max() <= 1e-5 * scale


def test_loraplus_steps_lora_b_at_ratio_times_the_learning_rate(assets, tmp_path):
    """Adam's first step moves every element by about its learning rate: lora_B (zero before) by
    lr x loraplus_lr_ratio, the same run without LoRA+ by lr."""
    model_dir, data = assets
    moved = {}
    for ratio in (None, 16.0):
        out = tmp_path / str(ratio)
        train(config(model_dir, data, out, max_steps=1, warmup_steps=0, loraplus_lr_ratio=ratio), echo=lambda _: None)
        b = [v for k, v in tensors(out / "adapter" / "adapter_model.safetensors").items() if ".lora_B." in k]
        moved[ratio] = max(float(t.abs().max()) for t in b)
    assert moved[None] == pytest.approx(1e-2, rel=0.05)
    assert moved[16.0] == pytest.approx(16 * 1e-2, rel=0.05)


def test_new_special_tokens_train_their_rows_and_travel_with_the_adapter(assets, tmp_path):
    model_dir, _ = assets
    data = tmp_path / "think.jsonl"  # only records that use the new tokens: every step sees them
    data.write_text("".join(json.dumps(r) + "\n" for r in THINK))
    echoed = []
    result = train(config(model_dir, data, tmp_path / "run", max_steps=4, **VARIANTS["new_special_tokens"]),
                   echo=echoed.append)
    assert any("<think> = id 14, </think> = id 15" in e for e in echoed)
    cfg = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert cfg["trainable_token_indices"] == {"embed_tokens": [14, 15], "lm_head": [14, 15]}
    saved = tensors(result.adapter_dir / "adapter_model.safetensors")
    rows = saved["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    base = load_tuned(model_dir).model.model.embed_tokens.weight
    assert rows.shape == (2, 64) and not torch.equal(rows, base[[14, 15]])  # trained
    tuned = load_tuned(tmp_path / "run")
    assert tuned.tokenizer.added == {"<think>": 14, "</think>": 15}
    ids, mask = tuned.tokenizer.encode_chat(THINK[2]["messages"])
    assert 14 in ids and 15 in ids and mask[ids.index(14)]  # the assistant's tokens, trained on
    assert tuned.tokenizer.decode(ids[ids.index(14):]) == THINK[2]["messages"][1]["content"]
    # The merged model directory carries the names too (its HF tokenizer turns the text into the ids).
    from mistral_tune.export.hf import merge_to_dir

    merged = merge_to_dir(result.adapter_dir, tmp_path / "merged")
    assert json.loads((merged / ADDED_TOKENS).read_text()) == {"<think>": 14, "</think>": 15}
    hf = transformers.AutoTokenizer.from_pretrained(merged)
    assert hf("a<think>b</think>", add_special_tokens=False)["input_ids"] == tuned.tokenizer.encode_text(
        "a<think>b</think>", bos=False, eos=False)


def test_new_special_tokens_refused_clearly(assets, tmp_path):
    model_dir, data = assets
    with pytest.raises(ConfigError, match="new_special_tokens"):
        config(model_dir, data, tmp_path / "a", new_special_tokens=["<x>", "<x>"])
    with pytest.raises(ModelError, match="cannot add tokens"):
        load_tokenizer("v1").with_added_tokens(["<x>"])
    with pytest.raises(ModelError, match="already a control token"):
        load_tokenizer("v3").with_added_tokens(["[INST]"])
    with pytest.raises(ConfigError, match="adapter: none"):
        config(model_dir, data, tmp_path / "b", adapter="none", use_dora=True)
    bad = tmp_path / "tok"
    load_tokenizer("tekken").save(bad)
    (bad / ADDED_TOKENS).write_text('{"<x>": 3}')  # [INST]'s id: not a reserved slot
    with pytest.raises(ModelError, match="not a reserved control-token slot"):
        load_tokenizer(str(bad))
    (bad / ADDED_TOKENS).write_text("[1, 2]")
    with pytest.raises(ModelError, match=ADDED_TOKENS):
        load_tokenizer(str(bad))


def test_data_commands_read_the_new_tokens(assets, tmp_path, capsys, monkeypatch):
    model_dir, _ = assets
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(THINK[0]) + "\n")
    settings = base_config(model_dir, data, tmp_path / "out", **VARIANTS["new_special_tokens"])
    cfg = write_yaml(tmp_path / "c.yaml", settings)
    assert main(["data", "inspect", str(cfg)]) == 0
    assert "<think> 1 is small</think>" in capsys.readouterr().out  # the piece after a token carries its "▁"
    cfg = write_yaml(cfg, {**settings, "tokenizer": "v1"})
    assert main(["data", "validate", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: new_special_tokens:") and "cannot add tokens" in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------- tokens against references

NAMES = ["<think>", "</think>", "<tool>"]
TEXT = st.text(st.characters(blacklist_characters="<>", blacklist_categories=("Cs",)), max_size=12)
PIECES = st.lists(st.one_of(TEXT, st.sampled_from(NAMES)), min_size=1, max_size=6)


@pytest.fixture(scope="module")
def v3_with_names(tmp_path_factory):
    tok = load_tokenizer("v3").with_added_tokens(NAMES)
    out = tmp_path_factory.mktemp("hf_v3")
    save_hf_tokenizer(tok, out)
    return tok, transformers.AutoTokenizer.from_pretrained(out)


@pytest.fixture(scope="module")
def tekken_with_names():
    return load_tokenizer("tekken").with_added_tokens(NAMES), MistralTokenizer.from_file(BUNDLED["tekken"])


@settings(max_examples=40, deadline=None)
@given(pieces=PIECES)
def test_tekken_added_tokens_keep_mistral_commons_ids_and_round_trip(tekken_with_names, pieces):
    tok, reference = tekken_with_names
    text = "".join(pieces)
    ids = tok.encode_text(text, bos=False, eos=False)
    expected = []
    for k, part in enumerate(re.split("(" + "|".join(map(re.escape, NAMES)) + ")", text)):
        raw = reference.instruct_tokenizer.tokenizer
        expected += [tok.added[part]] if k % 2 else raw.encode(part, bos=False, eos=False)
    assert ids == expected  # text between the names: mistral-common's ids; each name: its slot
    assert tok.decode(ids) == text


@settings(max_examples=40, deadline=None)
@given(pieces=PIECES, answer=PIECES)
def test_spm_added_tokens_match_transformers_and_round_trip(v3_with_names, pieces, answer):
    tok, hf = v3_with_names
    text = "".join(pieces)
    ids = tok.encode_text(text, bos=False, eos=False)
    assert tok.decode(ids) == text
    assert [i for i in ids if i in tok.added.values()] == [tok.added[p] for p in pieces if p in tok.added]
    if not text.startswith(tuple(NAMES)):  # (HF gives a text that starts with a symbol no "▁" first)
        assert hf(text, add_special_tokens=False)["input_ids"] == ids
    conv = [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(answer)}]
    if all(m["content"].strip() for m in conv):
        expected = hf.apply_chat_template(conv, tokenize=True)
        expected = expected["input_ids"] if hasattr(expected, "keys") else expected
        assert tok.encode_chat(conv)[0] == list(expected)


# ------------------------------------------------------------------------------------- NEFTune, vLLM


def test_neftune_noise_is_transformers_noise(make_tiny_mistral, make_hf_mistral):
    from transformers.integrations.neftune import activate_neftune

    model = make_tiny_mistral()
    ref = make_hf_mistral(model.config, model.state_dict())
    activate_neftune(ref, 5.0)
    model.configure(neftune_alpha=5.0)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        clean = model.eval()(ids)
        assert torch.equal(model(ids), clean)  # evaluation sees no noise
        torch.manual_seed(1)
        ours = model.train()(ids)
        torch.manual_seed(1)
        theirs = ref.train()(input_ids=ids, use_cache=False).logits
    assert (ours - clean).abs().max() > 1e-2
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()


def test_export_adapter_names_what_vllm_refuses_in_each_variant(assets, tmp_path):
    model_dir, data = assets
    for name, message in [("dora", "DoRA"), ("modules_to_save", "modules_to_save"),
                          ("new_special_tokens", "trainable tokens")]:
        out = tmp_path / name
        train(config(model_dir, data, out, max_steps=1, **VARIANTS[name]), echo=lambda _: None)
        problems = vllm_adapter_problems(out / "adapter")
        assert any(message in p for p in problems), problems
        with pytest.raises(ModelError, match="mistral-tune merge"):
            export_adapter(out)
    for name in ("loraplus", "neftune", "pissa"):  # plain LoRA adapters (PiSSA's converted, at twice the rank)
        out = tmp_path / name
        train(config(model_dir, data, out, max_steps=1, **VARIANTS[name]), echo=lambda _: None)
        assert vllm_adapter_problems(out / "adapter") == []
