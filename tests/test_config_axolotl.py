"""Axolotl configs in (config_axolotl.py, `mistral-tune convert axolotl`), and the config errors a user
coming from Axolotl meets: one problem a line, Axolotl's names hinted, YAML errors in plain words."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mistral_tune.cli import main
from mistral_tune.config import convert_axolotl, convert_axolotl_file, load_config, read_yaml
from mistral_tune.config_axolotl import KNOWN, OPTIMIZERS, SAME, SCHEDULERS, translate, unexplained
from mistral_tune.errors import ConfigError

FIXTURES = Path(__file__).parent / "fixtures" / "axolotl"
ALL = sorted(FIXTURES.glob("*.yml"))
# The examples that ask for what mistral-tune does not do: the key the refusal must name.
REFUSED = {
    "mistral__dpo__mistral-dpo-qlora.yml": "rl: 'dpo'",
    "mistral__orpo__mistral-qlora-orpo.yml": "rl: 'orpo'",
    **{name: "processor_type:" for name in (
        "magistral__vision__magistral-small-vision-24B-qlora.yml", "ministral3__vision__ministral3-3b-vision-qlora.yml",
        "mistral-medium-3_5__qlora-vision.yml", "mistral-small__mistral-small-3.1-24B-lora.yml",
        "mistral4__fft-vision.yml", "mistral4__qlora-vision.yml", "pixtral__lora-12b.yml",
        "voxtral__voxtral-mini-audio-qlora.yml")},
}


def test_every_mistral_example_of_axolotl_is_a_fixture_with_its_source() -> None:
    assert len(ALL) == 31 and set(REFUSED) <= {f.name for f in ALL}
    for f in ALL:
        assert f.read_text().startswith("# source: axolotl-ai-cloud/axolotl examples/"), f


@pytest.mark.parametrize("fixture", ALL, ids=lambda f: f.stem)
def test_each_example_converts_and_validates_or_is_refused_by_name(fixture: Path, tmp_path: Path) -> None:
    out = tmp_path / "ours.yaml"
    if fixture.name in REFUSED:
        with pytest.raises(ConfigError) as info:
            convert_axolotl_file(fixture, out)
        assert f"{fixture}: {REFUSED[fixture.name]}" in str(info.value) and "not" in str(info.value)
        assert not out.exists()
        return
    result = convert_axolotl_file(fixture, out)
    data = yaml.safe_load(fixture.read_text())
    assert unexplained(data, result) == []  # every key is carried or named with its reason
    cfg = load_config(out)  # our own loader and schema
    for key in ("sequence_len", "lora_r", "micro_batch_size", "gradient_accumulation_steps", "val_set_size"):
        if data.get(key) is not None:
            assert getattr(cfg, key) == data[key], key
    assert cfg.learning_rate == float(data["learning_rate"])
    assert cfg.optimizer == OPTIMIZERS[data["optimizer"]]
    assert cfg.adapter == ("none" if data.get("adapter") is None else "qlora" if data.get("load_in_4bit") else "lora")
    assert [d.path for d in cfg.datasets] == [d["path"] for d in data["datasets"]]
    assert out.read_text().startswith(f"# mistral-tune config converted from the Axolotl config {fixture}")


def test_translations_that_need_thought() -> None:
    def ours(name: str) -> dict:
        return translate(yaml.safe_load((FIXTURES / name).read_text())).config

    # ShareGPT turns under chat_template with message_property_mappings role: from, content: value
    assert ours("voxtral__voxtral-mini-qlora.yml")["datasets"] == [
        {"path": "cgato/SlimOrcaDedupCleaned", "split": "train[:1%]", "format": "sharegpt"}]
    # a PEFT regex over the language model's modules: the seven projections of the text model
    assert ours("mistral-medium-3_5__qlora-text.yml")["lora_target_modules"] == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert ours("mistral__lora.yml")["adapter"] == "lora"  # load_in_8bit: no 8-bit base, a bf16 one
    bigstral = ours("mistral__bigstral__bigstral-ds-zero3.yml")
    assert bigstral["adapter"] == "none" and bigstral["new_special_tokens"] == ["<|im_start|>"]
    assert ours("mistral4__fft-text.yml")["distributed"] == "fsdp"
    assert ours("mistral__mistral-qlora-fsdp.yml")["distributed"] == "ddp"  # fsdp is for full fine-tuning here


def test_dataset_types_and_their_fields() -> None:
    base = {"base_model": "m", "adapter": "lora", "lora_target_linear": True}
    cases = [
        ({"path": "d.jsonl", "type": "completion", "field": "body"}, {"format": "text", "field_map": {"text": "body"}}),
        ({"path": "d.jsonl", "type": "chat_template", "field_messages": "chat",
          "message_property_mappings": {"role": "speaker", "content": "text"}},
         {"format": "sharegpt", "field_map": {"conversations": "chat", "from": "speaker", "value": "text"}}),
        ({"path": "d.jsonl", "type": "chat_template.default", "field_messages": "conversation"},
         {"format": "messages", "field_map": {"messages": "conversation"}}),
        ({"path": "d.jsonl", "type": "sharegpt"}, {"format": "sharegpt"}),
        ({"path": "d.jsonl", "type": {"field_instruction": "q", "field_output": "a"}},
         {"format": "alpaca", "field_map": {"instruction": "q", "output": "a"}}),
        ({"path": "d.parquet", "type": "alpaca", "ds_type": "parquet"}, {"format": "alpaca", "source": "parquet"}),
    ]
    for entry, expected in cases:
        got = convert_axolotl({**base, "datasets": [entry]}).config["datasets"][0]
        assert got == {"path": entry["path"], **expected}, entry
    pre = convert_axolotl({**base, "pretraining_dataset": [{"path": "c4", "name": "en", "text_column": "t"}]})
    assert pre.config["datasets"] == [{"path": "c4", "name": "en", "format": "text", "field_map": {"text": "t"}}]
    with pytest.raises(ConfigError, match=r"datasets\.0\.type: input_output .* no counterpart"):
        convert_axolotl({**base, "datasets": [{"path": "d.jsonl", "type": "input_output"}]})


def test_refusals_are_each_on_their_own_line_naming_the_key() -> None:
    data = {"base_model": "m", "adapter": "lora", "optimizer": "lion_8bit", "lr_scheduler": "one_cycle",
            "lora_target_modules": ["lm_head"], "datasets": [{"path": "d", "type": "oasst"}], "lora_alpah": 8}
    lines = str(pytest.raises(ConfigError, convert_axolotl, data, "ax.yml").value).splitlines()
    assert len(lines) == 5 and all(line.startswith("ax.yml: ") for line in lines)
    text = "\n".join(lines)
    for fragment in ("optimizer: 'lion_8bit'", "lr_scheduler: 'one_cycle'", "lora_target_modules: ['lm_head']",
                     "lora_modules_to_save", "datasets.0.type: 'oasst'", "lora_alpah: not an Axolotl key",
                     "did you mean 'lora_alpha'?"):
        assert fragment in text, fragment


# Axolotl-like configs: known keys with values of the kinds Axolotl takes (mostly ones that convert), and
# now and then a stray key.
_VALUES = {
    "adapter": st.sampled_from([None, "lora", "qlora", "lora", "qlora", "ia3"]), "load_in_4bit": st.booleans(),
    "load_in_8bit": st.sampled_from([False, False, True]), "optimizer": st.sampled_from([*OPTIMIZERS, "lion"]),
    "lr_scheduler": st.sampled_from([*SCHEDULERS, "rex"]), "bf16": st.sampled_from(["auto", True, False]),
    "fp16": st.booleans(), "lora_target_linear": st.booleans(),
    "lora_target_modules": st.lists(st.sampled_from(["q_proj", "v_proj", "gate", "w1", "k_proj", "lm_head"]),
                                    max_size=3),
    "gradient_checkpointing": st.sampled_from([True, False, "offload"]), "rl": st.sampled_from([None, None, "dpo"]),
    "wandb_project": st.sampled_from(["p", None]), "val_set_size": st.sampled_from([0, 0.05, 10, -1]),
    "sequence_len": st.sampled_from([512, 2048, 8192, 8]), "micro_batch_size": st.integers(0, 8),
    "lora_r": st.integers(1, 64), "learning_rate": st.sampled_from([2e-4, "2e-5", 1e-5, "fast"]),
    "num_epochs": st.sampled_from([1, 0.5, 3]), "warmup_ratio": st.sampled_from([0.1, 0.05]),
    "save_steps": st.sampled_from([100, 0.25, None, 50]), "flash_attention": st.booleans(),
    "deepspeed": st.just("zero3.json"), "fsdp": st.just(["full_shard"]), "batch_size": st.integers(1, 16),
    "datasets": st.lists(st.fixed_dictionaries(
        {"path": st.sampled_from(["d.jsonl", "org/ds"]),
         "type": st.sampled_from(["alpaca", "chat_template", "sharegpt", "completion", "alpaca", "input_output"])},
        optional={"field_messages": st.just("conv"), "field": st.just("txt"), "roles_to_train": st.just(["assistant"]),
                  "message_property_mappings": st.just({"role": "from", "content": "value"}),
                  "split": st.just("train")}), min_size=1, max_size=2),
}


@st.composite
def _configs(draw) -> dict:
    keys = draw(st.lists(st.sampled_from(sorted(set(_VALUES) - {"datasets"})), unique=True, max_size=8))
    data = {"base_model": "mistralai/Mistral-7B-v0.1", **{k: draw(_VALUES[k]) for k in keys}}
    if draw(st.integers(0, 9)):  # a config without training data, once in ten
        data["datasets"] = draw(_VALUES["datasets"])
    stray = draw(st.sampled_from([None, None, None, None, "stray_key", "lora_alpah", "data_files"]))
    if stray:
        data[stray] = 1
    return data


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_configs())
def test_generated_configs_convert_or_fail_naming_their_keys(data: dict) -> None:
    try:
        result = convert_axolotl(data, "ax.yml")
    except ConfigError as exc:
        keys = [k for k in data if k in KNOWN or k in ("stray_key", "lora_alpah", "data_files")] + ["datasets"]
        lines = str(exc).splitlines()
        if lines[-1] == "ax.yml: the converted config does not pass validation":
            lines.pop()  # our schema's own messages above it, which name their keys
        for line in lines:
            assert line.startswith("ax.yml"), line
            assert any(k in line for k in keys) or "key '" in line, line
        return
    assert unexplained(data, result) == []
    for key in SAME:
        if data.get(key) is not None and key in result.config and key != "learning_rate":
            assert result.config[key] == data[key]


# ---------------------------------------------------------------------- Axolotl's names in our own configs


def _error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


BASE = "base_model: m\ndatasets:\n  - path: a.jsonl\n"


def test_axolotl_keys_get_their_counterpart_not_a_look_alike(tmp_path: Path) -> None:
    msg = _error(tmp_path, BASE + "load_in_4bit: true\n")
    assert "unknown key 'load_in_4bit'; Axolotl's key: use adapter: qlora" in msg and "lora_init" not in msg
    msg = _error(tmp_path, BASE + "lora_target_linear: true\n")
    assert "lora_target_modules defaults to every projection" in msg and "did you mean" not in msg
    msg = _error(tmp_path, BASE + "flash_attention: true\n")
    assert "Axolotl's key: remove it (mistral-tune chooses attention" in msg
    msg = _error(tmp_path, "base_model: m\ndatasets:\n  - path: a.jsonl\n    type: alpaca\n")
    assert "unknown key 'datasets.0.type'; Axolotl's key: use format" in msg
    msg = _error(tmp_path, BASE + "optimizer: paged_adamw_8bit\n")
    assert "(Axolotl's paged_adamw_8bit is adamw_8bit here)" in msg


def test_an_axolotl_file_given_to_train_lists_each_problem_and_points_to_convert(tmp_path: Path) -> None:
    fixture = FIXTURES / "mistral__qlora.yml"
    with pytest.raises(ConfigError) as info:
        load_config(fixture)
    lines = str(info.value).splitlines()
    assert len(lines) > 10 and all(line.startswith(f"{fixture}: ") for line in lines)
    assert any("'load_in_4bit'; Axolotl's key: use adapter: qlora" in line for line in lines)
    assert lines[-1] == (f"{fixture}: this looks like an Axolotl config; mistral-tune convert axolotl {fixture} "
                         "--out ours.yaml converts it")


# ---------------------------------------------------------------------- YAML errors


@pytest.mark.parametrize(("text", "line", "column", "words"), [
    ("a: 1\n\tb: 2\n", 2, 1, "a tab character"),
    ("a: 1\n  b: 2\n", 2, 4, "an unexpected ':'"),
    ("a: 1\nb\nc: 2\n", 2, 1, "a line without ':' after its key"),
    ("a: [1, 2\nb: 3\n", 1, 4, "a list opened here with '[' is not closed"),
    ("a: {b: 1\n", 1, 4, "a mapping opened here with '{' is not closed"),
    ("a: 'x\nb: 2\n", 1, 4, "a quote opened here is never closed"),
    ("a: @x\n", 1, 4, "put the value in quotes"),
    ("a: *x\n", 1, 4, "anchor '&NAME' that is not defined"),
    ("a:\n  - 1\n b: 2\n", 3, 2, "the indentation does not line up"),
    ("a: 1\n- b\n", 2, 1, "the indentation does not line up"),
    ("a: 1\nb: 2\na: 3\n", 3, 1, "key 'a' is given twice (first on line 1)"),
])
def test_yaml_errors_give_line_column_and_plain_words(tmp_path: Path, text: str, line: int, column: int,
                                                      words: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        read_yaml(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}, line {line}, column {column}: ") and words in msg, msg
    for jargon in ("scanning", "<block", "token", "stream", "flow"):
        assert jargon not in msg


# ---------------------------------------------------------------------- the command


def test_convert_command_writes_once_and_never_over_the_input(tmp_path: Path, capsys) -> None:
    source = tmp_path / "axolotl.yml"
    source.write_text((FIXTURES / "mistral__mixtral__mixtral.yml").read_text())
    out = tmp_path / "ours.yaml"
    assert main(["convert", "axolotl", str(source), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"written to {out}" in printed and "deepspeed: left out" in printed
    assert load_config(out).adapter == "qlora"
    written = out.read_text()
    assert main(["convert", "axolotl", str(source), "--out", str(out)]) == 2  # exists
    assert main(["convert", "axolotl", str(source), "--out", str(source), "--overwrite"]) == 2  # the input
    foreign = tmp_path / "mine.yaml"
    foreign.write_text("my: notes\n")
    assert main(["convert", "axolotl", str(source), "--out", str(foreign), "--overwrite"]) == 2
    assert "not a config that mistral-tune converted" in capsys.readouterr().err
    assert out.read_text() == written and foreign.read_text() == "my: notes\n"
    assert source.read_text() == (FIXTURES / "mistral__mixtral__mixtral.yml").read_text()
    assert main(["convert", "axolotl", str(source), "--out", str(out), "--overwrite"]) == 0
    refused = tmp_path / "refused.yaml"
    assert main(["convert", "axolotl", str(FIXTURES / "pixtral__lora-12b.yml"), "--out", str(refused)]) == 2
    assert not refused.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
