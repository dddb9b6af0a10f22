#!/usr/bin/env bash
# Sets up a fresh machine: a virtual environment in .venv with torch, the package (editable, C++/CUDA extension
# built in place) and the test/bench extras. Safe to re-run: existing pieces are reused.
#   RESNAS_TORCH_SPEC   pip requirement(s) for torch (default: the versions this project is tested with)
#   RESNAS_BUILD_EXT=0  skip the C++/CUDA extension (reference + Triton paths only; set RESNAS_EXPECT_EXT=0 for tests)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${RESNAS_TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
VENV_PY=.venv/bin/python
"$VENV_PY" -m pip install --quiet --upgrade pip "setuptools>=64" wheel ninja
if ! "$VENV_PY" -c "import torch, torchvision" 2>/dev/null; then
  # shellcheck disable=SC2086
  "$VENV_PY" -m pip install --quiet $TORCH_SPEC
fi
# --no-build-isolation: the extension must build against the torch installed above, not a freshly downloaded one.
MAX_JOBS=${MAX_JOBS:-2} "$VENV_PY" -m pip install --no-build-isolation -e ".[test,bench]"
"$VENV_PY" -m resnas_kernels.cli info
