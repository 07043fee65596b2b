#!/usr/bin/env bash
# One device call: GPU kernel tests at real sizes, then the attention bench table.
# Usage (device machine, repo root): bash bench/run_gpu_kernels.sh   (logs under ${OUT:-/tmp})
set -o pipefail
OUT=${OUT:-/tmp}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
date -u | tee -a "$OUT/gpu.txt"
timeout ${TEST_TIMEOUT:-200} python3 -m pytest tests/kernels/test_gpu.py -q -x -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -25
timeout ${BENCH_TIMEOUT:-300} python3 bench/bench_attention.py ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.txt"
