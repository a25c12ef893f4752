#!/usr/bin/env bash
# One GPU session on a fresh host without network: install without build isolation (builds the
# CUDA extension), record the environment, run the test suite (GPU tests included) and the
# dwconv_bn_act benchmark. Everything lands in OUT_DIR; the exit status is the tests'.
#   benchmarks/gpu_session.sh OUT_DIR [benchmark arguments, e.g. --quick]
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_session.sh OUT_DIR [benchmark arguments]}
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
python benchmarks/bench_dwconv_bn_act.py --out "$OUT" "$@" >"$OUT/bench.log" 2>&1
echo "benchmark exit status $?"; tail -25 "$OUT/bench.log"
exit $tests_rc
