"""AWQ export: a clear error without llm-compressor; with it and a GPU (a separate environment,
see docs/deploy.md), a tiny run quantized and loaded back by transformers."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from export_fixtures import tiny_adapter
from mistral_tune.cli import main
from mistral_tune.export.awq import calibration_ids
from mistral_tune.export.hf import merge_to_dir
from mistral_tune.quickstart import create_tiny_model, data_dir, write_config


def _run(tmp_path: Path) -> Path:
    # hidden 128 / intermediate 256: AWQ's 128-column groups need in_features divisible by 128.
    base = create_tiny_model(tmp_path / "base", "v3", num_hidden_layers=1)
    run = tmp_path / "run"
    tiny_adapter(base, run / "adapter")
    shutil.copy(write_config(tmp_path, base), run / "config.yaml")
    return run


def test_missing_llm_compressor_is_a_clear_error(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "llmcompressor", None)
    assert main(["export", "awq", str(tmp_path)]) == 2
    assert "pip install 'mistral-tune[awq]'" in capsys.readouterr().err


def test_calibration_uses_the_runs_training_data(tmp_path: Path) -> None:
    from mistral_tune.chat import load_tokenizer

    run = _run(tmp_path)
    tok = load_tokenizer("v3")
    ids = calibration_ids(run, tok, n=5, max_len=64)
    assert len(ids) == 5 and all(0 < len(x) <= 64 and x[0] == tok.bos_id for x in ids)
    # Each is a training conversation of the bundled quickstart data, formatted by mistral-common.
    lines = (data_dir() / "train.jsonl").read_text().splitlines()
    known = {tuple(tok.encode_chat(json.loads(line)["messages"])[0][:-1][:64]) for line in lines}
    assert all(tuple(x) in known for x in ids)


@pytest.mark.slow
def test_awq_on_a_tiny_run_loads_in_transformers(tmp_path: Path) -> None:
    pytest.importorskip("llmcompressor")
    pytest.importorskip("compressed_tensors")
    transformers = pytest.importorskip("transformers")
    if not torch.cuda.is_available():
        pytest.skip("llm-compressor's AWQ needs a GPU")
    run = _run(tmp_path)
    assert main(["export", "awq", str(run), "--out", str(tmp_path / "awq"), "--num-samples", "16",
                 "--max-seq-len", "64"]) == 0
    cfg = json.loads((tmp_path / "awq" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    assert (tmp_path / "awq" / "tokenizer.json").is_file() and (tmp_path / "awq" / "tokenizer.model.v3").is_file()
    ids = torch.tensor([[1, 3, 23325, 1504, 29493, 4, 1083, 1115, 5201]])
    quant = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "awq", device_map="cuda")
    merged = transformers.AutoModelForCausalLM.from_pretrained(merge_to_dir(run / "adapter", tmp_path / "merged"))
    with torch.no_grad():
        q, m = quant(ids.cuda()).logits.float().cpu(), merged(ids).logits.float()
    assert torch.isfinite(q).all()
    corr = float(torch.corrcoef(torch.stack([q.flatten(), m.flatten()]))[0, 1])
    top1 = float((q.argmax(-1) == m.argmax(-1)).float().mean())
    print(f"AWQ vs merged bf16 model: logits correlation {corr:.4f}, top-1 agreement {top1:.0%}")
    assert corr > 0.9
