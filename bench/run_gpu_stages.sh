#!/usr/bin/env bash
# One device call, several stages, each under its own time limit, each logged under $OUT; a table
# of the stages (exit code, seconds, log) last. On the device machine, from the repo root:
#
#   bash bench/run_gpu_stages.sh matrix decode-tests gpu-tests e2e ...
#
# Wheels carried in .whl/ (numpy 2.4.6, which numba-cuda needs, and the serve extra's packages)
# are installed into .site/ first, then the project itself without dependencies. Stages:
#   attention     bench_attention.py's table, then its pytest-benchmark suite (decode and prefill)
#   matrix        bench_attention.py --matrix --quick --variants  (decode kernels against SDPA)
#   matrix-defaults  bench_attention.py --matrix --quick             (the default launch only)
#   matrix-full   bench_attention.py --matrix                      (every shape)
#   decode-tests  the GPU decode tests (tests/kernels/test_gpu.py, test_decode_plan.py)
#   gpu-tests     every test marked gpu
#   some-tests    the tests marked gpu in the files $TESTS names
#   sampling      bench_sampling.py (the device draw against torch)
#   e2e           bench_e2e.py (the engine against HF transformers, greedy and sampled)
#   pressure      bench_pressure.py (swap / recompute / auto at 2x and 4x)
#   swap          bench_swap.py (small pages, batched calls, duplex)
#   serve         bench_serve.py (Poisson arrivals against pagemem serve; SERVE_ARGS: more flags)
#   validate      validate_simulator.py (calibrate, then simulator against the engine)
# STAGE_TIMEOUT_<name> (seconds) overrides a stage's limit. pytest runs with -o addopts=: no
# coverage tracing in GPU runs. Every stage runs even after one failed; the exit status is 1 when
# any stage failed. PAGEMEM_RAW_LAUNCH=0 in the environment relaunches kernels through Numba's
# dispatcher instead (to tell a launch fault from a kernel fault).
set -uo pipefail
OUT=${OUT:-/tmp/pagemem-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl
  export PYTHONPATH=$PWD/.site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
date -u +"%Y-%m-%d %H:%M UTC" | tee -a "$OUT/gpu.txt"
git log -1 --format="commit %h" 2>/dev/null | tee -a "$OUT/gpu.txt"
PYTEST=(python3 -m pytest -q -p no:cacheprovider -o addopts= -rfE)
declare -A LIMIT=([attention]=420 [matrix]=240 [matrix-defaults]=150 [matrix-full]=420 [decode-tests]=200 [gpu-tests]=420 [some-tests]=300 [sampling]=120 [e2e]=420
                  [pressure]=300 [swap]=150 [serve]=300 [validate]=300)
summary=()
failed=0
for stage in "$@"; do
  limit_var="STAGE_TIMEOUT_${stage//-/_}"
  limit=${!limit_var:-${LIMIT[$stage]:-300}}
  log="$OUT/$stage.log"
  t0=$(date +%s)
  case $stage in
    attention) cmd=(bash -c "python3 bench/bench_attention.py ${BENCH_ARGS:-} && ${PYTEST[*]} bench/bench_attention.py \
                   --benchmark-only --benchmark-json=$OUT/attention.json --benchmark-columns=mean,median,rounds") ;;
    matrix) cmd=(python3 bench/bench_attention.py --matrix --quick --variants "$OUT/matrix.json") ;;
    matrix-defaults) cmd=(python3 bench/bench_attention.py --matrix --quick "$OUT/matrix_defaults.json") ;;
    matrix-full) cmd=(python3 bench/bench_attention.py --matrix "$OUT/matrix_full.json") ;;
    decode-tests) cmd=("${PYTEST[@]}" tests/kernels/test_gpu.py tests/kernels/test_decode_plan.py -k "${DECODE_K:-decode or plan}" --timeout 120) ;;
    gpu-tests) cmd=("${PYTEST[@]}" -m gpu tests --timeout 150 --durations=10) ;;
    some-tests) cmd=("${PYTEST[@]}" -m gpu ${TESTS:?TESTS names the test files} --timeout 150 --durations=10) ;;
    sampling) cmd=(python3 bench/bench_sampling.py "$OUT/sampling.json") ;;
    e2e) cmd=(python3 -m pytest bench/bench_e2e.py --benchmark-only -s -p no:cacheprovider -o addopts= \
              --benchmark-json="$OUT/e2e.json" --benchmark-columns=mean,rounds) ;;
    pressure) cmd=(python3 bench/bench_pressure.py ${PRESSURE_ARGS:-} --json "$OUT/pressure.json") ;;
    swap) cmd=(python3 -m pytest bench/bench_swap.py --benchmark-only -s -p no:cacheprovider -o addopts= \
               --benchmark-json="$OUT/swap.json" --benchmark-columns=median,rounds) ;;
    serve) cmd=(python3 bench/bench_serve.py ${SERVE_ARGS:-} --no-progress --json "$OUT/serve.json") ;;
    validate) cmd=(python3 bench/validate_simulator.py --json "$OUT/validate.json") ;;
    *) echo "unknown stage $stage"; summary+=("$stage: unknown"); failed=1; continue ;;
  esac
  echo "### $stage (limit ${limit}s): ${cmd[*]}"
  timeout "$limit" "${cmd[@]}" > "$log" 2>&1
  rc=$?
  (( rc == 0 )) || failed=1
  tail -n "${TAIL_LINES:-25}" "$log"
  summary+=("$(printf '%-13s rc %-3s %4ss  %s' "$stage" "$rc" "$(( $(date +%s) - t0 ))" "$log")")
done
echo "### stages"
printf '%s\n' "${summary[@]}"
exit $failed
