"""Merged HF model: transformers and PEFT must read what `merge` writes, and the HF tokenizer's
chat template must give mistral-common's ids."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from safetensors import safe_open

from export_fixtures import tiny_adapter, tiny_model
from mistral_tune.cli import main
from mistral_tune.errors import ModelError
from mistral_tune.export.hf import merge_to_dir, parse_size

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CONVERSATIONS = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
    ],
    [
        {"role": "system", "content": "You are a pirate.\nSpeak like one."},
        {"role": "user", "content": "Hello there,  how are you?"},
        {"role": "assistant", "content": " I be fine, matey.\n\nAnd ye?"},
        {"role": "user", "content": "Tell me: what's 10 * 3? Ünïcödé 日本語 🙂\ttab"},
        {"role": "assistant", "content": "30"},
        {"role": "user", "content": "thanks"},
    ],
    [{"role": "user", "content": "no system prompt here"}],
]


@functools.lru_cache(maxsize=4)
def _reference(source: Path) -> MistralTokenizer:
    return MistralTokenizer.from_file(source)


def _mistral_common_ids(source: Path, conv: list[dict]) -> list[int]:
    cls = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(messages=[cls[m["role"]](content=m["content"]) for m in conv])
    return _reference(source).encode_chat_completion(request).tokens


def _hf_ids(hf_tok, conv: list[dict]) -> list[int]:
    out = hf_tok.apply_chat_template(conv, tokenize=True, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("merge")
    base = tiny_model(root / "base", "v3")
    return base, tiny_adapter(base, root / "adapter")


@torch.no_grad()
def test_merged_model_loads_in_transformers_and_matches_peft(base_and_adapter, tmp_path: Path) -> None:
    base, adapter = base_and_adapter
    # 3 MB shards force a split: each embedding matrix alone is 32768 x 64 x 4 bytes = 8 MB, so
    # shards hold one big tensor each (HF does the same) and the small ones share.
    out = merge_to_dir(adapter, tmp_path / "merged", dtype="float32", max_shard_bytes=3_000_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]
        nbytes = sum(4 * torch.Size(s).numel() for s in sizes)
        assert nbytes <= 3_000_000 or len(sizes) == 1
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "tokenizer.model.v3", "chat_template.jinja"):
        assert (out / name).is_file(), name

    ids = torch.tensor([[1, 3, 23325, 1504, 29493, 4, 1083, 1115]])
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    reference = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter
    )
    plain = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    got, want, before = merged(ids).logits, reference(ids).logits, plain(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (want - before).abs().max() > 1e-3  # the adapter changed something worth checking

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for conv in CONVERSATIONS:
        assert _hf_ids(hf_tok, conv) == _mistral_common_ids(out / "tokenizer.model.v3", conv)


def test_cli_merge_bf16_and_fp16(base_and_adapter, tmp_path: Path) -> None:
    _, adapter = base_and_adapter
    for flag, torch_dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        out = tmp_path / flag
        assert main(["merge", str(adapter), "--out", str(out), "--dtype", flag]) == 0
        assert json.loads((out / "config.json").read_text())["torch_dtype"] == str(torch_dtype).removeprefix("torch.")
        with safe_open(str(out / "model.safetensors"), framework="pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch_dtype}
        model = transformers.AutoModelForCausalLM.from_pretrained(out)
        assert model.dtype == torch_dtype
    assert not list(tmp_path.glob(".*tmp*"))  # nothing half-written left behind


def test_merge_errors_are_user_errors(base_and_adapter, tmp_path: Path, capsys) -> None:
    _, adapter = base_and_adapter
    with pytest.raises(ModelError, match="dtype"):
        merge_to_dir(adapter, tmp_path / "x", dtype="int8")
    assert main(["merge", str(tmp_path / "nothing")]) == 2
    assert "neither an adapter directory" in capsys.readouterr().err
    assert parse_size("5GB") == 5_000_000_000 and parse_size("2GiB") == 2 * 1024**3 and parse_size("1234") == 1234
    with pytest.raises(ModelError):
        parse_size("lots")
