#!/usr/bin/env bash
# One device call: every GPU test, then the end-to-end benchmark; a short table last.
# On the device machine, from the repo root:  bash bench/run_gpu.sh [tests|e2e|all]
# A shorthand for bench/run_gpu_stages.sh (gpu-tests, e2e), which holds the set-up, the limits
# and the logs under $OUT; its exit status is 1 when any stage failed.
case ${1:-all} in
  tests) stages=(gpu-tests) ;;
  e2e) stages=(e2e) ;;
  all) stages=(gpu-tests e2e) ;;
  *) echo "usage: bash bench/run_gpu.sh [tests|e2e|all]" >&2; exit 2 ;;
esac
exec bash "$(dirname "$0")/run_gpu_stages.sh" "${stages[@]}"
