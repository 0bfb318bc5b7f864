"""`serve --engine llama.cpp`: a GGUF export served by llama-cpp-python's OpenAI-compatible
server (its own FastAPI app, its own limits), on the same uvicorn runner and address defaults."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from .server import Server, ServerConfig

INSTALL = 'pip install "llama-cpp-python[server]"'


def find_gguf(path: Path) -> Path:
    """A .gguf file, or the one .gguf file in a directory."""
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) != 1:
            raise ConfigError(f"{path}: --engine llama.cpp needs a .gguf file; this directory has {len(found)} "
                              "(mistral-tune export gguf makes one)")
        return found[0]
    if path.suffix != ".gguf" or not path.is_file():
        raise ConfigError(f"{path}: --engine llama.cpp needs a .gguf file (mistral-tune export gguf makes one)")
    return path


def make_llama_server(gguf: Path, cfg: ServerConfig, name: str, n_ctx: int = 4096, sock=None) -> Server:
    try:
        from llama_cpp.server.app import create_app
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError as exc:
        raise ConfigError(f"--engine llama.cpp needs llama-cpp-python's server ({exc.name} is not installed): "
                          f"{INSTALL}") from None
    app = create_app(server_settings=ServerSettings(host=cfg.host, port=cfg.port, api_key=cfg.api_key),
                     model_settings=[ModelSettings(model=str(find_gguf(gguf)), model_alias=name, n_ctx=n_ctx,
                                                   n_gpu_layers=-1, verbose=False)])
    return Server(app, cfg, sock)
