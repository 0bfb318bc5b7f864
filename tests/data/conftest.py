"""Shared helpers for the data tests: a real (bundled) tokenizer and tiny configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from mistral_tune.chat import load_tokenizer
from mistral_tune.config import config_from_dict


@pytest.fixture(scope="session")
def tok():
    return load_tokenizer("v3")


@pytest.fixture
def make_cfg(tmp_path: Path):
    """A Config for the given datasets; cache in the test's own folder, one worker unless asked."""

    def make(datasets, **overrides):
        data = {
            "base_model": "unused",
            "datasets": [d if isinstance(d, dict) else {"path": str(d)} for d in datasets],
            "sequence_len": 128,
            "dataset_cache_dir": str(tmp_path / "cache"),
            "dataset_num_workers": 1,
            **overrides,
        }
        return config_from_dict(data)

    return make
