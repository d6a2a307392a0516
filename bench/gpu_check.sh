#!/usr/bin/env bash
# The GPU check of issue 12: one prepared script for a lent GPU machine, at most ~6 minutes.
#   bash bench/gpu_check.sh OUTDIR
# 1. Fails loudly (exit 3) unless nvidia-smi and torch.cuda see a GPU.
# 2. Installs the carried wheels (bench/wheels, made by scripts/gpu_wheels.sh: pydantic and its
#    dependencies) into a private --target directory put on PYTHONPATH with the repo. Never torch:
#    the machine's own CUDA build is used. Ray and MLflow are not needed.
# 3. Runs the trainer's tests that need neither Ray nor MLflow with SCT_TEST_DEVICE=cuda.
# 4. Runs bench/gpu_bench.py in the time left.
# 5. Where the machine has several GPUs, bench/data_parallel.py: 1 GPU against all (otherwise says so).
# OUTDIR gets gpu_check.log (everything), env.txt, pytest.log, gpu_bench.json and gpu_bench.md.
# Exit status 0 only when CUDA was there, every test passed and every benchmark measurement ran.
# Env: PYTHON (default python3), CHECK_BUDGET_S (default 360, the whole script), TEST_TIMEOUT_S (150),
# CHECK_TESTS (test files instead of the list below), CPU_DRY_RUN=1 (no GPU: proves the plumbing on a
# CPU with SCT_TEST_DEVICE=cpu and gpu_bench --smoke; wheels are installed only if pydantic is absent).
set -uo pipefail

OUT=${1:?usage: bash bench/gpu_check.sh OUTDIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 3
PY=${PYTHON:-python3}
BUDGET=${CHECK_BUDGET_S:-360}
DRY=${CPU_DRY_RUN:-0}
WORK=$(mktemp -d /tmp/sct-gpu-check.XXXXXX)
SITE=$WORK/site

fail() { echo "GPU CHECK FAILED: $*" >&2; exit 3; }

check() {  # the body is not indented: it holds inline Python
echo "== gpu_check $(date -u '+%Y-%m-%d %H:%M:%S') UTC in $REPO -> $OUT"

# 1. A GPU, seen by the driver and by torch.
if [ "$DRY" = 1 ]; then
    echo "CPU DRY RUN: not a GPU check" | tee "$OUT/env.txt"
else
    command -v nvidia-smi >/dev/null || fail "nvidia-smi not found: this is not a GPU machine"
    {
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
        nvidia-smi
    } >"$OUT/env.txt" 2>&1 || fail "nvidia-smi failed (see env.txt)"
    head -2 "$OUT/env.txt"
    "$PY" -c "
import sys, torch
assert torch.cuda.is_available(), 'no CUDA'
print(f'python {sys.version.split()[0]} torch {torch.__version__} CUDA {torch.version.cuda} '
      f'cuDNN {torch.backends.cudnn.version()} {torch.cuda.get_device_name()}')
" || fail "torch.cuda.is_available() is False (or torch is missing) for $PY"
fi

# 2. The carried wheels, into a private directory (the machine cannot fetch anything).
if [ "$DRY" = 1 ] && "$PY" -c "import pydantic" 2>/dev/null; then
    echo "pydantic present: wheels not installed"
else
    ls bench/wheels/*.whl >/dev/null 2>&1 || fail "no wheels in bench/wheels: run scripts/gpu_wheels.sh, carry bench/wheels"
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
        --target "$SITE" bench/wheels/*.whl; then
        echo "pip failed: unpacking the wheels instead (a wheel is a zip of its site-packages files)"
        for w in bench/wheels/*.whl; do "$PY" -m zipfile -e "$w" "$SITE" || fail "cannot unpack $w"; done
    fi
fi
export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
DEVICE=cuda
[ "$DRY" = 1 ] && DEVICE=cpu
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg SCT_CACHE_DIR="$WORK/cache" SCT_TEST_DEVICE=$DEVICE
"$PY" -c "
import importlib, platform
for name in ['torch', 'numpy', 'pydantic', 'yaml', 'pytest', 'sklearn', 'matplotlib', 'triton']:
    try:
        m = importlib.import_module(name)
        print(f'{name} {getattr(m, \"__version__\", \"?\")} {getattr(m, \"__file__\", \"\")}')
    except ImportError as e:
        print(f'{name} MISSING ({e})')
import trainer.train  # the whole trainer imports with these packages
print('trainer imports OK on Python', platform.python_version())
" >>"$OUT/env.txt" 2>&1 || fail "the trainer does not import (see env.txt)"
grep -E "^(torch|pydantic|yaml|pytest|sklearn|trainer) " "$OUT/env.txt"
grep -q "^pytest MISSING" "$OUT/env.txt" && fail "pytest is missing on this machine: carry its wheel in bench/wheels"

# 3. The trainer's tests (no Ray, no MLflow): device-generic ones on $DEVICE, cuda-marked ones where CUDA is.
TESTS=(tests/test_runtime.py tests/test_precond.py tests/test_schedule.py tests/test_target.py tests/test_loss.py
       tests/test_sampler.py tests/test_ema_checkpoint.py tests/test_networks.py)
[ -n "${CHECK_TESTS:-}" ] && read -r -a TESTS <<<"$CHECK_TESTS"
if grep -q "^sklearn MISSING" "$OUT/env.txt"; then
    echo "scikit-learn missing: tests/test_target.py (digits) left out; the digits tests of test_runtime skip"
    TESTS=("${TESTS[@]/tests\/test_target.py/}")
fi
echo "== pytest (SCT_TEST_DEVICE=$DEVICE) at ${SECONDS}s: ${TESTS[*]}"
# shellcheck disable=SC2068  # an entry emptied above must vanish
timeout "${TEST_TIMEOUT_S:-150}" "$PY" -m pytest -q -p no:cacheprovider --durations=8 ${TESTS[@]} 2>&1 |
    tee "$OUT/pytest.log"
TESTS_RC=${PIPESTATUS[0]}
echo "== pytest exit $TESTS_RC at ${SECONDS}s"

# 4. The benchmark in the time left (it stops starting measurements at its budget; timeout is the backstop).
LEFT=$((BUDGET - SECONDS - 15))
BENCH_BUDGET=$((LEFT - 20 < 270 ? LEFT - 20 : 270))
SMOKE=()
[ "$DRY" = 1 ] && SMOKE=(--smoke --device cpu)
echo "== gpu_bench ${SMOKE[*]} budget ${BENCH_BUDGET}s (hard limit ${LEFT}s) at ${SECONDS}s"
if [ "$BENCH_BUDGET" -lt 60 ] && [ "$DRY" != 1 ]; then
    echo "not enough time left for the benchmark"
    BENCH_RC=124
else
    timeout "$LEFT" "$PY" bench/gpu_bench.py "$OUT" --budget-s "$BENCH_BUDGET" "${SMOKE[@]}"
    BENCH_RC=$?
fi

# 5. Data-parallel scaling, 1 GPU against all of them (issue 25), where the machine has several.
NGPU=$( [ "$DRY" = 1 ] && echo 1 || nvidia-smi -L 2>/dev/null | grep -c '^GPU' )
if [ "$NGPU" -gt 1 ]; then
    echo "== data_parallel: 1 vs $NGPU GPUs at ${SECONDS}s"
    timeout 120 "$PY" bench/data_parallel.py --device cuda --workers "$NGPU" --channels 128 --batch 512 \
        --steps 20 --rounds 3 | tee "$OUT/data_parallel.txt"
else
    echo "== data_parallel: this machine has $NGPU GPU: multi-GPU scaling not measured" | tee "$OUT/data_parallel.txt"
fi

echo "== gpu_check done in ${SECONDS}s: pytest exit $TESTS_RC, gpu_bench exit $BENCH_RC (124 = timed out)"
tail -3 "$OUT/pytest.log"
[ "$TESTS_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ]
}

check 2>&1 | tee -a "$OUT/gpu_check.log"
RC=${PIPESTATUS[0]}
rm -rf "$WORK"
exit "$RC"
