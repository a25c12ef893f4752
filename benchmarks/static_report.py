"""What the hot kernels compile to for sm_90 at the detectors' real training shapes, without a GPU.

    python benchmarks/static_report.py --out benchmarks/results/static-report.json [--quick]
        [--backend triton|cuda|both] [--layout channels_last|nchw] [--dtype float16|bfloat16]

For every fused op call of the two detectors (yolov5n-c3uib, yolov5-mobilenetv3) at batch 32,
640x640 (:func:`mobileops.bench.cases.op_shapes`), each training pass (and the inference
forward) is taken through mobileops' own launch helpers and compiled for sm_90 exactly as it
would be launched:

- **triton**: the launches are captured from the launchers on CPU tensors of the real shapes,
  then sent through Triton's normal launch path with the stand-in sm_90 driver of
  ``benchmarks/triton_launch_path.py`` (real specialisation, real ptxas; the launch itself is
  recorded, not run). The configuration is the fixed one (``MOBILEOPS_AUTOTUNE=0``, also what
  deterministic mode launches): which configuration the autotuner would pick needs a GPU.
- **cuda**: ``csrc/*.cu`` compiled by nvcc for sm_90 with ``-Xptxas -v``; the grids follow the
  launch code (its block constants read from ``csrc/common.cuh``).

One JSON row per (backend, kernel, layer, pass) with at least: ``backend``, ``kernel``,
``shape`` (N, C, H, W of the op's input), ``grid``, ``programs_per_sm``, ``occupancy`` (resident
warps / 64 per SM from registers, shared memory and warps per program), ``registers``,
``spills`` (spill store + load bytes), ``shared_bytes``, ``barriers`` (static ``bar.sync``
count in the PTX) and ``loop_barriers`` (those inside loops, paid every tile), ``min_bytes`` (the activation-sized
tensors the pass must read and write once), ``vector_loads`` (whether the widest global load
and store are 16-byte vectors, from the PTX) and ``load_widths`` / ``store_widths`` (static
count of global accesses per width in bytes). The table printed (and written next to the JSON
as ``.md``) aggregates the rows per kernel and pass.

Occupancy is the theoretical one for a program of that size on sm_90 (65536 registers in
256-register warp granules, 228 KB shared memory with 1 KB reserved per block, 64 warps, 32
blocks); what a launch achieves is also capped by ``programs_per_sm``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: sm_90 (H100 / H200) limits for the occupancy estimate.
SM90 = dict(sms=132, regs_per_sm=65536, reg_granule=256, max_regs_per_thread=255, warps_per_sm=64,
            blocks_per_sm=32, smem_per_sm=233472, smem_reserved_per_block=1024)
BATCH = 32

#: Per kernel: the launch arguments that are activation-sized tensors it reads, and writes.
#: Their bytes, each counted once, are the pass's minimum traffic.
TRITON_ROLES = {
    "_stats_kernel": (("x_ptr",), ()),
    "_forward_kernel": (("x_ptr",), ("y_ptr",)),
    "_grad_sums_kernel": (("x_ptr", "dy_ptr"), ()),
    "_grad_input_kernel": (("x_ptr", "dy_ptr"), ("dz_ptr",)),
    "_dx_kernel": (("dz_ptr",), ("dx_ptr",)),
    "_pool_mlp_kernel": (("x_ptr",), ()),
    "_scale_kernel": (("x_ptr",), ("y_ptr",)),
    "_pool_mlp_backward_kernel": (("x_ptr", "dy_ptr"), ()),
    "_weight_grad_kernel": ((), ()),
    "_input_grad_kernel": (("x_ptr", "dy_ptr"), ("dx_ptr",)),
}


# ----------------------------------------------------------------------------------------------
# What compiled code says
# ----------------------------------------------------------------------------------------------

_PTX_ACCESS = re.compile(r"^\s*(?:@%p\d+\s+)?(ld|st)\.global(?:\.[a-z0-9_:]+)*?(?:\.v(\d))?\.([a-z]+)(\d+)\b",
                         re.MULTILINE)


_BARRIER = re.compile(r"\b(?:bar|barrier)\.sync\b")


def barrier_count(ptx: str) -> int:
    """Static count of block-wide barriers (``bar.sync`` / ``barrier.sync``) in the PTX of the
    kernel's own body (the ``.entry``; Triton's noinline merge functions, which run once in one
    program per block, are separate ``.func`` bodies and left out): each cross-warp reduction
    or shared-memory layout change costs some."""
    entries = _ptx_entries(ptx) or {"": ptx}
    return sum(len(_BARRIER.findall(body)) for body in entries.values())


def loop_barrier_count(ptx: str) -> int:
    """Barriers inside loops of the kernel's own body: ``bar.sync`` lines between a label and a
    later branch back to it. The per-iteration cost that a barrier count alone hides: a
    reduction across warps inside the tile loop pays it every tile."""
    total = 0
    for body in (_ptx_entries(ptx) or {"": ptx}).values():
        lines = body.splitlines()
        labels = {}
        in_loop = [False] * len(lines)
        for i, line in enumerate(lines):
            label = re.match(r"\s*(\$L__\w+):", line)
            if label:
                labels[label.group(1)] = i
            branch = re.search(r"\bbra(?:\.uni)?\s+(\$L__\w+);", line)
            if branch and branch.group(1) in labels:
                for j in range(labels[branch.group(1)], i + 1):
                    in_loop[j] = True
        total += sum(1 for i, line in enumerate(lines) if in_loop[i] and _BARRIER.search(line))
    return total


def access_widths(ptx: str) -> tuple[dict, dict]:
    """Static counts of global loads and stores per access width in bytes, from PTX."""
    loads: dict[int, int] = {}
    stores: dict[int, int] = {}
    for kind, vec, _, bits in _PTX_ACCESS.findall(ptx):
        width = (int(vec) if vec else 1) * int(bits) // 8
        table = loads if kind == "ld" else stores
        table[width] = table.get(width, 0) + 1
    return loads, stores


_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_\d+a?'")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> dict[str, dict]:
    """Per entry function of a ``ptxas -v`` log: registers, spill bytes and static shared memory."""
    out: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        entry = _PTXAS_ENTRY.search(line)
        if entry:
            current = out.setdefault(entry.group(1), dict(registers=0, spills=0, shared_bytes=0))
            continue
        if current is None:
            continue
        spill = _PTXAS_SPILL.search(line)
        if spill:
            current["spills"] = max(current["spills"], int(spill.group(1)) + int(spill.group(2)))
        used = _PTXAS_USED.search(line)
        if used:
            current["registers"] = int(used.group(1))
            smem = _PTXAS_SMEM.search(line)
            if smem:
                current["shared_bytes"] = int(smem.group(1))
    return out


def occupancy(registers: int, shared_bytes: int, warps: int, limits: dict = SM90) -> float:
    """Resident warps / warps per SM for programs of ``warps`` warps on sm_90."""
    per_warp = -(-max(registers, 1) * 32 // limits["reg_granule"]) * limits["reg_granule"]
    by_regs = limits["regs_per_sm"] // (per_warp * warps)
    by_warps = limits["warps_per_sm"] // warps
    blocks = min(by_regs, by_warps, limits["blocks_per_sm"])
    if shared_bytes:
        blocks = min(blocks, limits["smem_per_sm"] // (shared_bytes + limits["smem_reserved_per_block"]))
    return round(blocks * warps / limits["warps_per_sm"], 4)


def launch_row(backend: str, kernel: str, grid: tuple, warps: int, resources: dict, ptx_widths, min_bytes: int,
               writes_activations: bool, **extra) -> dict:
    """One report row. ``vector_loads``: the widest global load is a 16-byte vector, and so is
    the widest store where the kernel writes an activation-sized tensor (partial sums and
    per-channel results are small, scalar stores are fine there)."""
    programs = math.prod(grid)
    loads, stores = ptx_widths
    widest_load = max(loads, default=0)
    widest_store = max(stores, default=0)
    return dict(backend=backend, kernel=kernel, grid=list(grid), warps=warps,
                programs_per_sm=round(programs / SM90["sms"], 2),
                occupancy=occupancy(resources["registers"], resources["shared_bytes"], warps),
                registers=resources["registers"], spills=resources["spills"],
                shared_bytes=resources["shared_bytes"], barriers=resources["barriers"],
                loop_barriers=resources["loop_barriers"], min_bytes=min_bytes,
                vector_loads=widest_load >= 16 and (not writes_activations or widest_store >= 16),
                load_widths={str(k): v for k, v in sorted(loads.items())},
                store_widths={str(k): v for k, v in sorted(stores.items())}, **extra)


# ----------------------------------------------------------------------------------------------
# The calls: every op call of the detectors, each pass
# ----------------------------------------------------------------------------------------------


def layer_calls(quick: bool) -> list[dict]:
    """One dict per distinct fused op call of the detectors at 640: op, shape (N, C, H, W), options."""
    from mobileops.bench import cases

    calls = []
    for op, entries in cases.op_shapes().items():
        for (c, h, w), opts, detector in entries:
            calls.append(dict(op=op, shape=(BATCH, c, h, w), options=dict(opts), detector=detector))
    if quick:  # per op the largest and the smallest call, and a 5x5 one with channels not a multiple of 16
        picked = []
        for op in ("dwconv_bn_act", "bn_act", "squeeze_excite"):
            mine = sorted((c for c in calls if c["op"] == op), key=lambda c: c["shape"][1] * c["shape"][2] ** 2)
            picked += [mine[-1], mine[0]] if len(mine) > 1 else mine
            picked += [c for c in mine if c["options"].get("kernel") == 5 and c["shape"][1] % 16][:1]
        calls = picked
    return calls


def _layer_tensors(torch, call: dict, dtype, layout) -> dict:
    n, c, h, w = call["shape"]
    opts = call["options"]
    x = torch.empty(n, c, h, w, dtype=dtype).contiguous(memory_format=layout)
    acc = torch.float32
    t = dict(x=x, stat=torch.ones(c, dtype=acc))
    if call["op"] == "dwconv_bn_act":
        k, s = opts["kernel"], opts["stride"]
        pad = (k - 1) // 2
        ho, wo = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
        t.update(w=torch.empty(c, 1, k, k, dtype=dtype), y=torch.empty(n, c, ho, wo, dtype=dtype).contiguous(
            memory_format=layout), stride=s, padding=pad)
    elif call["op"] == "bn_act":
        t.update(w=None, y=torch.empty_like(x), stride=1, padding=0)
    else:
        r = opts["hidden"]
        t.update(w1=torch.empty(r, c, dtype=dtype), b1=torch.empty(r, dtype=dtype),
                 w2=torch.empty(c, r, dtype=dtype), b2=torch.empty(c, dtype=dtype), y=torch.empty_like(x))
    return t


def triton_passes(call: dict, t: dict, layout):
    """(pass name, zero-argument call of a launch helper) for each pass of this op call."""
    from mobileops.kernels import dwconv_bn_act as dwconv
    from mobileops.kernels import squeeze_excite as se

    x, stat = t["x"], t["stat"]
    if call["op"] in ("dwconv_bn_act", "bn_act"):
        act = call["options"]["activation"]
        conv = dict(stride=t["stride"], padding=t["padding"], eps=1e-5)
        w = t["w"]
        return [
            ("inference", lambda: dwconv.forward(x, w, stat, stat, stat, stat, out=t["y"], activation=act,
                                                 norm="running", **conv)),
            ("train forward", lambda: (dwconv.batch_stats(x, w, stat, stat, momentum=0.1, **conv),
                                       dwconv.forward(x, w, stat, stat, stat, stat, out=t["y"], activation=act,
                                                      norm="batch", **conv))),
            ("train backward", lambda: dwconv.backward(t["y"], x, w, stat, stat, stat, stat, activation=act,
                                                       norm="batch", weight_grad=w is not None,
                                                       memory_format=layout, **conv)),
        ]
    gate, post = call["options"]["gate"], call["options"]["post_act"]
    forward = lambda: se.forward(x, t["w1"], t["b1"], t["w2"], t["b2"], out=t["y"], gate=gate, post_act=post)
    pooled = stat.new_ones(x.shape[:2])
    return [
        ("train forward", forward),
        ("train backward", lambda: se.backward(x, x, t["w1"], t["b1"], t["w2"], t["b2"], pooled, pooled, gate=gate,
                                               post_act=post, memory_format=layout)),
    ]


def _min_bytes(kernel: str, args: dict) -> int:
    reads, writes = TRITON_ROLES.get(kernel, ((), ()))
    seen, total = set(), 0
    for name in reads + writes:
        tensor = args[name]
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


class _TritonCompiler:
    """Sends captured launches through Triton's path with the stand-in driver and reads what
    came out: ptxas's log per compiled kernel (rerun on the kernel's PTX, same flags), the PTX."""

    def __init__(self):
        sys.path.insert(0, str(HERE))
        import triton_launch_path as stand_in_driver

        self.driver = stand_in_driver
        self.stand_in = stand_in_driver.install()
        from mobileops.kernels import _common as common

        self.common = common
        stand_in_driver.patch_for_cpu_tensors(common)
        self.by_hash: dict[str, dict] = {}

    def capture(self, helper) -> list[tuple]:
        return self.driver.capture(self.common, helper)

    def compile(self, captured, grid: tuple) -> tuple[int, dict, tuple]:
        """(num_warps, resources, PTX access widths) of one captured launch with its ``grid``."""
        kernel, _, _, args, meta = captured
        meta = dict(meta)
        warps = meta.pop("num_warps", 4)
        compiled = kernel[grid](**args, **meta, num_warps=warps)
        key = compiled.hash
        if key not in self.by_hash:
            ptx = compiled.asm["ptx"]
            resources = self._ptxas(ptx, compiled.metadata.name)
            resources["shared_bytes"] = max(resources["shared_bytes"], int(compiled.metadata.shared))
            resources["barriers"] = barrier_count(ptx)
            resources["loop_barriers"] = loop_barrier_count(ptx)
            self.by_hash[key] = dict(resources=resources, widths=access_widths(ptx))
        found = self.by_hash[key]
        return warps, found["resources"], found["widths"]

    @staticmethod
    def _ptxas(ptx: str, name: str) -> dict:
        import subprocess
        import tempfile

        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(90).path  # the one Triton compiled the kernel with
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "kernel.ptx"
            src.write_text(ptx)
            done = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", str(src), "-o",
                                   str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"ptxas failed on {name}: {done.stderr[-2000:]}")
        return parse_ptxas(done.stdout + done.stderr).get(name, dict(registers=0, spills=0, shared_bytes=0))


#: The Triton kernels that reduce over positions (one program per chunk and channel block).
REDUCING_KERNELS = ("_stats_kernel", "_grad_sums_kernel", "_grad_input_kernel", "_pool_mlp_kernel",
                    "_pool_mlp_backward_kernel")
#: The CUDA kernels that reduce over positions (one block per chunk and channel group).
CUDA_REDUCING_KERNELS = ("stats_kernel", "grad_sums_kernel", "grad_input_kernel", "se_channel_sum_kernel")


def triton_launches(calls: list[dict], dtype_name: str, layout_name: str, compiler: _TritonCompiler):
    """(call, pass name, captured launch, grid) of every Triton launch of these op calls; the
    launch helpers run on CPU tensors of the real shapes, nothing is compiled."""
    import torch

    dtype = getattr(torch, dtype_name)
    layout = torch.channels_last if layout_name == "channels_last" else torch.contiguous_format
    for call in calls:
        tensors = _layer_tensors(torch, call, dtype, layout)
        for pass_name, helper in triton_passes(call, tensors, layout):
            for captured in compiler.capture(helper):
                meta = {k: v for k, v in captured[4].items() if k != "num_warps"}
                yield call, pass_name, captured, tuple(captured[2](meta))


def triton_rows(calls: list[dict], dtype_name: str, layout_name: str) -> list[dict]:
    compiler = _TritonCompiler()
    rows = []
    for call, pass_name, captured, grid in triton_launches(calls, dtype_name, layout_name, compiler):
        name = captured[0].__name__
        warps, resources, widths = compiler.compile(captured, grid)
        meta = {k: v for k, v in captured[4].items() if k != "num_warps"}
        if "CHUNK" in captured[3]:
            meta["CHUNK"] = captured[3]["CHUNK"]
        rows.append(launch_row("triton", name, grid, warps, resources, widths, _min_bytes(name, captured[3]),
                               bool(TRITON_ROLES.get(name, ((), ()))[1]), op=call["op"], shape=list(call["shape"]),
                               **{"pass": pass_name}, options=call["options"], detector=call["detector"],
                               dtype=dtype_name, layout=layout_name, config=meta))
    return rows


# ----------------------------------------------------------------------------------------------
# The CUDA extension
# ----------------------------------------------------------------------------------------------

CUDA_SOURCES = ("dwconv_bn_act_fwd.cu", "dwconv_bn_act_bwd.cu", "squeeze_excite_fwd.cu", "squeeze_excite_bwd.cu")
CUDA_TYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16"}
#: The csrc kernels that write activation-sized tensors (their stores should be 16-byte vectors).
CUDA_ACTIVATION_WRITERS = ("apply_kernel", "grad_input_kernel", "dx_kernel", "scale_kernel")


def cuda_constants() -> dict[str, int]:
    """The block-size constants of csrc (``constexpr int kName = value;``), read from the source
    so that the grids here follow the launch code."""
    found = {}
    for path in sorted((ROOT / "csrc").glob("*.cu*")):
        for name, value in re.findall(r"constexpr int (k[A-Za-z]+) = (\d+);", path.read_text()):
            found[name] = int(value)
    return found


def _nvcc() -> str:
    import shutil

    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = str(Path(home) / "bin" / "nvcc") if home else shutil.which("nvcc")
    if not nvcc or not Path(nvcc).exists():
        raise SystemExit("the cuda part of the report needs nvcc (set CUDA_HOME or PATH), or pass --backend triton")
    return nvcc


def _demangled_template(mangled: str) -> tuple[str, tuple[str, ...]]:
    """('grad_sums_kernel', ('__half', '3')) from a mangled entry name."""
    import subprocess

    text = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout.strip()
    head = text.replace("(anonymous namespace)::", "").split("(")[0].removeprefix("void ")
    match = re.search(r"([A-Za-z_0-9]+)<(.*)>$", head)
    if not match:
        return head.split("::")[-1], ()
    return match.group(1), tuple(a.strip() for a in match.group(2).split(","))


def _ptx_entries(ptx: str) -> dict[str, str]:
    """PTX text per ``.entry`` (global function)."""
    out = {}
    for match in re.finditer(r"\.entry\s+([A-Za-z0-9_$]+)\s*\(", ptx):
        end = ptx.find("\n}", match.end())
        out[match.group(1)] = ptx[match.start():end]
    return out


def compile_cuda() -> tuple[dict[tuple, dict], str]:
    """{(kernel, template args): {"resources", "widths"}} of every csrc kernel for sm_90, and
    nvcc's version."""
    import subprocess
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    nvcc = _nvcc()
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    flags = ["-O3", "-std=c++17", "-arch=sm_90", f"-I{ROOT / 'csrc'}"]

    def build(source: str, tmp: str) -> tuple[str, str]:
        src = str(ROOT / "csrc" / source)
        ptx = Path(tmp) / (source + ".ptx")
        subprocess.run([nvcc, *flags, "-ptx", src, "-o", str(ptx)], check=True, capture_output=True)
        log = subprocess.run([nvcc, *flags, "-cubin", "-Xptxas", "-v", src, "-o", str(Path(tmp) / (source + ".cubin"))],
                             check=True, capture_output=True, text=True)
        return ptx.read_text(), log.stdout + log.stderr

    found = {}
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for ptx, log in pool.map(lambda source: build(source, tmp), CUDA_SOURCES):
            entries = _ptx_entries(ptx)
            for mangled, resources in parse_ptxas(log).items():
                name, targs = _demangled_template(mangled)
                resources["barriers"] = barrier_count(entries.get(mangled, ""))
                resources["loop_barriers"] = loop_barrier_count(entries.get(mangled, ""))
                found[(name, targs)] = dict(resources=resources, widths=access_widths(entries.get(mangled, "")))
    return found, version


def _blocks_for(total: int, threads: int) -> int:
    return min(-(-total // threads), 65535 * 16)  # csrc/common.cuh blocks_for


def cuda_launches(call: dict, dtype_name: str, channels_last: bool, k: dict) -> list[tuple]:
    """(pass, kernel, template args, grid, threads per block, roles -> bytes) of each launch of
    this op call that moves activations (the small finalize and row-sum launches are left out)."""
    from mobileops.codes import ACTIVATION_CODES
    from mobileops.cuda.dwconv_bn_act import _chunking, pack_width, reduce_shape

    n, c, h, w = call["shape"]
    elem = 2
    t = CUDA_TYPES[dtype_name]
    threads, reduce_threads = k["kThreads"], k["kReduceThreads"]
    full = pack_width(elem)

    def fitting(per_thread: int) -> int:
        """A kernel's channels per thread (csrc/common.cuh packs_fit: the report's tensors are
        contiguous, so channels_last and C a multiple of the pack decide), else one."""
        return per_thread if channels_last and per_thread > 1 and c % per_thread == 0 else 1

    def reducing(per_lane: int) -> tuple[str, int]:
        """(template V, channel groups) of a reducing kernel with per_lane channels where they fit."""
        v = fitting(per_lane)
        return str(v), reduce_shape(c, v, elem, channels_last)[2]

    def elementwise(spatial_w: int, conv: bool) -> tuple[int, str]:
        """(columns or channels per thread, pack axis) of an elementwise kernel: channel packs in
        channels_last, else packs along W without a conv (csrc/common.cuh w_packs_fit, W a
        multiple of the pack), else one element (axis kPackChannels = 0, kPackW = 1)."""
        if channels_last:
            return fitting(full), "0"
        return (full, "1") if not conv and full > 1 and spatial_w % full == 0 else (1, "0")

    sum_vec, groups = reducing(full)
    x_bytes = n * c * h * w * elem
    if call["op"] == "squeeze_excite":
        gate, post = ACTIVATION_CODES[call["options"]["gate"]], ACTIVATION_CODES[call["options"]["post_act"]]
        se = k["kSeThreads"]
        width, axis = elementwise(w, conv=False)
        grid = (_blocks_for(n * c * h * w // width, se),)
        sum_grid = (n * _chunking(h * w, c, elem, channels_last, samples=n)[1], groups)
        return [("train forward", "se_channel_sum_kernel", (t, sum_vec), sum_grid, reduce_threads, x_bytes),
                ("train forward", "mlp_kernel", ("float", str(gate)), (n,), se, 0),
                ("train forward", "scale_kernel", (t, str(post), str(width), axis), grid, se, 2 * x_bytes),
                ("train backward", "se_channel_sum_kernel", (t, sum_vec), sum_grid, reduce_threads, x_bytes),
                ("train backward", "mlp_backward_kernel", ("float", str(gate)), (n,), se, 0),
                ("train backward", "dx_kernel", (t, str(width), axis), grid, se, 3 * x_bytes)]
    act = str(ACTIVATION_CODES[call["options"]["activation"]])
    if call["op"] == "bn_act":
        kk, ho, wo = 0, h, w
    else:
        kk, s = call["options"]["kernel"], call["options"]["stride"]
        pad = (kk - 1) // 2
        ho, wo = (h + 2 * pad - kk) // s + 1, (w + 2 * pad - kk) // s + 1
    y_bytes = n * c * ho * wo * elem
    out_total = n * c * ho * wo
    chunk, chunks = _chunking(n * ho * wo, c, elem, channels_last)
    reduce_grid = (chunks, groups)
    # csrc/dwconv_bn_act_bwd.cu grad_input_vec: half a pack at 3x3, a quarter at 5x5 and 7x7
    input_vec, input_groups = reducing(max(1, full // (1 if kk == 0 else 2 if kk == 3 else 4)))
    width, axis = elementwise(wo, conv=kk > 0)
    apply_grid = (_blocks_for(out_total // width, threads),)
    apply = (t, str(kk), act, str(width), axis)
    rows = [("inference", "apply_kernel", apply, apply_grid, threads, x_bytes + y_bytes),
            ("train forward", "stats_kernel", (t, str(kk), sum_vec), reduce_grid, reduce_threads, x_bytes),
            ("train forward", "apply_kernel", apply, apply_grid, threads, x_bytes + y_bytes),
            ("train backward", "grad_sums_kernel", (t, str(kk), sum_vec), reduce_grid, reduce_threads,
             x_bytes + y_bytes),
            ("train backward", "grad_input_kernel", (t, str(kk), input_vec), (chunks, input_groups), reduce_threads,
             x_bytes + 2 * y_bytes)]
    if kk:
        width = fitting(full)  # the transposed conv: channel packs only
        rows.append(("train backward", "dx_kernel", (t, str(kk), str(width)),
                     (_blocks_for(n * c * h * w // width, threads),), threads, y_bytes + x_bytes))
    return rows


def cuda_rows(calls: list[dict], dtype_name: str, layout_name: str) -> tuple[list[dict], str]:
    compiled, version = compile_cuda()
    constants = cuda_constants()
    rows = []
    for call in calls:
        for pass_name, kernel, targs, grid, threads, min_bytes in cuda_launches(
                call, dtype_name, layout_name == "channels_last", constants):
            found = compiled.get((kernel, targs))
            if found is None:
                raise SystemExit(f"no compiled csrc kernel {kernel}<{', '.join(targs)}> (the report's launch "
                                 f"table no longer matches csrc)")
            config = dict(template="<" + ", ".join(targs) + ">", threads=threads)
            rows.append(launch_row("cuda", kernel, grid, threads // 32, found["resources"], found["widths"],
                                   min_bytes, kernel in CUDA_ACTIVATION_WRITERS, op=call["op"],
                                   shape=list(call["shape"]), **{"pass": pass_name}, options=call["options"],
                                   detector=call["detector"], dtype=dtype_name, layout=layout_name, config=config))
    return rows, version


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def summary(rows: list[dict]) -> list[dict]:
    """One line per (backend, op, pass, kernel): the range over the layers."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["backend"], row["op"], row["pass"], row["kernel"]), []).append(row)
    out = []
    for (backend, op, pass_name, kernel), mine in groups.items():
        big = [r for r in mine if r["min_bytes"] >= 16e6] or mine
        out.append(dict(backend=backend, op=op, **{"pass": pass_name}, kernel=kernel, layers=len(mine),
                        registers=(min(r["registers"] for r in mine), max(r["registers"] for r in mine)),
                        spills=max(r["spills"] for r in mine),
                        barriers=(min(r["barriers"] for r in mine), max(r["barriers"] for r in mine)),
                        loop_barriers=max(r["loop_barriers"] for r in mine),
                        shared_bytes=max(r["shared_bytes"] for r in mine),
                        occupancy=(min(r["occupancy"] for r in mine), max(r["occupancy"] for r in mine)),
                        programs_per_sm_16mb=(min(r["programs_per_sm"] for r in big),
                                              statistics.median(r["programs_per_sm"] for r in big)),
                        vector_loads=sum(r["vector_loads"] for r in mine), warps=sorted({r["warps"] for r in mine})))
    return out


def _span(pair, fmt="{}") -> str:
    low, high = pair
    return fmt.format(low) if low == high else f"{fmt.format(low)}-{fmt.format(high)}"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"Static report: {meta['dtype']}, {meta['layout']}, batch {BATCH}, 640x640, sm_90 "
             f"({meta['triton_config']}); triton {meta['triton']}, nvcc {meta.get('nvcc', '-')}.", "",
             "| backend | op | pass | kernel | layers | warps | registers | spills (B) | shared (B) | "
             "barriers (in loops) | occupancy | programs/SM (>= 16 MB: min, median) | 16-byte loads+stores |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary(rows):
        lines.append(f"| {s['backend']} | {s['op']} | {s['pass']} | {s['kernel']} | {s['layers']} | "
                     f"{','.join(map(str, s['warps']))} | {_span(s['registers'])} | {s['spills']} | "
                     f"{s['shared_bytes']} | {_span(s['barriers'])} ({s['loop_barriers']}) | "
                     f"{_span(s['occupancy'], '{:.0%}')} | "
                     f"{s['programs_per_sm_16mb'][0]:g}, {s['programs_per_sm_16mb'][1]:g} | "
                     f"{s['vector_loads']} of {s['layers']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file to write (the table goes to the same name .md)")
    parser.add_argument("--backend", choices=["triton", "cuda", "both"], default="both")
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    parser.add_argument("--layout", choices=["channels_last", "nchw"], default="channels_last")
    parser.add_argument("--quick", action="store_true",
                        help="per op the largest and smallest layer, and a 5x5 one with C %% 16 != 0")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: the kernels must be compiled, not interpreted")
    os.environ["MOBILEOPS_AUTOTUNE"] = "0"  # the fixed configuration (the autotuner's pick needs a GPU)
    import triton

    calls = layer_calls(args.quick)
    rows = []
    meta = dict(dtype=args.dtype, layout=args.layout, triton=triton.__version__, python=platform.python_version(),
                triton_config="triton: fixed configuration, MOBILEOPS_AUTOTUNE=0")
    if args.backend in ("triton", "both"):
        rows += triton_rows(calls, args.dtype, args.layout)
    if args.backend in ("cuda", "both"):
        cuda, meta["nvcc"] = cuda_rows(calls, args.dtype, args.layout)
        rows += cuda
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    table = markdown(rows, meta)
    out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
