"""The direct Triton launch of mobileops.kernels._launch.

Under the interpreter (this process: TRITON_INTERPRET=1) every launch takes Triton's own path.
The compiled path runs in a subprocess without TRITON_INTERPRET, with the stand-in CUDA sm_90
driver of benchmarks/triton_launch_path.py: Triton really compiles the kernels (ptxas), and
the launcher records its arguments. There each scenario launches a call through Triton's path
and through the fast path and compares what the launcher got; a call with other assumptions
(misaligned pointer, integer no longer a multiple of 16 or now 1, another dtype, pre-run hooks,
a cleared tuning cache) must go through Triton's path again. The stand-in never reaches this
process, whose other tests use the interpreter.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

SCENARIOS = r'''
import importlib.util, json, os, sys
import torch, triton
from triton import knobs
from triton.runtime.jit import JITFunction

spec = importlib.util.spec_from_file_location("triton_launch_path", sys.argv[1])
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
stand_in = bench.install()
from mobileops.kernels import _common as common, _launch, dwconv_bn_act as dwconv
bench.patch_for_cpu_tensors(common)

normal_runs = [0]  # calls of Triton's JITFunction.run, the normal path
real_run = JITFunction.run
def counting_run(self, *args, **kwargs):
    normal_runs[0] += 1
    return real_run(self, *args, **kwargs)
JITFunction.run = counting_run

def launch(captured, fast):
    """(went through Triton's path, the launcher's arguments with the metadata's contents)"""
    _launch.enabled = fast
    before = normal_runs[0]
    common.launch(*captured)
    return normal_runs[0] > before, bench.comparable(stand_in.last)

def compare(captured):
    """Triton's path, then the fast path twice (the first fills its cache)."""
    _, normal = launch(captured, False)
    first_normal, first = launch(captured, True)
    second_normal, second = launch(captured, True)
    return dict(first_normal=first_normal, second_normal=second_normal, same=first == normal == second,
                function=second[4])

def with_args(captured, **changes):
    kernel, tuned, grid_of, args, meta = captured
    return kernel, tuned, grid_of, dict(args, **changes), meta

out = {"disabled_reason": _launch.DISABLED_REASON}
os.environ["MOBILEOPS_AUTOTUNE"] = "0"
x = torch.randn(4, 32, 10, 10, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
w, stat = torch.randn(32, 1, 3, 3, dtype=torch.float16), torch.ones(32)
fwd = bench.capture(common, lambda: dwconv.forward(x, w, stat, stat, stat, stat, out=torch.empty_like(x), stride=1,
                                                   padding=1, activation="hswish", norm="running", eps=1e-5))[0]
out["forward"] = compare(fwd)
# a runtime float (BN eps here, momentum in the statistics kernel) is not a specialization
out["other_eps"] = compare(with_args(fwd, eps_hi=float(fwd[3]["eps_hi"]) * 2, eps_lo=0.0))

parts = torch.randn(48, 64)
rows = bench.capture(common, lambda: common.sum_rows(parts, torch.float32))[0]
out["rows"] = compare(rows)
base = torch.randn(48 * 64 + 1)
out["misaligned"] = compare(with_args(rows, in_ptr=base[1:].view(48, 64)))
out["rows_again"] = compare(rows)
out["not_multiple_of_16"] = compare(with_args(rows, M=60))
out["equal_to_1"] = compare(with_args(rows, ROWS=1))
out["float64"] = compare(with_args(rows, in_ptr=parts.double(), out_ptr=torch.empty(64, dtype=torch.float64)))

kernel = rows[0]
hook_calls = []
kernel.add_pre_run_hook(lambda *a, **k: hook_calls.append(1))
out["pre_run_hook"] = compare(rows)
out["pre_run_hook_calls"] = len(hook_calls)
kernel.pre_run_hooks.clear()

# an autotuner over the same kernel: two configs of the fixed meta-parameters
meta = dict(rows[4])
warps = meta.pop("num_warps", 4)
configs = [triton.Config(dict(meta), num_warps=warps), triton.Config({k: v // 2 for k, v in meta.items()}, num_warps=2)]
tuned = triton.autotune(configs, key=["M"])(kernel)
captured = (kernel, tuned, lambda m: (-(-m["M"] // m["BLOCK_M"]),), rows[3], None)
stand_in.start_tuning()
_launch.enabled = True
before = normal_runs[0]
common.launch(*captured)
out["tuning_runs"] = normal_runs[0] - before
out["tuned"] = compare(captured)
out["tuned_config_is_cached"] = tuned.best_config is tuned.cache[(64, "torch.float32", "torch.float32")]
tuned.cache.clear()
stand_in.start_tuning()
out["retuned_normal"] = launch(captured, True)[0]
out["after_retune_normal"] = launch(captured, True)[0]

# Prepared launches (common.Prepared): the varying arguments are every tensor and float
through_launch = [0]  # calls of common.launch, which a prepared launch takes until it can relaunch directly
real_launch = common.launch
def counting_launch(*args):
    through_launch[0] += 1
    return real_launch(*args)
common.launch = counting_launch

def prepared_of(captured):
    return bench.prepared_launch(common, captured)[0]

def run_prepared(prepared, captured, **changes):
    """(took common.launch, ran JITFunction.run, the launcher's arguments same as Triton's path gave)"""
    changed = with_args(captured, **changes)
    _launch.enabled = True
    launches, runs = through_launch[0], normal_runs[0]
    prepared(*(changed[3][k] for k in prepared.varying))
    result = dict(through_launch=through_launch[0] > launches, normal=normal_runs[0] > runs)
    got = bench.comparable(stand_in.last)
    result["same"] = got == launch(changed, False)[1]
    _launch.enabled = True
    return result

fwd_prepared = prepared_of(fwd)
out["prepared_first"] = run_prepared(fwd_prepared, fwd)
out["prepared_second"] = run_prepared(fwd_prepared, fwd)
out["prepared_other_eps"] = run_prepared(fwd_prepared, fwd, eps_hi=0.25, eps_lo=0.0)
base = torch.empty(x.numel() + 1, dtype=x.dtype)
out["prepared_misaligned"] = run_prepared(fwd_prepared, fwd, x_ptr=base[1:].as_strided(x.shape, x.stride()))
out["prepared_aligned_again"] = run_prepared(fwd_prepared, fwd)
out["prepared_repeat"] = run_prepared(fwd_prepared, fwd)
knobs.runtime.launch_enter_hook = lambda metadata: None
out["prepared_enter_hook"] = run_prepared(fwd_prepared, fwd)
knobs.runtime.launch_enter_hook = None
rows_prepared = prepared_of(rows)
run_prepared(rows_prepared, rows)
out["prepared_float64"] = run_prepared(rows_prepared, rows, in_ptr=parts.double(),
                                       out_ptr=torch.empty(64, dtype=torch.float64))
kernel.add_pre_run_hook(lambda *a, **k: None)
out["prepared_pre_run_hook"] = [run_prepared(rows_prepared, rows) for _ in range(2)]
kernel.pre_run_hooks.clear()
tuned_prepared = prepared_of(captured)
run_prepared(tuned_prepared, captured)
out["prepared_tuned"] = run_prepared(tuned_prepared, captured)
tuned.cache.clear()
stand_in.start_tuning()
out["prepared_retuned"] = run_prepared(tuned_prepared, captured)
print("RESULT " + json.dumps(out, default=str))
'''


@pytest.fixture(scope="module")
def stand_in_results(tmp_path_factory):
    """Run the scenarios once (each compile costs seconds) in a process of their own."""
    pytest.importorskip("triton.backends.nvidia")
    try:
        from triton import knobs

        ptxas = knobs.nvidia.ptxas.path
    except (ImportError, AttributeError, RuntimeError) as exc:
        pytest.skip(f"no ptxas for compiling Triton kernels: {exc}")
    if not ptxas or not os.path.exists(ptxas):
        pytest.skip("no ptxas for compiling Triton kernels")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))  # tests write only under tmp
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", SCENARIOS, str(ROOT / "benchmarks" / "triton_launch_path.py")],
                          env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    results = json.loads(lines[-1].removeprefix("RESULT "))
    assert results["disabled_reason"] is None, results["disabled_reason"]
    return results


@pytest.mark.parametrize("case", ["forward", "rows"])
def test_fast_path_hands_the_launcher_what_tritons_path_does(stand_in_results, case):
    r = stand_in_results[case]
    assert r["first_normal"], "the first call of a shape goes through Triton (it compiles)"
    assert not r["second_normal"], "the repeated call should launch directly"
    assert r["same"], "grid, stream, function, metadata, hooks or arguments differ from Triton's launch"


@pytest.mark.parametrize("case", ["misaligned", "not_multiple_of_16", "equal_to_1", "float64"])
def test_other_assumptions_take_tritons_path_and_get_their_own_kernel(stand_in_results, case):
    r, aligned = stand_in_results[case], stand_in_results["rows"]
    assert r["first_normal"], f"{case}: launched a kernel compiled for other assumptions"
    assert r["function"] != aligned["function"], f"{case}: Triton should have compiled another specialization"
    assert r["same"] and not r["second_normal"], f"{case}: its own repeated call launches directly, as Triton"
    again = stand_in_results["rows_again"]
    assert not again["first_normal"] and again["function"] == aligned["function"] and again["same"]


def test_a_new_runtime_float_value_reuses_the_compiled_kernel(stand_in_results):
    r, first = stand_in_results["other_eps"], stand_in_results["forward"]
    assert not r["first_normal"] and not r["second_normal"], "a float's value must not miss the direct launch"
    assert r["same"] and r["function"] == first["function"]


def test_pre_run_hooks_keep_every_call_on_tritons_path(stand_in_results):
    r = stand_in_results["pre_run_hook"]
    assert r["first_normal"] and r["second_normal"] and r["same"]
    assert stand_in_results["pre_run_hook_calls"] == 3


def test_autotuned_launches_reuse_the_tuned_config(stand_in_results):
    r = stand_in_results
    assert r["tuning_runs"] >= 2, "the first call tunes (benchmark runs, then the launch) on Triton's path"
    # the tuning call filled the cache: every later call of the shape launches directly
    assert not r["tuned"]["first_normal"] and not r["tuned"]["second_normal"]
    assert r["tuned"]["same"], "the direct launch differs from the autotuner's"
    assert r["tuned_config_is_cached"]
    assert r["retuned_normal"], "with the tuning cache cleared the autotuner must decide again"
    assert not r["after_retune_normal"]


def test_prepared_launches_relaunch_directly_what_tritons_path_launches(stand_in_results):
    r = stand_in_results
    assert r["prepared_first"]["through_launch"], "a prepared launch's first call goes through common.launch"
    for case in ("prepared_second", "prepared_other_eps", "prepared_repeat", "prepared_enter_hook",
                 "prepared_tuned"):
        assert not r[case]["through_launch"] and not r[case]["normal"], f"{case}: should relaunch directly"
    for case in ("prepared_first", "prepared_second", "prepared_other_eps", "prepared_misaligned",
                 "prepared_aligned_again", "prepared_repeat", "prepared_enter_hook", "prepared_float64",
                 "prepared_tuned", "prepared_retuned"):
        assert r[case]["same"], f"{case}: the launcher got other arguments than from Triton's path"


def test_prepared_launches_with_other_assumptions_go_through_launch(stand_in_results):
    r = stand_in_results
    for case in ("prepared_misaligned", "prepared_aligned_again", "prepared_float64"):
        assert r[case]["through_launch"], f"{case}: relaunched a kernel compiled for other assumptions"
    assert all(run["through_launch"] and run["same"] for run in r["prepared_pre_run_hook"]), \
        "with a pre-run hook every call goes through Triton's path"
    assert r["prepared_retuned"]["through_launch"] and r["prepared_retuned"]["normal"], \
        "with the tuning cache cleared the autotuner must decide again"


def test_interpreter_launches_take_tritons_path(monkeypatch):
    from mobileops.kernels import _common as common
    from mobileops.kernels import _launch

    assert common.COMPILED_FOR_INTERPRETER, "this process runs the kernels in Triton's interpreter"

    def fail(*args, **kwargs):
        raise AssertionError("the fast path was consulted for an interpreted kernel")

    monkeypatch.setattr(_launch, "_fixed_fast", fail)
    monkeypatch.setattr(_launch, "_tuned_fast", fail)
    parts = torch.randn(40, 24, dtype=torch.float64)
    torch.testing.assert_close(common.sum_rows(parts, torch.float64), parts.sum(0))
    assert id(common.sum_rows_kernel) not in _launch._SITES
