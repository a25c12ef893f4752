#!/usr/bin/env bash
# One GPU session on a fresh host without network: install without build isolation (builds the
# CUDA extension when nvcc is there), record the environment, run the test suite (GPU tests
# included), then the benchmarks. Logs, junit XML and results JSON land in OUT_DIR; the exit
# status is the tests'.
#   benchmarks/gpu_session.sh OUT_DIR [pytest arguments for the benchmarks, e.g. --bench-scope quick -k dwconv]
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_session.sh OUT_DIR [pytest arguments for the benchmarks]}
shift
mkdir -p "$OUT"
if ! MOBILEOPS_BUILD_CUDA=1 pip install --no-build-isolation --no-deps -e . >"$OUT/install.log" 2>&1; then
    echo "install failed:"; tail -40 "$OUT/install.log"; exit 1
fi
python -m mobileops check 2>&1 | tee "$OUT/check.txt"
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
python -m pytest tests -q -p no:cacheprovider --junitxml="$OUT/tests.xml" >"$OUT/tests.log" 2>&1
tests_rc=$?
tail -25 "$OUT/tests.log"
python -m pytest benchmarks -q -p no:cacheprovider --bench-out "$OUT" --benchmark-json="$OUT/pytest-benchmark.json" \
    "$@" >"$OUT/bench.log" 2>&1
echo "benchmarks exit status $?"; grep -E "passed|failed|error" "$OUT/bench.log" | tail -5
python benchmarks/render.py "$OUT"/*-20*.json >>"$OUT/bench.log" 2>&1 && cp benchmarks/RESULTS.md "$OUT/"
exit $tests_rc
