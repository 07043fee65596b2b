#!/usr/bin/env bash
# One device call: every GPU test, then the end-to-end benchmark; a short table last.
# On the device machine, from the repo root:  bash bench/run_gpu.sh [tests|e2e|all]
# Logs and JSON go under $OUT (default /tmp/pagemem-gpu). Every stage runs and prints its tail
# even after an earlier one failed; the script exits 1 when any stage failed (tests or bench).
# pytest runs with -o addopts=-ra: no coverage tracing in GPU runs (it would slow what they time),
# and no dependence on pytest-cov being installed on the device machine.
set -uo pipefail
OUT=${OUT:-/tmp/pagemem-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
what=${1:-all}
failed=()
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
date -u +"%Y-%m-%d %H:%M UTC" | tee -a "$OUT/gpu.txt"
if [[ $what == tests || $what == all ]]; then
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest -m gpu tests -q -p no:cacheprovider -o addopts=-ra -x 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -15 || failed+=("gpu tests (rc ${PIPESTATUS[0]}, log $OUT/gpu_tests.log)")
fi
if [[ $what == e2e || $what == all ]]; then
  timeout ${E2E_TIMEOUT:-420} python3 -m pytest bench/bench_e2e.py --benchmark-only -s -p no:cacheprovider -o addopts=-ra \
    --benchmark-json="$OUT/e2e.json" --benchmark-columns=mean,rounds 2>&1 | tee "$OUT/e2e.log" | tail -30 \
    || failed+=("e2e bench (rc ${PIPESTATUS[0]}, log $OUT/e2e.log)")
fi
if (( ${#failed[@]} )); then
  printf 'FAILED: %s\n' "${failed[@]}"
  exit 1
fi
