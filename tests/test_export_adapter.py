"""The PEFT adapter we write loads in PEFT and passes vLLM's LoRA-loader rules."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from export_fixtures import tiny_adapter, tiny_model
from mistral_tune.cli import main
from mistral_tune.errors import ModelError
from mistral_tune.export.adapter import export_adapter, min_max_lora_rank, vllm_adapter_problems

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("adapter")
    base = tiny_model(root / "base")
    return tiny_adapter(base, root / "adapter", r=4, alpha=8)


@torch.no_grad()
def test_adapter_loads_in_peft_with_its_rank_alpha_and_targets(adapter: Path) -> None:
    cfg = peft.LoraConfig.from_pretrained(adapter)
    assert (cfg.r, cfg.lora_alpha, cfg.modules_to_save, cfg.use_dora, cfg.bias) == (4, 8, None, False, "none")
    assert set(cfg.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    base_dir = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir), adapter)
    # Every tensor we wrote was loaded (PEFT warns, not fails, on missing keys; check ourselves).
    ours = load_file(str(adapter / "adapter_model.safetensors"))
    state = model.state_dict()
    for key, value in ours.items():
        peft_key = re.sub(r"\.lora_([AB])\.weight$", r".lora_\1.default.weight", key)
        torch.testing.assert_close(state[peft_key], value)
    assert vllm_adapter_problems(adapter) == []


def _broken(adapter: Path, tmp_path: Path, **changes) -> Path:
    out = tmp_path / "broken"
    shutil.copytree(adapter, out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg.update(changes)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"use_dora": True}, "DoRA"),
        ({"bias": "all"}, "bias"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, "embed_tokens"),
        ({"r": 8}, "does not match r=8"),
    ],
)
def test_vllm_rules_are_enforced(adapter: Path, tmp_path: Path, changes: dict, message: str) -> None:
    broken = _broken(adapter, tmp_path, **changes)
    assert any(message in p for p in vllm_adapter_problems(broken))
    with pytest.raises(ModelError, match="vLLM would not load"):
        export_adapter(broken)


def test_non_peft_tensor_names_are_refused(adapter: Path, tmp_path: Path) -> None:
    broken = _broken(adapter, tmp_path)
    tensors = load_file(str(broken / "adapter_model.safetensors"))
    save_file({k.replace(".lora_A.", ".lora_A.default."): v for k, v in tensors.items()},
              str(broken / "adapter_model.safetensors"))
    assert any("not a PEFT LoRA key" in p for p in vllm_adapter_problems(broken))


def _options(argv: list[str]) -> dict[str, str | None]:
    """`--flag value` / `--flag` pairs of a command line (the words after `vllm serve MODEL`)."""
    found: dict[str, str | None] = {}
    for i, word in enumerate(argv):
        if word.startswith("--"):
            found[word] = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None
    return found


def test_cli_export_adapter_copies_and_prints_the_vllm_command(adapter: Path, tmp_path: Path, capsys) -> None:
    shipped = tmp_path / "a folder with spaces" / "shipped"  # the printed line must survive the shell
    assert main(["export", "adapter", str(adapter), "--out", str(shipped)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("serve it: "))
    argv = shlex.split(line.removeprefix("serve it: "))
    assert argv[:2] == ["vllm", "serve"]
    options = _options(argv[3:])
    config = json.loads((shipped / "adapter_config.json").read_text())
    assert argv[2] == config["base_model_name_or_path"]
    name, _, path = options["--lora-modules"].partition("=")
    assert name == "tuned" and Path(path) == shipped.resolve() and (Path(path) / "adapter_model.safetensors").is_file()
    assert options["--max-lora-rank"] == "8" and "--enable-lora" in options
    # Every option of docs/deploy.md's LoRA example, with its value (the model and the path are the user's).
    docs = (Path(__file__).parents[1] / "docs" / "deploy.md").read_text()
    example = re.search(r"^vllm serve .*?--lora-modules.*?(?=\n\n|\n```)", docs, re.S | re.M).group(0)
    wanted = _options(shlex.split(re.sub(r"#[^\n]*", "", example).replace("\\\n", " "))[3:])
    assert wanted["--tokenizer-mode"] == "mistral"
    for flag, value in wanted.items():
        assert flag in options, f"docs/deploy.md serves with {flag}; `export adapter` does not print it"
        if flag not in ("--lora-modules", "--max-lora-rank"):
            assert options[flag] == value, flag
    assert min_max_lora_rank(16) == 16 and min_max_lora_rank(17) == 32 and min_max_lora_rank(1) == 1


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 600) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)
_KEYS = ["r", "lora_alpha", "target_modules", "target_parameters", "peft_type", "modules_to_save", "use_dora",
         "bias", "use_rslora", "trainable_token_indices"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(whole=st.none() | _JSON, fields=st.dictionaries(st.sampled_from(_KEYS), _JSON, max_size=4))
def test_any_adapter_config_gets_reasons_or_a_clear_error(adapter: Path, tmp_path_factory, whole, fields) -> None:
    """adapter_config.json holding any JSON (or our config with any value in its keys): the vLLM check
    returns reasons, and `export adapter` either passes or raises ModelError, never another exception."""
    out = tmp_path_factory.mktemp("fuzz") / "adapter"
    shutil.copytree(adapter, out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg.update(fields)
    (out / "adapter_config.json").write_text(json.dumps(cfg if whole is None else whole))
    problems = vllm_adapter_problems(out)
    assert isinstance(problems, list) and all(isinstance(p, str) for p in problems)
    if whole is not None and not isinstance(whole, dict):
        assert problems
    try:
        export_adapter(out, tmp_path_factory.mktemp("fuzz_out") / "out")
    except ModelError as exc:
        assert str(exc)
