#!/usr/bin/env bash
# Install mistral-tune, its test tools and the evaluation extra (lm-evaluation-harness) into the
# current Python environment.
# torch is installed first and pinned to the CPU build when no torch is present, because an
# unpinned `torch` pulls several GB of CUDA wheels; a torch that is already there (a CUDA build
# on a GPU machine, say) is kept as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
"$PY" -m pip install -q -e ".[test,eval]"
"$PY" -c "import torch, mistral_tune; print('mistral-tune', mistral_tune.__version__, 'with torch', torch.__version__)"
