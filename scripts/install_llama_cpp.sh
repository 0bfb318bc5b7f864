#!/usr/bin/env bash
# Install llama.cpp's Python binding (the reference that the GGUF tests check our files against).
# PyPI ships it as source only, and the CPU build takes 15-25 minutes on 2 cores, so the built
# wheel is kept in a cache folder and reused by later runs.
set -euo pipefail
PY=${PYTHON:-python3}
VERSION=${LLAMA_CPP_VERSION:-0.3.36}
CACHE=${MISTRAL_TUNE_WHEEL_CACHE:-$HOME/.cache/mistral-tune/wheels}
# `serve --engine llama.cpp` needs the binding's server extra (fastapi, sse-starlette, ...): pip adds
# those beside an installed binding without building it again.
extras() { "$PY" -m pip install -q "llama-cpp-python[server]==$VERSION" diskcache; }
if "$PY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
  extras
  exit 0
fi
mkdir -p "$CACHE"
wheel=$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
  echo "building llama-cpp-python $VERSION from source (CPU only; cached in $CACHE)"
  start=$(date +%s)
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DLLAMA_CURL=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "$PY" -m pip wheel -q --no-deps -w "$CACHE" "llama-cpp-python==$VERSION"
  echo "built in $(( $(date +%s) - start )) s"
  wheel=$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl | head -n 1)
fi
"$PY" -m pip install -q "$wheel"
extras
