"""benchmarks/static_report.py, and the structural properties of the hot kernels it shows at the
detectors' real training shapes (b32, 640): launch grids, spills, vector widths. Nothing here
runs a kernel; compiling for sm_90 needs Triton's ptxas (and nvcc for the CUDA part)."""

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "benchmarks" / "static_report.py"


def _report_module():
    spec = importlib.util.spec_from_file_location("static_report", REPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = _report_module()


def _compiler_env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    return env


def _needs_ptxas():
    pytest.importorskip("triton.backends.nvidia")
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        path = get_ptxas(90).path
    except (RuntimeError, AttributeError) as exc:
        pytest.skip(f"no ptxas for sm_90: {exc}")
    if not path or not os.path.exists(path):
        pytest.skip("no ptxas for sm_90")


def test_occupancy_follows_the_sm90_limits():
    # 128 registers x 128 threads: 4 programs of 4 warps fit the 65536 registers -> 16 of 64 warps
    assert report.occupancy(128, 0, 4) == 0.25
    assert report.occupancy(32, 0, 4) == 1.0  # capped by 64 warps per SM
    assert report.occupancy(33, 0, 4) == 0.75  # 33 registers round up to 40 per thread (granule 256 per warp)
    assert report.occupancy(32, 100 * 1024, 4) == 2 * 4 / 64  # shared memory: two 101 KB blocks per SM
    assert report.occupancy(255, 0, 8) == 0.125


def test_ptx_access_widths_count_vectors_and_scalars():
    ptx = """
    ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];
    @%p1 ld.global.v4.b32 {%r5, %r6, %r7, %r8}, [%rd2];
    ld.global.nc.b16 %rs1, [%rd3];
    ld.global.cg.v2.f32 {%f1, %f2}, [%rd4];
    @%p2 st.global.v2.b32 [%rd5], {%r9, %r10};
    st.global.b16 [%rd6], %rs2;
    st.global.wb.v4.u32 [%rd7], {%r11,%r12,%r13,%r14};
    """
    loads, stores = report.access_widths(ptx)
    assert loads == {16: 2, 2: 1, 8: 1}
    assert stores == {8: 1, 2: 1, 16: 1}


def test_ptxas_log_is_read_per_entry_function():
    log = """ptxas info    : Compiling entry function 'first' for 'sm_90a'
ptxas info    : Function properties for first
    0 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 1024 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function 'second' for 'sm_90a'
ptxas info    : Function properties for second
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 400 bytes cmem[0]
"""
    found = report.parse_ptxas(log)
    assert found["first"] == dict(registers=255, spills=16, shared_bytes=1024)
    assert found["second"] == dict(registers=40, spills=0, shared_bytes=0)


GRIDS = r"""
import json, math, os, sys
os.environ["MOBILEOPS_AUTOTUNE"] = "0"
sys.path.insert(0, sys.argv[1])
import static_report as sr
out = []
compiler = sr._TritonCompiler()
for layout in ("channels_last", "nchw"):
    for call, pass_name, captured, grid in sr.triton_launches(sr.layer_calls(False), "float16", layout, compiler):
        out.append(dict(kernel=captured[0].__name__, op=call["op"], shape=call["shape"], layout=layout,
                        programs=math.prod(grid)))
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def real_shape_grids(tmp_path_factory):
    """Every Triton launch of the detectors' fused op calls at b32 640 (fp16, both layouts) as the
    launch helpers plan it for an sm_90 device of 132 SMs, without compiling or running."""
    pytest.importorskip("triton.backends.nvidia")
    env = _compiler_env(tmp_path_factory.mktemp("grids"))
    done = subprocess.run([sys.executable, "-c", GRIDS, str(REPORT.parent)], env=env, capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def test_every_reduction_grid_at_the_real_shapes_has_at_least_two_programs_per_sm(real_shape_grids):
    reducing = [g for g in real_shape_grids if g["kernel"] in report.REDUCING_KERNELS]
    assert {g["kernel"] for g in reducing} == set(report.REDUCING_KERNELS)
    thin = [g for g in reducing if g["programs"] < 2 * report.SM90["sms"]]
    assert not thin, f"{len(thin)} reducing launches leave SMs idle, e.g. {thin[:3]}"


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
def test_every_cuda_reduction_grid_at_the_real_shapes_has_at_least_two_blocks_per_sm(channels_last):
    # the launch table follows csrc's grids and the launchers' chunking (no compiler needed)
    constants = report.cuda_constants()
    reducing = [(call["op"], call["shape"], kernel, grid) for call in report.layer_calls(False)
                for _, kernel, _, grid, *_ in report.cuda_launches(call, "float16", channels_last, constants)
                if kernel in report.CUDA_REDUCING_KERNELS]
    assert {kernel for _, _, kernel, _ in reducing} == set(report.CUDA_REDUCING_KERNELS)
    thin = [r for r in reducing if math.prod(r[3]) < 2 * report.SM90["sms"]]
    assert not thin, f"{len(thin)} reducing launches leave SMs idle, e.g. {thin[:3]}"


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    """``static_report.py --quick``: per op the largest and smallest layer and a 5x5 one, compiled."""
    _needs_ptxas()
    tmp = tmp_path_factory.mktemp("report")
    # Triton only: compiling csrc again for the CUDA rows would cost CI a minute (the package
    # build already compiles it; the CUDA launch table is tested below without nvcc).
    done = subprocess.run([sys.executable, str(REPORT), "--quick", "--backend", "triton", "--out",
                           str(tmp / "report.json")], env=_compiler_env(tmp), capture_output=True, text=True,
                          timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp / "report.json").read_text()), (tmp / "report.md").read_text()


def test_the_report_has_every_field_and_a_table(quick_report):
    data, table = quick_report
    keys = {"backend", "kernel", "shape", "grid", "programs_per_sm", "occupancy", "registers", "spills",
            "shared_bytes", "min_bytes", "vector_loads"}
    assert data["rows"] and all(keys <= set(row) for row in data["rows"])
    assert {row["op"] for row in data["rows"]} == {"dwconv_bn_act", "bn_act", "squeeze_excite"}
    assert all(row["registers"] > 0 for row in data["rows"]), "a kernel's ptxas line was not found"
    assert "| triton | dwconv_bn_act | train backward | _grad_input_kernel |" in table


def test_the_alignment_hint_divides_the_channels_and_every_position_stride():
    import torch

    from mobileops.kernels import _common as common

    cl = torch.channels_last
    x72 = torch.empty(2, 72, 5, 5, dtype=torch.float16).contiguous(memory_format=cl)
    assert common.alignment(72, x72) == 8  # 16 bytes of fp16, although 72 is no multiple of 16
    assert common.alignment(72, x72.float()) == 4
    assert common.alignment(20, torch.empty(2, 20, 5, 5, dtype=torch.float16).contiguous(memory_format=cl)) == 4
    assert common.alignment(72, x72.contiguous()) == 1  # NCHW: the position stride along W is 1
    wide = torch.empty(2, 80, 5, 5, dtype=torch.float16).contiguous(memory_format=cl)
    assert common.alignment(72, wide[:, :72]) == 8  # a channel slice keeps its parent's strides
    odd = torch.empty(2, 74, 5, 5, dtype=torch.float16).contiguous(memory_format=cl)[:, :72]
    assert common.alignment(72, odd) == 2
    assert common.alignment(72, x72, odd) == 2  # the smallest over every tensor of the launch


def test_the_fixed_channel_block_wastes_at_most_an_eighth_of_its_lanes():
    from mobileops.kernels import _common as common

    assert common.channel_block_size(64) == 64
    assert common.channel_block_size(72) == 16  # 64 would run 128 lanes for 72 channels
    assert common.channel_block_size(120) == 64
    assert common.channel_block_size(200) == 32
    for c in range(9, 1000):
        b = common.channel_block_size(c)
        assert b in (8, 16, 32, 64) and (-(-c // b) * b - c) * 8 <= c or b == 8


def test_no_triton_kernel_spills_more_than_one_register_at_the_real_shapes(quick_report):
    """Before the tiles were sized by kernel size, the K=5 layers' conv kernels spilled up to
    1.8 KB; ptxas still spills 4-8 bytes in two kernels (bn_act's grad-input with relu, one
    K=5 gradient-sum), which this bound allows and nothing more."""
    data, _ = quick_report
    spilling = [(r["kernel"], r["op"], r["shape"], r["spills"]) for r in data["rows"]
                if r["backend"] == "triton" and r["spills"] > 8]
    assert not spilling, spilling


def test_triton_activation_accesses_are_16_byte_vectors_in_channels_last(quick_report):
    """Every activation load, and every activation store but the grad-input pass's dz (its
    tile is bounded by the weight-gradient gather: 8-byte stores), is a 16-byte vector."""
    data, _ = quick_report
    rows = [r for r in data["rows"] if r["backend"] == "triton" and r["min_bytes"]]
    narrow_loads = [(r["kernel"], r["shape"], r["load_widths"]) for r in rows if max(map(int, r["load_widths"])) < 16]
    assert not narrow_loads, narrow_loads
    narrow_stores = [(r["kernel"], r["shape"], r["store_widths"]) for r in rows
                     if not r["vector_loads"] and r["kernel"] != "_grad_input_kernel"]
    assert not narrow_stores, narrow_stores


def test_no_triton_reduction_synchronises_inside_its_tile_loop(quick_report):
    """The statistics and gradient-sum kernels keep per-lane partial sums and reduce across the
    tile once after the loop (8-12 barriers per tile before)."""
    data, _ = quick_report
    looping = [(r["kernel"], r["op"], r["shape"], r["loop_barriers"]) for r in data["rows"]
               if r["backend"] == "triton" and r["kernel"] in ("_stats_kernel", "_grad_sums_kernel")
               and r["loop_barriers"]]
    assert not looping, looping


def test_the_cuda_launch_table_names_kernels_that_csrc_defines():
    constants = report.cuda_constants()
    assert {"kThreads", "kReduceThreads", "kLastChannels", "kLineBytes", "kSeThreads"} <= set(constants)
    sources = "".join(p.read_text() for p in (ROOT / "csrc").glob("*.cu*"))
    calls = [dict(op="dwconv_bn_act", shape=(32, 72, 160, 160), options=dict(kernel=5, stride=2, activation="relu6"),
                  detector="d"),
             dict(op="bn_act", shape=(32, 64, 40, 40), options=dict(activation="silu"), detector="d"),
             dict(op="squeeze_excite", shape=(32, 120, 40, 40), options=dict(hidden=32, gate="hsigmoid",
                                                                             post_act="hswish"), detector="d")]
    for call in calls:
        launches = report.cuda_launches(call, "float16", True, constants)
        assert {p for p, *_ in launches} >= {"train forward", "train backward"}
        for _, kernel, targs, grid, threads, _bytes in launches:
            assert re.search(rf"\b{kernel}\s*(<|\()", sources), f"csrc defines no {kernel}"
            assert targs[0] in ("__half", "float") and all(g >= 1 for g in grid) and threads % 32 == 0
    dw = {k: (grid, b) for p, k, _, grid, _, b in report.cuda_launches(calls[0], "float16", True, constants)
          if p == "train backward"}
    x_bytes = 32 * 72 * 160 * 160 * 2
    assert dw["grad_input_kernel"][1] == x_bytes + 2 * x_bytes // 4  # x, dy and dz (stride 2: a quarter)


@pytest.mark.skipif(shutil.which("c++filt") is None, reason="needs c++filt")
def test_cuda_entry_names_are_demangled_to_their_template():
    mangled = ("_ZN9mobileops53_GLOBAL__N__5664e376_20_dwconv_bn_act_bwd_cu_a754479116grad_sums_kernelIfLi0EEEvPKT_"
               "NS_8Strides4ES4_S5_S4_PKNS_3AccIS2_E4typeESA_SA_SA_NS_7DwShapeEliPS8_SC_")
    assert report._demangled_template(mangled) == ("grad_sums_kernel", ("float", "0"))


def test_the_cuda_elementwise_kernels_take_channel_packs_where_they_fit():
    constants = report.cuda_constants()

    def packing(op, kernel, targs):
        """(values per thread, axis: 0 channels, 1 along W) of an elementwise launch."""
        if kernel == "dx_kernel" and op == "dwconv_bn_act":  # the transposed conv: channel packs only
            return targs[-1], "0"
        return targs[-2], targs[-1]

    def templates(c, channels_last):
        calls = [dict(op="dwconv_bn_act", shape=(32, c, 40, 40), options=dict(kernel=3, stride=1, activation="relu"),
                      detector="d"),
                 dict(op="bn_act", shape=(32, c, 40, 40), options=dict(activation="silu"), detector="d"),
                 dict(op="squeeze_excite", shape=(32, c, 40, 40), options=dict(hidden=8, gate="hsigmoid",
                                                                               post_act="hswish"), detector="d")]
        return {(call["op"], kernel, packing(call["op"], kernel, targs)) for call in calls
                for _, kernel, targs, *_ in report.cuda_launches(call, "float16", channels_last, constants)
                if kernel in ("apply_kernel", "dx_kernel", "scale_kernel")}

    def expect(dw, bn, se):
        return {("dwconv_bn_act", "apply_kernel", dw), ("dwconv_bn_act", "dx_kernel", dw),
                ("bn_act", "apply_kernel", bn), ("squeeze_excite", "scale_kernel", se),
                ("squeeze_excite", "dx_kernel", se)}

    assert templates(72, True) == expect(("8", "0"), ("8", "0"), ("8", "0"))
    reducing = {(kernel, targs[-1], grid) for _, kernel, targs, grid, *_ in report.cuda_launches(
        dict(op="dwconv_bn_act", shape=(32, 72, 40, 40), options=dict(kernel=3, stride=1, activation="relu"),
             detector="d"), "float16", True, constants) if kernel.endswith(("stats_kernel", "_sums_kernel",
                                                                           "input_kernel"))}
    # 72 fp16 channels: 9 packs of 8 on 8 lanes (a 128-byte line) -> 2 groups; the 3x3 input
    # gradient's packs of 4 on 16 lanes -> 2 groups too
    assert {(k, v, grid[1]) for k, v, grid in reducing} == {("stats_kernel", "8", 2), ("grad_sums_kernel", "8", 2),
                                                           ("grad_input_kernel", "4", 2)}
    assert templates(20, True) == expect(("1", "0"), ("1", "0"), ("1", "0"))
    # NCHW, W = 40 (a multiple of 8): packs along W where there is no conv
    assert templates(72, False) == expect(("1", "0"), ("8", "1"), ("8", "1"))


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"), reason="needs nvcc")
def test_cuda_channel_packs_compile_to_16_byte_loads_and_stores(tmp_path):
    # The SE files compile in seconds (the dwconv ones take a minute: the full static report
    # shows the same for apply_kernel and dx_kernel). Each packed fp16 elementwise kernel must
    # load and store its activations as 16-byte vectors, and the one-element variant must not.
    seen = {}
    for source in ("squeeze_excite_fwd.cu", "squeeze_excite_bwd.cu"):
        ptx = tmp_path / (source + ".ptx")
        subprocess.run([report._nvcc(), "-O3", "-std=c++17", "-arch=sm_90", f"-I{ROOT / 'csrc'}", "-ptx",
                        str(ROOT / "csrc" / source), "-o", str(ptx)], check=True, capture_output=True)
        for mangled, body in report._ptx_entries(ptx.read_text()).items():
            name, targs = report._demangled_template(mangled)
            if name in ("scale_kernel", "dx_kernel") and targs[0] == "__half":
                seen[(name, targs)] = report.access_widths(body)
    # (template arguments end in the values per thread and the axis: channels or along W)
    packed = {key: widths for key, widths in seen.items() if key[1][-2] == "8"}
    single = {key: widths for key, widths in seen.items() if key[1][-2] == "1"}
    # scale: 6 post activations, dx: 1; packs along channels and along W
    assert len(packed) == 14 and len(single) == 7, sorted(seen)
    for key, (loads, stores) in packed.items():
        assert 16 in loads and set(stores) == {16}, (key, loads, stores)
    for key, (loads, stores) in single.items():
        assert 16 not in loads and set(stores) == {2}, (key, loads, stores)
