#!/usr/bin/env bash
# First contact with a GPU, in one command that fits a short lease (H200 / H100, under 8 minutes wall):
#   1. install: pip install --no-deps --no-build-isolation -e .  (CUDA for sm_90 only, all cores)
#   2. the GPU test tier (RESNAS_TEST_GPU=1 pytest -m gpu), stopping on nothing: every failure is listed
#   3. compute-sanitizer memcheck, then racecheck, over scripts/sanitize_kernels.py (every CUDA C++ and Triton kernel
#      once on small ragged shapes); a runtime on which the sanitizer refuses the device is reported, not fatal
#   4. supernet training img/s first (Tiny space, 4 groups x 64 images at 224 px, bf16: ours / masked / loop), then
#      the GPU benchmark cases at their GPU shapes against the peers, one bench module at a time (a slow module cannot
#      take the others down); CSV rows carry each kernel's fraction of its H200 lower bound (bench/bounds.py)
# Everything lands in OUT_DIR, at most 8 files, no sub-folders: log.txt (all output), summary.txt (what passed and
# failed, where the time went), cuda-<gpu>.csv (the benchmark rows) and up to 3 plots.
#
#   scripts/gpu_check.sh OUT_DIR            on the GPU machine, from the repository root
#   scripts/gpu_check.sh --dry-run OUT_DIR  here, on CPU: checks every precondition it can and prints the plan
#
# PYTHON picks the interpreter (default: python3, or .venv/bin/python when the repository has one).
set -u -o pipefail

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:?usage: scripts/gpu_check.sh [--dry-run] OUT_DIR}
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$OUT" || exit 2
PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi

TOTAL_BUDGET=475   # seconds for all steps; the lease allows 10 minutes per command; aim: 8 (time to rerun)
# step budgets (seconds); `timeout` enforces each, capped by what is left of TOTAL_BUDGET
B_INSTALL=140; B_TESTS=75; B_MEMCHECK=40; B_RACECHECK=40; B_SUPERNET_BF16=30; B_BENCH_MODULE=21
# the supernet img/s case the GPU is lent for, measured on its own before the per-module runs (a label glob: --case)
SUPERNET_BF16_CASE='supernet_train.train*tiny img=224 B=256 K=4 bfloat16*'
BENCH_MODULES="layer_norm linear attention rsr supernet_train vit_resnas levit"

LOG="$OUT/log.txt"; SUMMARY="$OUT/summary.txt"
: >"$LOG"; : >"$SUMMARY"
START=$(date +%s)
STATUS=0
TIMES=""

say() { echo "$*" | tee -a "$LOG"; }
note() { echo "$*" >>"$SUMMARY"; say "$*"; }

# run_step NAME BUDGET CMD...: runs CMD under `timeout`, logs it, records its time and outcome.
run_step() {
  local name=$1 budget=$2; shift 2
  local left=$((TOTAL_BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 5 ]; then note "SKIP  $name: the total budget of ${TOTAL_BUDGET}s is spent"; STATUS=1; return 1; fi
  [ "$budget" -gt "$left" ] && budget=$left
  say "=== $name (budget ${budget}s): $*"
  local t0=$(date +%s) rc
  timeout --kill-after=5 "$budget" "$@" >>"$LOG" 2>&1
  rc=$?
  local dt=$(($(date +%s) - t0))
  TIMES="$TIMES$(printf '  %-28s %4ds / %4ds  rc=%s' "$name" "$dt" "$budget" "$rc")\n"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then note "TIME  $name: killed after ${budget}s"; STATUS=1
  elif [ $rc -ne 0 ]; then note "FAIL  $name: exit $rc (see log.txt)"; STATUS=1
  else note "ok    $name (${dt}s)"; fi
  return $rc
}

plan() {
  say "plan (total budget ${TOTAL_BUDGET}s):"
  say "  1 install            ${B_INSTALL}s  TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=\$(nproc) pip install --no-deps --no-build-isolation -e ."
  say "  2 gpu tests          ${B_TESTS}s  RESNAS_TEST_GPU=1 pytest -m gpu -rfE (no -x)"
  say "  3 memcheck           ${B_MEMCHECK}s  compute-sanitizer --tool memcheck scripts/sanitize_kernels.py"
  say "  4 racecheck          ${B_RACECHECK}s  compute-sanitizer --tool racecheck scripts/sanitize_kernels.py"
  say "  5 supernet bf16      ${B_SUPERNET_BF16}s  bench --case '$SUPERNET_BF16_CASE'"
  say "  6 bench (per module) ${B_BENCH_MODULE}s each: $BENCH_MODULES"
}

# ---------------------------------------------------------------------------------------------------------------------
if [ $DRY -eq 1 ]; then
  plan
  say "dry run: checking preconditions with $PY"
  for tool in timeout "$PY" nvcc ninja compute-sanitizer nvidia-smi; do
    if command -v "$tool" >/dev/null 2>&1; then note "ok    command $tool"
    else
      case $tool in
        nvcc|compute-sanitizer|nvidia-smi|ninja) note "note  command $tool not found here (needed on the GPU machine)";;
        *) note "FAIL  command $tool not found"; STATUS=1;;
      esac
    fi
  done
  sum=$((B_INSTALL + B_TESTS + B_MEMCHECK + B_RACECHECK + B_SUPERNET_BF16
        + B_BENCH_MODULE * $(echo $BENCH_MODULES | wc -w)))
  if [ $sum -le 480 ] && [ $TOTAL_BUDGET -le 480 ]; then note "ok    step budgets sum to ${sum}s (<= 480s)"
  else note "FAIL  step budgets sum to ${sum}s, over 480s"; STATUS=1; fi
  # One Python process for the rest (imports are the slow part): versions, the gpu tests are collected, every bench
  # module yields cases, and the sanitizer workload runs on CPU tensors with the C++ CPU backend.
  run_step "python checks" 240 env -u TRITON_INTERPRET SUPERNET_BF16_CASE="$SUPERNET_BF16_CASE" \
    "$PY" - $BENCH_MODULES <<'PYEOF'
import glob, os, runpy, sys
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__)
bad = 0
from resnas_kernels.bench import cases as case_pkg
from resnas_kernels.bench.harness import Context
modules, errors = case_pkg.discover(only=sys.argv[1:])
for err in errors:
    print(f"FAIL  bench case file {err.module}: {err.error}"); bad += 1
for name in sys.argv[1:]:
    found = [m for m in modules if m.__name__.rsplit(".", 1)[-1] == name]
    listed = found[0].cases(Context(device=torch.device("cpu"), quick=True)) if found else []
    print(f"{'ok  ' if listed else 'FAIL'}  bench module {name}: {len(listed)} case(s) on CPU"); bad += not listed
from resnas_kernels.bench.cases import supernet_train
from resnas_kernels.bench.runner import case_selected
pattern = os.environ["SUPERNET_BF16_CASE"]
picked = [c for c in supernet_train.cases(Context(device=torch.device("cuda"), quick=False))
          if case_selected(c, [pattern])]  # lazy cases: listing them touches no GPU
print(f"{'ok  ' if len(picked) == 1 else 'FAIL'}  bench supernet bf16: {len(picked)} CUDA case(s) match {pattern!r}")
bad += len(picked) != 1
import pytest
gpu_files = [f for f in sorted(glob.glob("tests/test_*.py")) if "mark.gpu" in open(f).read()]
class Count:
    n = 0
    def pytest_collection_finish(self, session):
        Count.n = sum(1 for item in session.items if "gpu" in item.keywords)
pytest.main(["--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider", *gpu_files], plugins=[Count()])
print(f"{'ok  ' if Count.n else 'FAIL'}  {Count.n} gpu tests collected from {len(gpu_files)} files"); bad += not Count.n
sys.argv = ["sanitize_kernels.py", "--device", "cpu"]
try:
    runpy.run_path("scripts/sanitize_kernels.py", run_name="__main__")
except SystemExit as exc:
    bad += bool(exc.code)
sys.exit(1 if bad else 0)
PYEOF
  grep -E '^(ok  |FAIL)  (bench|[0-9]+ gpu tests)' "$LOG" >>"$SUMMARY"
  n=$(find "$OUT" -type f | wc -l)
  [ "$n" -le 8 ] && note "ok    $n files under $OUT (<= 8)" || { note "FAIL  $n files under $OUT"; STATUS=1; }
  printf "where the time went:\n$TIMES" | tee -a "$LOG" >>"$SUMMARY"
  note "dry run: $([ $STATUS -eq 0 ] && echo ok || echo FAILED)"
  exit $STATUS
fi

# ---------------------------------------------------------------------------------------------------------------------
plan
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv >>"$LOG" 2>&1
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr -c 'A-Za-z0-9\n' '-' | tr 'A-Z' 'a-z')
GPU=${GPU:-gpu}
note "gpu: $GPU; $(date -u +%FT%TZ); $($PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' 2>&1 | tail -1); $(nvcc --version 2>/dev/null | tail -2 | head -1)"

run_step install "$B_INSTALL" env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$(nproc)" RESNAS_FORCE_CUDA=1 \
  "$PY" -m pip install --no-deps --no-build-isolation -e .
"$PY" -m resnas_kernels.cli info >>"$LOG" 2>&1

run_step "gpu tests" "$B_TESTS" env RESNAS_TEST_GPU=1 "$PY" -m pytest -m gpu -q -rfE -p no:cacheprovider
grep -E '^(FAILED|ERROR) ' "$LOG" | sed 's/^/      /' >>"$SUMMARY"

for tool in memcheck racecheck; do
  budget=$B_MEMCHECK; [ $tool = racecheck ] && budget=$B_RACECHECK
  if ! command -v compute-sanitizer >/dev/null; then note "SKIP  $tool: compute-sanitizer not found"; continue; fi
  run_step "$tool" "$budget" compute-sanitizer --tool "$tool" --error-exitcode 9 "$PY" scripts/sanitize_kernels.py --device cuda
  if tail -50 "$LOG" | grep -qiE 'device not supported|unable to find injection|error 999'; then
    note "note  $tool: the sanitizer refused this device/runtime (a gVisor machine?): no sanitizer result"
  fi
done

BENCH_TMP=$(mktemp -d)
run_step "bench supernet bf16" "$B_SUPERNET_BF16" "$PY" -m resnas_kernels.cli bench --device cuda \
  --module supernet_train --case "$SUPERNET_BF16_CASE" --budget 0.2 --out "$BENCH_TMP/supernet_bf16"
for m in $BENCH_MODULES; do
  run_step "bench $m" "$B_BENCH_MODULE" "$PY" -m resnas_kernels.cli bench --device cuda --module "$m" \
    --budget 0.2 --out "$BENCH_TMP/$m"
done
# one CSV: the header of the first, the rows of all
CSV="$OUT/cuda-$GPU.csv"
first=1
for f in $(find "$BENCH_TMP" -name '*.csv' -not -path '*/baselines/*' | sort); do
  if [ $first -eq 1 ]; then cat "$f" >"$CSV"; first=0; else tail -n +2 "$f" >>"$CSV"; fi
done
[ $first -eq 1 ] && note "FAIL  no benchmark CSV was written"
find "$BENCH_TMP" -name '*.png' | head -3 | while read -r p; do cp "$p" "$OUT/$(basename "$(dirname "$p")")-$(basename "$p")"; done

printf "where the time went:\n$TIMES  total %ds\n" $(($(date +%s) - START)) | tee -a "$LOG" >>"$SUMMARY"
note "gpu_check: $([ $STATUS -eq 0 ] && echo 'everything passed' || echo 'something FAILED (see above)')"
exit $STATUS
