#!/usr/bin/env bash
# One device call: GPU kernel tests at real sizes, then the attention bench table. If the tests
# fail with CuPy relaunches, they and the bench run again with PAGEMEM_RAW_LAUNCH=0.
# Usage (device machine, repo root): bash bench/run_gpu_kernels.sh   (logs under ${OUT:-/tmp})
# Every stage runs and prints its table or tail; the script exits 1 when any test run or bench
# stage failed (a pass of the PAGEMEM_RAW_LAUNCH=0 retry does not hide the first failure).
# pytest runs with -o addopts=-ra: no coverage tracing in GPU runs (it would slow what they time),
# and no dependence on pytest-cov being installed on the device machine.
set -uo pipefail
OUT=${OUT:-/tmp}
export PYTHONUNBUFFERED=1
failed=()
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
date -u | tee -a "$OUT/gpu.txt"
run_tests() { timeout ${TEST_TIMEOUT:-200} python3 -m pytest tests/kernels/test_gpu.py -q -x -p no:cacheprovider -o addopts=-ra 2>&1 | tee "$OUT/tests$1.log" | tail -25; }
if ! run_tests ""; then
    failed+=("kernel tests with CuPy relaunch (log $OUT/tests.log)")
    echo "### tests failed with CuPy relaunch; retrying with PAGEMEM_RAW_LAUNCH=0"
    export PAGEMEM_RAW_LAUNCH=0
    run_tests "_numba_launch" || failed+=("kernel tests with Numba launch (log $OUT/tests_numba_launch.log)")
fi
timeout ${BENCH_TIMEOUT:-300} python3 bench/bench_attention.py ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.txt" \
    || failed+=("bench_attention.py table (rc ${PIPESTATUS[0]})")
timeout ${PYTEST_BENCH_TIMEOUT:-150} python3 -m pytest bench/bench_attention.py -q -p no:cacheprovider -o addopts=-ra \
    --benchmark-json="$OUT/bench.json" --benchmark-columns=mean,median,rounds 2>&1 | tail -30 \
    || failed+=("bench_attention.py under pytest (rc ${PIPESTATUS[0]})")
if (( ${#failed[@]} )); then
  printf 'FAILED: %s\n' "${failed[@]}"
  exit 1
fi
