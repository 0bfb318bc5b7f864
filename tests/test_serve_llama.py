"""`serve --engine llama.cpp`: our GGUF export served by llama-cpp-python's OpenAI server."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

from export_fixtures import tiny_model
from mistral_tune.errors import ConfigError
from mistral_tune.export.gguf import export_gguf
from mistral_tune.serve.llama_server import INSTALL, make_llama_server
from mistral_tune.serve.server import ServerConfig

openai = pytest.importorskip("openai")


def test_a_missing_llama_cpp_server_names_the_pip_command(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp.server.app", None)
    with pytest.raises(ConfigError, match=r"llama-cpp-python\[server\]") as info:
        make_llama_server(tmp_path / "m.gguf", ServerConfig(port=0), "m")
    assert INSTALL in str(info.value)


def test_llama_cpp_serves_our_gguf_export(tmp_path: Path) -> None:
    if os.environ.get("MISTRAL_TUNE_REQUIRE_LLAMA") == "1":  # CI: a missing server extra fails, not skips
        import llama_cpp.server.app  # noqa: F401
    else:
        pytest.importorskip("llama_cpp.server.app")
    model = tiny_model(tmp_path / "tiny", "v3", num_hidden_layers=2)
    out = export_gguf(model, tmp_path / "export" / "tiny.gguf", "f16")
    server = make_llama_server(out.parent, ServerConfig(host="127.0.0.1", port=0, api_key="k"), "tiny")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address
        client = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="k", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == ["tiny"]
        resp = client.completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=0)
        assert resp.usage.completion_tokens <= 4 and resp.choices[0].finish_reason in ("stop", "length")
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=3, stream=True)
        assert [c for c in chat if c.choices and c.choices[0].finish_reason]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="no", max_retries=0).models.list()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
