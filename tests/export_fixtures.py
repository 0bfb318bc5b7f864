"""Tiny models and adapters shared by the export/serve tests (imported, not a conftest)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from mistral_tune.chat import load_tokenizer
from mistral_tune.models.load import load_model
from mistral_tune.models.lora import LoraSpec, apply_lora
from mistral_tune.models.peft_format import save_adapter
from mistral_tune.quickstart import create_tiny_model
from mistral_tune.serve.server import ServerConfig, make_server

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1)


def tiny_model(out: Path, tokenizer: str = "v3", **overrides) -> Path:
    return create_tiny_model(out, tokenizer, **{**TINY, **overrides})


def tiny_adapter(base_dir: Path, out: Path, r: int = 4, alpha: float = 8, seed: int = 1, **spec) -> Path:
    """A PEFT adapter for base_dir with non-zero B (a fresh adapter would merge to the base); spec: more
    LoraSpec fields (target_modules, use_dora, ...)."""
    model, _ = load_model(str(base_dir))
    spec = LoraSpec(r=r, alpha=alpha, **spec)
    apply_lora(model, spec, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_adapter(model, spec, out, base_model=str(base_dir))
    load_tokenizer(None, base_dir).save(out)
    return out


def running_server(loaded, **cfg) -> Iterator[tuple[str, int]]:
    """A generator for fixtures: our server on 127.0.0.1 (an ephemeral port) in a thread, yielding
    (host, port), shut down afterwards."""
    server = make_server(loaded, ServerConfig(host="127.0.0.1", port=0, **cfg))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[:2]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
