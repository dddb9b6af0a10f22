#!/usr/bin/env bash
# Sets up a fresh machine: a virtual environment in .venv with torch, the package (editable, C++/CUDA extension
# built in place) and the test/bench/onnx extras. Safe to re-run, and quick when nothing changed: the package install
# is skipped while the build stamp (resnas_kernels/_build_stamp.py) matches. A changed csrc/ source or pyproject.toml
# re-runs the install, and ninja recompiles only the changed sources in build/ext, which keeps the objects between
# builds; a changed torch version, build switch (RESNAS_BUILD_EXT, RESNAS_*CUDA, TORCH_CUDA_ARCH_LIST, ...) or setup.py
# empties build/ext first (a clean build).
#   RESNAS_TORCH_SPEC     pip requirement(s) for torch (default: the versions this project is tested with)
#   RESNAS_BUILD_EXT=0    skip the C++/CUDA extension (reference + Triton paths only; set RESNAS_EXPECT_EXT=0 for tests)
#   RESNAS_CLEAN_BUILD=1  force a clean build (same as deleting build/ext)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${RESNAS_TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
EXTRAS=test,bench,onnx
# setup.py compiles into this directory instead of a fresh temporary one, so ninja can reuse its objects.
export RESNAS_BUILD_DIR=build/ext

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip "setuptools>=64" wheel ninja
fi
VENV_PY=.venv/bin/python
# Checked through the package metadata: importing torch would cost seconds on every re-run.
if ! "$VENV_PY" -c "import importlib.metadata as m; m.version('torch'); m.version('torchvision')" 2>/dev/null; then
  # shellcheck disable=SC2086
  "$VENV_PY" -m pip install --quiet $TORCH_SPEC
fi

stamp() { "$VENV_PY" resnas_kernels/_build_stamp.py "$1" --build-dir "$RESNAS_BUILD_DIR" --extras "$EXTRAS"; }
plan=$(stamp plan)
action=${plan%%$'\t'*}
why=${plan#*$'\t'}
if [ "${RESNAS_CLEAN_BUILD:-0}" = 1 ]; then
  action=clean why="RESNAS_CLEAN_BUILD=1"
fi
echo "setup: $action ($why)"
if [ "$action" != current ]; then
  if [ "$action" = clean ]; then
    rm -rf "$RESNAS_BUILD_DIR" resnas_kernels/_C.*.so
  fi
  "$VENV_PY" -m pip install --quiet "setuptools>=64" wheel ninja
  # --no-build-isolation: the extension must build against the torch installed above, not a freshly downloaded one.
  MAX_JOBS=${MAX_JOBS:-2} "$VENV_PY" -m pip install --no-build-isolation -e ".[$EXTRAS]"
  stamp record
fi
"$VENV_PY" -m resnas_kernels.cli info
