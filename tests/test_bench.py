"""The benchmark machinery (mobileops.bench): the cases cover what the benchmarks issue asks
for at the detectors' real shapes, rows carry times and ratios, an implementation that
computes something else is never timed, and the report is computed from the rows."""

import json
import re

import pytest
import torch

from mobileops import ops, reference
from mobileops.__main__ import main
from mobileops.bench import cases, report, run

CPU = torch.device("cpu")


def _tiny(mode="inference", target="dwconv_bn_act"):
    opts = (("kernel", 3), ("stride", 2), ("activation", "relu6")) if target == "dwconv_bn_act" else \
        (("activation", "hswish"),)
    return cases.Case("op", target, mode, "fp32", "nchw", 2, (8, 7, 7), opts, "", needs_cuda=False)


def test_cases_come_from_the_detectors_and_cover_every_group():
    shapes = cases.op_shapes()
    assert len(shapes["dwconv_bn_act"]) == 21  # the distinct depthwise layers of both detectors
    assert shapes["squeeze_excite"] and shapes["bn_act"]
    assert all(cases.block_shapes()[label] for label in ("UIB", "C3_UIB", "MobileNetv3", "MobileNetv3-SE"))
    groups = {c.group for c in cases.all_cases("default")}
    for op, modes in (("dwconv_bn_act", ("inference", "train_forward", "backward")),
                      ("bn_act", ("inference", "train_forward", "backward")),
                      ("squeeze_excite", ("forward", "forward_backward"))):
        assert {f"op:{op}:{m}" for m in modes} <= groups
    for label in ("UIB", "C3_UIB", "MobileNetv3", "MobileNetv3-SE"):
        assert {f"block:{label}:inference", f"block:{label}:forward_backward"} <= groups
    detector = [(c.target, c.mode, c.batch) for c in cases.detector_cases("default")]
    for cfg in cases.DETECTORS:
        assert {(cfg, "inference", 1), (cfg, "inference", 32), (cfg, "train_step", 32)} <= set(detector)
    full = cases.all_cases("full")
    assert {c.dtype for c in full} == {"fp32", "fp16", "bf16"} and {c.layout for c in full} == {"nchw", "nhwc"}
    assert len({c.name + c.group for c in full}) == len(full), "case ids must be unique"
    assert all(not c.needs_cuda for c in cases.all_cases("cpu"))
    with pytest.raises(ValueError, match="scope must be one of"):
        cases.all_cases("huge")


@pytest.mark.parametrize("mode", ["inference", "train_forward", "backward"])
def test_measure_times_every_implementation_and_reports_ratios(mode):
    row = run.measure(_tiny(mode), CPU, copy_bytes_per_s=1e10)
    expected = {"eager", "mobileops_torch"} | ({"eager_folded"} if mode == "inference" else set())
    assert set(row["times_ms"]) == expected and not row["errors"]
    assert all(t > 0 for t in row["times_ms"].values())
    assert row["mobileops_torch_speedup_vs_eager"] == pytest.approx(
        row["times_ms"]["eager"] / row["times_ms"]["mobileops_torch"])
    x_bytes, y_bytes = 2 * 8 * 7 * 7 * 4, 2 * 8 * 4 * 4 * 4
    assert row["min_bytes"] == {"inference": x_bytes + y_bytes, "train_forward": 2 * x_bytes + y_bytes,
                                "backward": 3 * x_bytes + 2 * y_bytes}[mode]
    assert row["agreement"]["mobileops_torch"] < 1e-6


def test_an_implementation_that_disagrees_with_eager_is_not_timed(monkeypatch):
    real = ops.bn_act
    monkeypatch.setattr(ops, "bn_act", lambda x, *a, **k: real(x, *a, **k) * 1.01)
    row = run.measure(_tiny(target="bn_act"), CPU, copy_bytes_per_s=1e10)
    assert "mobileops_torch" not in row["times_ms"] and "eager" in row["times_ms"]
    assert "differs from eager" in row["errors"]["mobileops_torch"]
    assert not any("speedup" in key for key in row)


def test_blocks_and_detectors_agree_across_implementations():
    block = next(c for c in cases.all_cases("cpu") if c.kind == "block" and c.target == "MobileNetv3-SE")
    small = cases.Case("block", block.target, "forward_backward", "fp32", "nhwc", 2, block.shape, block.options,
                       block.detector, needs_cuda=False)
    row = run.measure(small, CPU, 1e10)
    assert set(row["times_ms"]) == {"eager", "mobileops_torch"} and not row["errors"]
    step = cases.Case("detector", "yolov5n-c3uib", "train_step", "fp32", "nchw", 2, (3, 64, 64), (), "yolov5n-c3uib",
                      needs_cuda=False)
    env = cases.setup(step, CPU)
    assert set(env.trainers) == {"eager", "mobileops_torch"}
    eager, fused = env.trainers["eager"](), env.trainers["mobileops_torch"]()
    assert isinstance(eager.trainer.model.model[2], reference.RefC3UIB)  # the plain blocks
    before = [p.detach().clone() for p in fused.trainer.model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, eager.trainer.model.parameters())), \
        "every implementation starts from the same weights"
    fused.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, fused.trainer.model.parameters())), \
        "a train step must move the parameters"
    assert all(torch.equal(a, b) for a, b in zip(before, eager.trainer.model.parameters())), \
        "each implementation trains its own copy"


def test_train_steps_time_graphs_and_every_compile_mode_on_a_gpu():
    names = set(cases.train_step_variants(torch.device("cuda"), "default", {"bn_act"}))
    assert {"eager", "eager_graph", "compile_default", "compile_reduce-overhead",
            "compile_max-autotune-no-cudagraphs"} <= names
    assert all(f"mobileops_{b}{suffix}" in names for b in cases.mobileops_backends(["bn_act"], torch.device("cuda"))
               for suffix in ("", "_graph", "_compile"))
    assert set(cases.train_step_variants(CPU, None, {"bn_act"})) == {"eager", "mobileops_torch"}


def test_a_train_step_that_disagrees_with_eager_is_not_timed(monkeypatch):
    real = ops.bn_act
    monkeypatch.setattr(ops, "bn_act", lambda x, *a, **k: real(x, *a, **k) * 1.01)
    step = cases.Case("detector", "yolov5n-c3uib", "train_step", "fp32", "nchw", 2, (3, 64, 64), (), "yolov5n-c3uib",
                      needs_cuda=False)
    row = run.measure(step, CPU, 1e10)
    assert set(row["times_ms"]) == {"eager"} and "differs from eager" in row["errors"]["mobileops_torch"]


def test_disagreement_rule():
    assert run._disagreement(0.01, None, None, 0.02) is None
    assert "differs from eager by 0.03" in run._disagreement(0.03, None, None, 0.02)
    # under autocast: twice eager's own error from float32, plus the bound
    assert run._disagreement(0.09, 0.05, 0.04, 0.02) is None
    assert run._disagreement(0.09, 0.10, 0.04, 0.02) is None
    assert "more than twice eager's" in run._disagreement(0.09, 0.11, 0.04, 0.02)


def test_under_autocast_eagers_own_rounding_is_allowed_and_a_real_error_is_not():
    """measure() under bf16 autocast, with implementations whose error is known: eager's
    module, and the same module off by a set fraction. Off by about eager's own rounding
    (further from eager than the plain bound) is timed; off by 10x that is refused."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64))
    x = torch.randn(16, 64)

    def under_autocast(fn):
        def call(x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(x)
        return call

    with torch.no_grad():
        exact = module(x)
        own = ((under_autocast(module)(x).double() - exact).abs().max() / exact.abs().max()).item()
    assert own > 1e-3, "bf16 rounds visibly here"

    def off_by(fraction):
        return under_autocast(lambda x: module(x) + fraction * exact.abs().max() * torch.sign(exact))

    case = cases.Case("block", "toy", "inference", "bf16", "nchw", 16, (64,), (), "", needs_cuda=False)
    for fraction, allowed in ((own, True), (10 * own, False)):
        env = cases.Setup({"eager": under_autocast(module), "mobileops_toy": off_by(fraction)}, x,
                          modules={"eager": module}, autocast_dtype=torch.bfloat16)
        with pytest.MonkeyPatch.context() as patch:
            patch.setitem(run.AGREEMENT, "bf16", own / 10)
            row = run.measure(case, CPU, 1e10, env=env)
        assert row["agreement"]["mobileops_toy"] > own / 10, "the plain bound alone refuses both"
        assert set(row["float32_difference"]) == {"eager", "mobileops_toy"}
        assert ("mobileops_toy" in row["times_ms"]) == allowed, row["errors"]
        if not allowed:
            assert "more than twice eager's" in row["errors"]["mobileops_toy"]


def test_gpu_cases_refuse_a_cpu():
    gpu_case = cases.op_cases("quick")[0]
    with pytest.raises(ValueError, match="needs a CUDA device"):
        cases.setup(gpu_case, CPU)


def _fake_gpu_document():
    rows = []
    for i, (eager, fused) in enumerate([(2.0, 0.8), (3.0, 1.0), (1.0, 1.25)]):
        rows.append(dict(kind="op", group="op:dwconv_bn_act:inference", name=f"case{i}", min_bytes=10 ** 6,
                         times_ms={"eager": eager, "compile": eager / 2, "mobileops_triton": fused},
                         errors={"mobileops_cuda": "RuntimeError: boom"} if i == 2 else {},
                         mobileops_triton_speedup_vs_eager=eager / fused,
                         mobileops_triton_speedup_vs_compile=eager / 2 / fused,
                         mobileops_triton_fraction_of_copy=0.5))
    env = dict(date="2026-11-22T00:00:00+00:00", device="NVIDIA H100", device_type="cuda", python="3.12",
               torch="2.11", cuda="13.0", mobileops="0.1.0", cpu_threads=16, triton="3.6")
    return dict(environment=env, copy_bytes_per_s=3e12, compile_mode="max-autotune-no-cudagraphs", rows=rows)


def test_report_is_computed_from_the_rows(tmp_path):
    document = _fake_gpu_document()
    path = tmp_path / "results" / "nvidia-h100-2026-11-22.json"
    path.parent.mkdir()
    path.write_text(json.dumps(document))
    written = report.render([path], tmp_path / "RESULTS.md")
    text = (tmp_path / "RESULTS.md").read_text()
    # ratios vs eager 2.5, 3.0, 0.8: median 2.5 >= 2.0; vs compile 1.25, 1.5, 0.4: median 1.25 < 1.5
    assert "| op:dwconv_bn_act:inference | mobileops_triton | eager | 2.50x (0.80, 3.00; 3) | >= 2.0x | yes |" in text
    assert "| op:dwconv_bn_act:inference | mobileops_triton | compile | 1.25x (0.40, 1.50; 3) | >= 1.5x | no |" in text
    assert "| case1 | 3 | 1.5 | - | 1 | - | - | - | 3.00x | 1.50x | 50% |" in text
    assert "case2, mobileops_cuda: RuntimeError: boom" in text
    svg = path.with_suffix(".svg").read_text()
    assert svg.count("<rect") == 3 and "0.80x" in svg and path.with_suffix(".svg") in written


def test_summary_table_says_units_spread_and_which_way_ratios_run():
    row = dict(group="op:bn_act:inference", name="fp16 b32 128x20x20",
               times_ms={"eager": 2.0, "mobileops_torch": 1.0, "mobileops_triton": 4.0},
               spread_ms={"eager": [1.9, 2.6], "mobileops_torch": [0.95, 1.1], "mobileops_triton": [3.5, 4.5]},
               timed_calls={"eager": 15, "mobileops_torch": 15, "mobileops_triton": 15},
               errors={"mobileops_cuda": "RuntimeError: boom"},
               mobileops_torch_speedup_vs_eager=2.0, mobileops_triton_speedup_vs_eager=0.5)
    table = run.summary_table([row])
    assert "median ms per call (fastest-slowest" in table and "baseline's median time over mobileops'" in table
    assert re.search(r"eager +2\.000 ms  \(1\.900-2\.600, n=15\)", table), table
    assert "torch 2.00x faster than eager" in table and "triton 2.00x slower than eager" in table
    assert "mobileops_cuda" in table and "not timed: RuntimeError: boom" in table


def test_measured_rows_carry_the_spread_of_their_timed_calls():
    row = run.measure(_tiny("inference", "bn_act"), CPU, 1e10)
    assert set(row["spread_ms"]) == set(row["times_ms"]) == set(row["timed_calls"])
    for name, ms in row["times_ms"].items():
        low, high = row["spread_ms"][name]
        assert low <= ms <= high and row["timed_calls"][name] >= 3


def test_results_files_never_overwrite(tmp_path):
    document = _fake_gpu_document()
    first, second = run.write_results(document, tmp_path), run.write_results(document, tmp_path)
    assert first.name == "nvidia-h100-2026-11-22.json" and second.name == "nvidia-h100-2026-11-22-2.json"
    assert json.loads(second.read_text())["rows"] == document["rows"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what the bench command does on a machine without CUDA")
def test_bench_command_on_cpu(capsys, tmp_path):
    assert main(["bench", "--kinds", "op", "--filter", "128x20x20", "dwconv", "--quiet", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "need a CUDA device" in out and "op:dwconv_bn_act:inference" in out
    assert re.search(r"mobileops_torch +\d+\.\d{3} ms +\(\d+\.\d{3}-\d+\.\d{3}, n=\d+\)", out), out
    assert re.search(r"torch \d+\.\d\dx (faster|slower) than eager", out), out
    (written,) = tmp_path.glob("*.json")
    rows = json.loads(written.read_text())["rows"]
    assert [r["group"] for r in rows] == ["op:dwconv_bn_act:inference"]
    assert main(["bench", "--scope", "quick", "--no-save"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
    assert main(["bench", "--filter", "no-such-case", "--no-save"]) == 2


def test_detector_train_step_rows_report_images_per_second():
    step = cases.Case("detector", "yolov5n-c3uib", "train_step", "fp32", "nchw", 2, (3, 64, 64), (),
                      "yolov5n-c3uib", needs_cuda=False)
    row = run.measure(step, CPU, 1e10)
    assert not row["errors"] and set(row["images_per_s"]) == set(row["times_ms"])
    assert row["agreement"]["mobileops_torch"] < 1e-6 and row["check_steps"] == cases.TRAIN_CHECK_STEPS
    for name, ms in row["times_ms"].items():
        assert row["images_per_s"][name] == pytest.approx(2 / (ms * 1e-3))
    table = "\n".join(report.group_table([row]))
    assert "eager img/s" in table and "mobileops_torch img/s" in table


def test_host_overhead_script_times_every_op_with_stubbed_launches(monkeypatch, capsys):
    """benchmarks/host_overhead.py runs on CPU (interpreter), one JSON row per op, and leaves
    the real launcher in place afterwards."""
    import importlib.util
    from pathlib import Path

    pytest.importorskip("triton")
    from mobileops.kernels import _common

    real_launch = _common.launch
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "host_overhead.py"
    spec = importlib.util.spec_from_file_location("host_overhead", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr("sys.argv", ["host_overhead.py", "--iterations", "2", "--repeats", "1", "--no-launcher"])
    script.main()
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    calls = list(script.fused_calls(torch.device("cpu"), torch.float16))
    floors = list(script.floor_calls(torch.device("cpu"), torch.float16))
    assert floors == [c for c in calls if c.endswith("forward+backward")]
    assert [r["call"] for r in rows] == calls + floors + calls
    assert [r["mode"] for r in rows] == (["mobileops python"] * len(calls) + ["autograd floor"] * len(floors)
                                         + ["eager composition"] * len(calls))
    assert all(r["us_median"] > 0 and r["us_min"] <= r["us_median"] <= r["us_max"] and r["torch"] == torch.__version__
               for r in rows)
    # launches per call, counted with the launches stubbed (the design's limits)
    launches = {r["call"]: r["launches"] for r in rows[:len(calls)]}
    assert launches == {"bn_act inference": 1, "dwconv_bn_act inference": 1, "squeeze_excite inference": 2,
                        "dwconv_bn_act train forward": 2, "dwconv_bn_act train forward+backward": 5,
                        "bn_act train forward+backward": 4, "squeeze_excite train forward+backward": 5}
    assert _common.launch is real_launch


def test_host_instructions_counts_every_row_once_in_dump_order(monkeypatch, tmp_path):
    """benchmarks/host_instructions.py: its child runs each requested call (outside valgrind the
    client requests do nothing), and the dumps are read in callgrind's numeric order."""
    pytest.importorskip("triton")
    from mobileops.kernels import _common

    script = _benchmark_script("host_instructions")
    calls = []
    real_prepared = _common.Prepared.__call__
    monkeypatch.setattr(torch._C, "_valgrind_toggle_and_dump_stats", lambda: calls.append("dump"))
    names = ["bn_act inference", "eager bn_act train forward+backward", "floor squeeze_excite train forward+backward"]
    script._child(names, 3, launcher=False)
    assert calls == ["dump"] * 3 and _common.Prepared.__call__ is real_prepared
    for number, total in ((1, 30), (2, 10), (10, 20)):  # .10 sorts before .2 as text
        (tmp_path / f"callgrind.out.{number}").write_text(f"events: Ir\nsummary: {total}\n")
    assert script._counted(list(tmp_path.glob("callgrind.out.*"))) == [30, 10, 20]


def _benchmark_script(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_profile_step_sums_phases_kernels_and_idle_time():
    script = _benchmark_script("profile_step")
    assert script.busy_us([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17
    assert [script.category(n) for n in ("sm90_xmma_fprop_implicit_gemm", "cudnn::bn_fw_tr_1C11_kernel",
                                          "vectorized_elementwise_kernel<hardswish>", "_stats_kernel",
                                          "index_put_kernel", "mobileops::(anonymous namespace)::dx_kernel<float>")] \
        == ["conv", "bn_act", "bn_act", "fused", "other", "fused"]
    windows = {"forward": (0.0, 100.0), "loss": (100.0, 200.0)}
    kernels = [("implicit_gemm", 10.0, 40.0), ("batch_norm_collect", 30.0, 50.0), ("index", 150.0, 160.0)]
    summary = script.summarise(windows, kernels)
    forward = summary["forward"]
    assert forward.pop("by_category_ms") == pytest.approx({"bn_act": 0.02, "conv": 0.03})
    assert forward == pytest.approx(dict(wall_ms=0.1, kernel_ms=0.04, idle_ms=0.06, kernels=2))
    assert summary["loss"]["kernels"] == 1 and summary["loss"]["idle_ms"] == pytest.approx(0.09)


def test_train_step_implementations_are_named_and_timed_like_the_others():
    # benchmarks/conftest.py and profile_case.py list and time every case this way
    step = cases.Case("detector", "yolov5n-c3uib", "train_step", "fp32", "nchw", 2, (3, 64, 64), (), "yolov5n-c3uib",
                      needs_cuda=False)
    env = cases.setup(step, CPU)
    assert cases.implementation_names(env) == ["eager", "mobileops_torch"]
    parts = cases.timed_function(step, env, "mobileops_torch")()
    assert parts.shape == (3,) and torch.isfinite(parts).all()
    op = _tiny("inference")
    assert cases.implementation_names(cases.setup(op, CPU)) == list(cases.setup(op, CPU).impls)
