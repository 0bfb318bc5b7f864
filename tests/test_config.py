"""Tests for mistral_tune.config: the schema, YAML loading, key=value overrides, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mistral_tune.config import ALL_PROJECTIONS, Config, config_from_dict, load_config, parse_override
from mistral_tune.errors import ConfigError, MistralTuneError

BASE = "base_model: some/model\ndatasets:\n  - path: train.jsonl\n"


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(tmp_path: Path, text: str, overrides: tuple[str, ...] = ()) -> str:
    """The message of the ConfigError that loading `text` raises: one line per problem, each naming the file."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    lines = message.splitlines()
    assert len(lines) == 1 or all(line.startswith(str(path)) for line in lines), message
    return message


# ---------------------------------------------------------------------- valid configs


def test_valid_yaml_loads_with_values_and_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        BASE + "    format: messages\n"
        "sequence_len: 512\n"
        "learning_rate: 2e-4\n"  # YAML 1.1 reads this as a string; it must still become a float
        "lora_target_modules: [q_proj, v_proj]\n"
        "lr_scheduler: linear\n"
        "warmup_ratio: 0.1\n"
        "train_on_inputs: true\n"
        "bf16: false\n",
    )
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.base_model == "some/model"  # a hub id is left alone
    assert cfg.datasets[0].format == "messages"
    assert cfg.sequence_len == 512
    assert cfg.learning_rate == pytest.approx(2e-4) and isinstance(cfg.learning_rate, float)
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.lr_scheduler == "linear"
    assert cfg.warmup_ratio == 0.1 and cfg.warmup_steps is None
    assert cfg.train_on_inputs is True
    assert cfg.bf16 is False
    # untouched keys keep their defaults
    assert cfg.adapter == "lora" and cfg.lora_r == 16 and cfg.micro_batch_size == 1
    assert cfg.lora_target_modules != ALL_PROJECTIONS
    assert Config(base_model="m", datasets=[{"path": "x"}]).lora_target_modules == ALL_PROJECTIONS


def test_errors_are_mistral_tune_errors_with_exit_code_2() -> None:
    assert issubclass(ConfigError, MistralTuneError)
    assert ConfigError("x").exit_code == 2


# ---------------------------------------------------------------------- unknown keys


def test_unknown_key_names_it_and_suggests_the_nearest(tmp_path: Path) -> None:
    msg = config_error(tmp_path, BASE + "learning_rat: 0.001\n")
    assert "run.yaml" in msg
    assert "unknown key 'learning_rat'" in msg
    assert "did you mean 'learning_rate'?" in msg


def test_unknown_dataset_key_suggests_from_the_dataset_fields(tmp_path: Path) -> None:
    msg = config_error(tmp_path, "base_model: m\ndatasets:\n  - path: a.jsonl\n    fromat: text\n")
    assert "unknown key 'datasets.0.fromat'" in msg
    assert "did you mean 'format'?" in msg


def test_unknown_key_with_no_close_match_suggests_nothing(tmp_path: Path) -> None:
    msg = config_error(tmp_path, BASE + "zzqqx: 1\n")
    assert "unknown key 'zzqqx'" in msg
    assert "did you mean" not in msg


# ---------------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    ("line", "key", "value", "allowed"),
    [
        ("lora_r: 0", "lora_r", "0", ">= 1"),
        ("lora_dropout: 1.5", "lora_dropout", "1.5", "< 1"),
        ("learning_rate: 0", "learning_rate", "0", "> 0"),
        ("sequence_len: 8", "sequence_len", "8", ">= 16"),
        ("lr_scheduler: foo", "lr_scheduler", "'foo'", "'cosine', 'constant' or 'linear'"),
        ("adapter: dora", "adapter", "'dora'", "'lora', 'qlora' or 'none'"),
        ("micro_batch_size: abc", "micro_batch_size", "'abc'", "integer"),
        ("train_on_inputs: maybe", "train_on_inputs", "'maybe'", "boolean"),
        ("bf16: maybe", "bf16", "'maybe'", "'auto' or bool"),
        ("base_model: 5", "base_model", "5", "string"),
    ],
)
def test_bad_value_names_key_value_and_what_is_allowed(
    tmp_path: Path, line: str, key: str, value: str, allowed: str
) -> None:
    text = BASE + line + "\n" if not line.startswith("base_model") else line + "\ndatasets:\n  - path: a.jsonl\n"
    msg = config_error(tmp_path, text)
    assert f"key '{key}' has value {value}" in msg
    assert allowed in msg
    assert msg.count("key '") == 1, f"one problem, one message: {msg}"


def test_dataset_format_enum(tmp_path: Path) -> None:
    msg = config_error(tmp_path, "base_model: m\ndatasets:\n  - path: a.jsonl\n    format: chatml\n")
    assert "key 'datasets.0.format' has value 'chatml'" in msg
    assert "'auto', 'messages', 'sharegpt', 'alpaca', 'instruction', 'prompt_completion' or 'text'" in msg


def test_datasets_not_a_list_is_a_config_error(tmp_path: Path) -> None:
    msg = config_error(tmp_path, "base_model: m\ndatasets: 5\n")
    assert "key 'datasets' has value 5" in msg and "list" in msg


def test_several_problems_are_all_reported(tmp_path: Path) -> None:
    msg = config_error(tmp_path, BASE + "lora_r: 0\nlr_scheduler: foo\n")
    first, second = msg.splitlines()  # each problem on its own line
    assert "'lora_r' has value 0" in first and "'lr_scheduler' has value 'foo'" in second


# ---------------------------------------------------------------------- required keys, cross-field rules


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("base_model: m\n", "datasets"),
        ("base_model: m\ndatasets:\n  - format: text\n", "datasets.0.path"),
    ],
)
def test_missing_required_key(tmp_path: Path, text: str, key: str) -> None:
    msg = config_error(tmp_path, text)
    assert f"missing required key '{key}'" in msg


def test_empty_datasets_list(tmp_path: Path) -> None:
    msg = config_error(tmp_path, "base_model: m\ndatasets: []\n")
    assert "datasets" in msg and "at least 1" in msg


def test_empty_file_reports_the_required_keys(tmp_path: Path) -> None:
    msg = config_error(tmp_path, "")
    assert "missing required key 'datasets'" in msg
    assert "base_model" not in msg  # only training needs it: the data commands read data with a tokenizer


def test_warmup_steps_and_ratio_together_are_refused(tmp_path: Path) -> None:
    msg = config_error(tmp_path, BASE + "warmup_steps: 10\nwarmup_ratio: 0.1\n")
    assert "warmup_steps or warmup_ratio, not both" in msg
    # either one alone is fine
    assert load_config(write(tmp_path, BASE + "warmup_steps: 10\n")).warmup_steps == 10
    assert load_config(write(tmp_path, BASE + "warmup_ratio: 0.1\n")).warmup_ratio == 0.1


def test_unknown_lora_target_module(tmp_path: Path) -> None:
    msg = config_error(tmp_path, BASE + "lora_target_modules: [q_proj, qkv_proj]\n")
    assert "lora_target_modules" in msg
    assert "qkv_proj" in msg
    assert "q_proj" in msg and "down_proj" in msg  # the allowed names are listed


def test_empty_lora_target_modules_only_matters_with_lora(tmp_path: Path) -> None:
    msg = config_error(tmp_path, BASE + "lora_target_modules: []\n")
    assert "lora_target_modules" in msg and "empty" in msg
    cfg = load_config(write(tmp_path, BASE + "lora_target_modules: []\nadapter: none\n"))
    assert cfg.adapter == "none"


# ---------------------------------------------------------------------- the file itself


def test_invalid_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    msg = config_error(tmp_path, BASE + "\tseed: 2\n")  # a tab on line 4
    assert msg == f"{tmp_path / 'run.yaml'}, line 4, column 1: not valid YAML: a tab character; YAML indents with " \
                  "spaces only"


def test_invalid_yaml_bad_indentation(tmp_path: Path) -> None:
    msg = config_error(tmp_path, BASE + "learning_rate: 0.1\n  seed: 2\n")
    assert "run.yaml, line 5, column 7: not valid YAML: an unexpected ':'" in msg and "indented deeper" in msg


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    msg = config_error(tmp_path, "- a\n- b\n")
    assert "top level must be a mapping" in msg and "list" in msg


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_a_directory_is_not_a_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path)


# ---------------------------------------------------------------------- overrides


def test_overrides_parse_numbers_bools_null_and_strings(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "warmup_steps: 5\nlora_r: 16\n")
    cfg = load_config(
        path,
        [
            "lora_r=8",
            "learning_rate=1e-3",
            "lora_dropout=0.05",
            "train_on_inputs=true",
            "sample_packing=false",
            "warmup_steps=null",  # clear the file's value so warmup_ratio may be set
            "warmup_ratio=0.2",
            "output_dir=runs/a=b",  # only the first '=' splits
            "max_steps=~",
        ],
    )
    assert cfg.lora_r == 8 and isinstance(cfg.lora_r, int)
    assert cfg.learning_rate == pytest.approx(1e-3)
    assert cfg.lora_dropout == pytest.approx(0.05)
    assert cfg.train_on_inputs is True
    assert cfg.sample_packing is False
    assert cfg.warmup_steps is None and cfg.warmup_ratio == pytest.approx(0.2)
    assert cfg.output_dir == "runs/a=b"
    assert cfg.max_steps is None


@settings(max_examples=60, deadline=None)
@given(name=st.one_of(st.integers(-10**6, 10**6).map(str), st.floats(allow_nan=True).map(str),
                      st.sampled_from(["0", "007", "0x10", "1_000", "1e3", "true", "no", "on", ".5", "0o17"])))
def test_overrides_of_text_keys_keep_the_text_as_typed(tmp_path_factory, name: str) -> None:
    """`output_dir=2024` was read as the number 2024 and refused; `output_dir=0x10` would have become 16."""
    path = write(tmp_path_factory.mktemp("c"), "base_model: m\ndatasets:\n  - path: a.jsonl\n")
    cfg = load_config(path, [f"output_dir={name}", f"datasets.0.path={name}", f"tokenizer={name}"])
    assert cfg.output_dir == name and cfg.datasets[0].path.endswith(name) and cfg.tokenizer.endswith(name)
    assert load_config(path, [f"lora_r={7}", "tokenizer=null"]).tokenizer is None  # typed keys still typed


def test_override_nested_dataset_field(tmp_path: Path) -> None:
    path = write(tmp_path, "base_model: m\ndatasets:\n  - path: a.jsonl\n  - path: b.jsonl\n")
    cfg = load_config(path, ["datasets.1.path=c.jsonl", "datasets.1.format=text"])
    assert [d.path for d in cfg.datasets] == ["a.jsonl", "c.jsonl"]
    assert [d.format for d in cfg.datasets] == ["auto", "text"]


def test_override_is_validated_like_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    with pytest.raises(ConfigError, match="key 'lora_r' has value 0; allowed: >= 1"):
        load_config(path, ["lora_r=0"])
    with pytest.raises(ConfigError, match="unknown key 'learning_rat'; did you mean 'learning_rate'"):
        load_config(path, ["learning_rat=0.1"])


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("lora_r", "is not key=value"),
        ("=3", "empty key"),
        ("datasets.3.path=x.jsonl", "cannot descend into '3'"),
        ("lora_r.x=1", "cannot"),
    ],
)
def test_bad_override(tmp_path: Path, override: str, fragment: str) -> None:
    msg = config_error(tmp_path, BASE + "lora_r: 4\n", (override,))
    assert fragment in msg
    assert override.split("=")[0] in msg or override.startswith("=")


def test_parse_override() -> None:
    assert parse_override("a.b=1") == (["a", "b"], 1)
    assert parse_override("x=") == (["x"], "")
    assert parse_override("x=[unclosed") == (["x"], "[unclosed")  # not YAML: kept as text


# ---------------------------------------------------------------------- relative paths


def test_relative_paths_are_resolved_against_the_config_folder(tmp_path: Path, monkeypatch) -> None:
    cfg_dir = tmp_path / "configs"
    (cfg_dir / "data").mkdir(parents=True)
    (cfg_dir / "data" / "train.jsonl").write_text("{}\n")
    (cfg_dir / "model").mkdir()
    path = write(
        cfg_dir,
        "base_model: model\ndatasets:\n  - path: data/train.jsonl\n  - path: data/missing.jsonl\n",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(Path("..") / "configs" / "run.yaml")
    assert Path(cfg.datasets[0].path).resolve() == (cfg_dir / "data" / "train.jsonl").resolve()
    assert Path(cfg.datasets[0].path).is_file()
    assert Path(cfg.base_model).resolve() == (cfg_dir / "model").resolve()
    # a path that exists nowhere is left as written, so the later error shows what the user typed
    assert cfg.datasets[1].path == "data/missing.jsonl"
    assert path.is_file()


def test_overridden_dataset_path_is_resolved_too(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "other.jsonl").write_text("{}\n")
    path = write(tmp_path / "cfg", BASE)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path, ["datasets.0.path=other.jsonl"])
    assert Path(cfg.datasets[0].path) == (tmp_path / "cfg" / "other.jsonl").resolve()


def test_config_from_dict_uses_the_source_name() -> None:
    with pytest.raises(ConfigError, match=r"^my-source: missing required key 'datasets'"):
        config_from_dict({"base_model": "m"}, source="my-source")


def test_docs_config_reference_is_current():
    """docs/config.md is generated from the schema; a key added without regenerating it fails here."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "scripts" / "config_reference.py"), "--check"], cwd=root)
    assert proc.returncode == 0, "run: python scripts/config_reference.py"
