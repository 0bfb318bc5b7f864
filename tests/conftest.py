"""Shared fixtures. Keep them generic: several test modules use this file."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from mistral_tune.models.mistral import MistralConfig, MistralForCausalLM, RMSNorm

# A tiny random Mistral (CPU, float32): hidden 64, 2 layers, 4 heads, 2 KV heads, vocab 1000.
TINY_MISTRAL = dict(
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rope_theta=10000.0,
)


def random_mistral(seed: int = 0, std: float = 0.1, **overrides) -> MistralForCausalLM:
    """Our model, random-init in eval mode. std 0.1 (not HF's 0.02) makes attention peaked enough
    that masking mistakes show in the logits; RMSNorm weights are random too, so they are exercised."""
    cfg = MistralConfig(**{**TINY_MISTRAL, **overrides})
    model = MistralForCausalLM(cfg)
    gen = torch.Generator().manual_seed(seed)
    model.init_weights(std=std, generator=gen)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.uniform_(0.5, 1.5, generator=gen)
    return model.eval()


def hf_mistral(cfg: MistralConfig, state_dict: dict[str, torch.Tensor], attn: str = "eager"):
    """transformers' MistralForCausalLM built from our config's HF form, holding the given weights."""
    import transformers

    hf_cfg = transformers.MistralConfig(**cfg.to_hf(), attn_implementation=attn)
    model = transformers.MistralForCausalLM(hf_cfg)
    model.load_state_dict(state_dict, strict=True)
    return model.float().eval()


@pytest.fixture
def make_tiny_mistral() -> Callable[..., MistralForCausalLM]:
    """Factory: make_tiny_mistral(seed=0, std=0.1, **MistralConfig overrides) -> our model (eval)."""
    return random_mistral


@pytest.fixture
def make_hf_mistral() -> Callable[..., object]:
    """Factory: make_hf_mistral(cfg, state_dict, attn='eager') -> transformers MistralForCausalLM (eval)."""
    return hf_mistral


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """A random-init tiny Mistral checkpoint on disk (HF format, v3 tokenizer file beside it):
    hidden 64, one layer, vocab 32768. Shared by the session: treat it as read-only."""
    from mistral_tune.quickstart import create_tiny_model

    out = tmp_path_factory.mktemp("tiny_model") / "model"
    return create_tiny_model(out, "v3", hidden_size=64, intermediate_size=128, num_hidden_layers=1)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory):
    """A finished LoRA run through the Python API (dict config): 4 steps on the tiny model, with a small
    evaluation (tasks, forgetting), so its adapter's card has data, hyper-parameters and evaluation.
    Shared by the session: read it, write new outputs elsewhere. Returns api.train's TrainResult."""
    from _runs import base_config, make_assets
    from mistral_tune import api
    from mistral_tune.quickstart import data_dir

    root = tmp_path_factory.mktemp("tiny_run")
    model, data = make_assets(root, n_records=16)
    evals = {"tasks": {"dataset": {"path": str(data)}, "max_samples": 2, "max_new_tokens": 2},
             "forgetting": {"dataset": {"path": str(data_dir() / "general.jsonl")}, "max_samples": 2,
                            "max_tokens": 16}}
    cfg = base_config(model, data, root / "run", max_steps=4, save_steps=None, eval=evals)
    return api.train(cfg, echo=lambda line: None)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module: a tiny model's one-token steps run many times faster alone than
    split across a busy machine's cores (`pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
