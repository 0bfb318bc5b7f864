"""Shared pieces of the reliability tests: a tiny model, a small dataset, configs, reading metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from mistral_tune.config import config_from_dict
from mistral_tune.quickstart import create_tiny_model, data_dir

# One thread: on a small shared machine two threads of tiny matmuls spin against other processes
# (10x slower here), and the subprocess runs these tests compare with use one thread too.
torch.set_num_threads(1)

SRC = Path(__file__).resolve().parents[1] / "src"
COMPARED = ("step", "epoch", "loss", "lr", "grad_norm", "trained_tokens", "skipped", "eval_loss", "event")


def make_assets(root: Path, n_records: int = 64) -> tuple[Path, Path]:
    """(tiny model dir, dataset path): 1 layer, hidden 64, v3 tokenizer; the first records of the quickstart."""
    model = root / "model"
    if not (model / "config.json").is_file():
        create_tiny_model(model, "v3", hidden_size=64, intermediate_size=128, num_hidden_layers=1)
    lines = (data_dir() / "train.jsonl").read_text().splitlines()[:n_records]
    data = root / "train.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return model, data


def base_config(model: Path, data: Path, out: Path, **overrides) -> dict:
    cfg = dict(base_model=str(model), datasets=[{"path": str(data), "format": "messages"}], sequence_len=64,
               micro_batch_size=2, lora_r=4, lora_alpha=8, learning_rate=1e-2, warmup_steps=3,
               max_steps=20, logging_steps=1, save_steps=5, output_dir=str(out), seed=7)
    cfg.update(overrides)
    return cfg


def config(model: Path, data: Path, out: Path, **overrides):
    return config_from_dict(base_config(model, data, out, **overrides))


def write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def metrics(out: Path) -> list[dict]:
    """The metrics.jsonl lines with the fields that must repeat exactly (timings dropped)."""
    rows = []
    for line in (Path(out) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rows.append({k: rec[k] for k in COMPARED if k in rec})
    return rows


def tensors(path: Path) -> dict:
    return load_file(str(path))


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].equal(b[k]) for k in a)


def cli(*args: str, **popen) -> subprocess.Popen:
    """The CLI in a subprocess, on these sources, one CPU thread (bit-identical runs need a fixed thread count)."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "mistral_tune.cli", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)
