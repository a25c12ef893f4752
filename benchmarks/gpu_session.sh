#!/usr/bin/env bash
# One GPU session on a fresh host without network, sized for one 10-minute call: install
# without build isolation (builds the CUDA extension for MOBILEOPS_CUDA_ARCHS, default 90),
# record the environment, run the test suite (GPU tests included) and then the benchmarks,
# each under its own time limit. At most nine files land in OUT_DIR (env.txt, install.log,
# tests.log, tests.xml, profile.txt, profile_step.txt, host_overhead.jsonl, bench.log and the results JSON,
# which is rewritten after every case so a benchmark stopped at its limit keeps what it
# measured). The exit status is the tests'.
#
#   benchmarks/gpu_session.sh OUT_DIR [pytest arguments for the benchmarks]
#
# Environment: PROFILE_ARGS   arguments for benchmarks/profile_case.py (unset: no profile)
#              STEP_PROFILE   arguments for benchmarks/profile_step.py into profile_step.txt (unset: none;
#                             "default": both detectors' eager step, b32 640 fp16, then mobileops on triton;
#                             up to 240 s more: lower TESTS_TIMEOUT / BENCH_TIMEOUT to stay in one call)
#              HOST_OVERHEAD  1: benchmarks/host_overhead.py --real into host_overhead.jsonl (twice:
#                             with and without the direct Triton launch)
#              SESSION_TESTS  pytest arguments for the tests ("tests": tests/test_large_tensors.py
#                             alone first, then the rest in parallel; "reliability": the same
#                             file first, then tests/test_properties.py; "none" skips them)
#              MOBILEOPS_HYPOTHESIS_EXAMPLES  examples per property test (tests/test_properties.py)
#              TESTS_TIMEOUT  seconds for the tests (300)     BENCH_TIMEOUT seconds (240; 0 skips)
#              TEST_WORKERS   pytest-xdist workers (8)   TEST_TIMEOUT seconds per test (120)
#              SESSION_ORDER  "tests benchmarks" (default) or "benchmarks tests"
#              BENCH_FILES    benchmark files in the order to run ("benchmarks")
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_session.sh OUT_DIR [pytest arguments for the benchmarks]}
shift
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SESSION_TESTS=${SESSION_TESTS:-tests}
began=$SECONDS

if ! MOBILEOPS_CUDA_ARCHS=${MOBILEOPS_CUDA_ARCHS:-90} MOBILEOPS_BUILD_CUDA=1 \
        python -m pip install --no-build-isolation --no-deps -e . >"$OUT/install.log" 2>&1; then
    echo "install failed:"; tail -40 "$OUT/install.log"; exit 1
fi
echo "installed in $((SECONDS - began)) s"
{ python -m mobileops check; nvidia-smi; python -m pip list 2>/dev/null | grep -iE "^(torch|triton|numpy) "; } \
    >"$OUT/env.txt" 2>&1
head -30 "$OUT/env.txt"

if [ -n "${PROFILE_ARGS:-}" ]; then
    # shellcheck disable=SC2086
    timeout -s INT "${PROFILE_TIMEOUT:-150}" python benchmarks/profile_case.py $PROFILE_ARGS >"$OUT/profile.txt" 2>&1
    echo "profile done at $((SECONDS - began)) s"
fi

if [ -n "${STEP_PROFILE:-}" ]; then
    if [ "$STEP_PROFILE" = "default" ]; then
        timeout -s INT 120 python benchmarks/profile_step.py >"$OUT/profile_step.txt" 2>&1
        timeout -s INT 120 python benchmarks/profile_step.py --blocks mobileops --backend triton >>"$OUT/profile_step.txt" 2>&1
    else
        # shellcheck disable=SC2086
        timeout -s INT 180 python benchmarks/profile_step.py $STEP_PROFILE >"$OUT/profile_step.txt" 2>&1
    fi
    echo "step profile done at $((SECONDS - began)) s"; grep -v '^{' "$OUT/profile_step.txt" | cut -c1-200
fi

if [ "${HOST_OVERHEAD:-0}" = "1" ]; then
    MOBILEOPS_AUTOTUNE=0 timeout -s INT 180 python benchmarks/host_overhead.py --real >"$OUT/host_overhead.jsonl" 2>&1
    # the same without kernels/_launch.py's direct launch (rows say fast_launch: false)
    MOBILEOPS_TRITON_FAST_LAUNCH=0 MOBILEOPS_AUTOTUNE=0 timeout -s INT 180 python benchmarks/host_overhead.py --real \
        >>"$OUT/host_overhead.jsonl" 2>&1
    echo "host overhead done at $((SECONDS - began)) s"; cut -c1-400 "$OUT/host_overhead.jsonl"
fi

tests_rc=0
run_tests() {
    local suite=$SESSION_TESTS
    : >"$OUT/tests.log"
    if [ "$SESSION_TESTS" = "tests" ] || [ "$SESSION_TESTS" = "reliability" ]; then
        # The >2**31-element tests hold ~40 GiB each: alone, before the parallel suite (two at
        # once in xdist workers would run out of memory). Their output opens tests.log. Blocking
        # launches make a faulting kernel's own launch report the error (named by op and pass).
        CUDA_LAUNCH_BLOCKING=1 MOBILEOPS_AUTOTUNE=0 timeout -s INT 240 python -m pytest tests/test_large_tensors.py -q -rfE \
            -p no:cacheprovider -p no:benchmark >>"$OUT/tests.log" 2>&1
        grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | cut -c1-300
        suite="tests --ignore=tests/test_large_tensors.py"
        [ "$SESSION_TESTS" = "reliability" ] && suite="tests/test_properties.py"
    fi
    if [ "$SESSION_TESTS" != "none" ]; then
        # One fixed kernel configuration per launch: the tests check numbers, not tuning, and
        # autotuning every variant would spend the call compiling.
        # shellcheck disable=SC2086
        # One inductor compile thread and one intra-op CPU thread per worker: xdist workers that
        # each spawn a full pool oversubscribe the host's cores many times over (float64 CPU
        # block tests took 120 s each on the H100 host without OMP_NUM_THREADS=1).
        MOBILEOPS_AUTOTUNE=0 TORCHINDUCTOR_COMPILE_THREADS=1 OMP_NUM_THREADS=1 timeout -s INT "${TESTS_TIMEOUT:-300}" \
            python -m pytest $suite -q -rfE --timeout "${TEST_TIMEOUT:-120}" -n "${TEST_WORKERS:-8}" -p no:cacheprovider -p no:benchmark --durations=15 --junitxml="$OUT/tests.xml" \
            >>"$OUT/tests.log" 2>&1
        tests_rc=$?
        [ "$tests_rc" -eq 124 ] || [ "$tests_rc" -eq 2 ] && echo "tests stopped at their time limit (or interrupted)"
        grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | cut -c1-300 | head -40
        tail -3 "$OUT/tests.log"
        echo "tests done at $((SECONDS - began)) s"
    fi
}

run_benchmarks() {
    if [ "${BENCH_TIMEOUT:-240}" != "0" ]; then  # (BENCH_TIMEOUT=0 skips)
        # shellcheck disable=SC2086
        timeout -s INT "${BENCH_TIMEOUT:-240}" python -m pytest ${BENCH_FILES:-benchmarks} -q -p no:cacheprovider --bench-out "$OUT" \
            "$@" >"$OUT/bench.log" 2>&1
        bench_rc=$?
        [ "$bench_rc" -eq 124 ] && echo "benchmarks stopped at their time limit"
        echo "benchmarks exit status $bench_rc at $((SECONDS - began)) s"
        grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/bench.log" | cut -c1-220 | tail -12
        python -c 'import json, sys, pathlib
from mobileops.bench import run
for path in sorted(pathlib.Path(sys.argv[1]).glob("*-20*.json")):
    print(run.summary_table(json.loads(path.read_text())["rows"]))' "$OUT"
    fi
}

for step in ${SESSION_ORDER:-tests benchmarks}; do
    "run_$step" "$@"
done
exit $tests_rc
