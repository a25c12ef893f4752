"""Microseconds per Triton launch of mobileops' real kernels through Triton's normal Python path
and through the direct launch of :mod:`mobileops.kernels._launch`, on a machine without a GPU:

    python benchmarks/triton_launch_path.py [--launches 2000] [--repeats 9]

A stand-in driver makes Triton believe a CUDA sm_90 device is current (device 0, stream 0):
the kernels are really compiled to cubin with ptxas, ``load_binary`` hands out fake module and
function handles, and only the launcher that ``CompiledKernel.run`` would be (Triton's C
launcher) is replaced by a recorder of its arguments. Everything before it, Triton's
binding, specialization, cache lookups, autotuner and launch metadata, runs as on a GPU. The
autotuner's benchmarker is a stand-in too: it compiles and "runs" only the first candidate and
reports it fastest (real timing needs the GPU), so tuning a shape compiles one config.

Each case is one launch captured from mobileops' own launch helper (``dwconv_bn_act.forward``,
``squeeze_excite.forward``, ``_common.sum_rows``) on CPU tensors, then replayed through
``_common.launch`` with the fast path off (Triton's path) and on, then as the launchers make
it, a ``_common.Prepared`` launch given its tensors and floats (path ``prepared``: the direct
relaunch, no argument dict). Every path must hand the launcher the same grid, stream, function,
metadata, hooks and arguments; the row says so.
Prints one JSON object per (call, path): microseconds per launch (median / min / max over the
repeats, wall clock; ``cpu_us_median`` from this thread's CPU time, which a busy machine
inflates less), the launches per repeat, triton, python and the device.

Run without ``TRITON_INTERPRET``: the kernel modules decide at import whether they compile.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime.driver import driver as triton_driver

#: H100/H200 (sm_90) limits the compiler and CompiledKernel check against.
SM90_PROPERTIES = {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                   "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}


class _StandInUtils:
    """The part of Triton's CudaUtils that compiling and loading a kernel touches."""

    def __init__(self):
        self._handles = itertools.count(1)

    def load_binary(self, name, kernel, shared, device):
        # (module, function, n_regs, n_spills, n_max_threads): distinct handles per loaded kernel
        return next(self._handles), next(self._handles), 32, 0, 1024

    def unload_module(self, module):
        pass

    def get_device_properties(self, device):
        return dict(SM90_PROPERTIES)


class StandInDriver(DriverBase):
    """A CUDA sm_90 target without a GPU; the launcher records its arguments instead of launching.

    ``last`` holds the arguments of the latest launch (exactly what Triton's C launcher would
    have received), ``launches`` counts them."""

    def __init__(self):
        super().__init__()
        self.utils = _StandInUtils()
        self.last = None
        self.launches = 0
        stand_in = self

        class RecordingLauncher:
            def __init__(self, src, metadata):
                pass

            def __call__(self, *launch_args):
                stand_in.last = launch_args
                stand_in.launches += 1

        self.launcher_cls = RecordingLauncher

    @classmethod
    def is_active(cls):
        return True

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError("the stand-in driver builds no C launcher")

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        if device != 0:
            raise ValueError("the stand-in driver has device 0 only")

    def get_current_stream(self, device):
        return 0

    def get_device_capability(self, device):
        return (9, 0)

    def get_benchmarker(self):
        def first_config_fastest(kernel_call, quantiles):
            # Autotuner._bench calls this once per candidate, in order: compile and "run" the
            # first, report every later one slower without compiling it.
            self._bench_calls = getattr(self, "_bench_calls", 0) + 1
            if self._bench_calls == 1:
                kernel_call()
                return [1.0, 1.0, 1.0]
            return [float("inf")] * 3

        return first_config_fastest

    def start_tuning(self) -> None:
        """Make the next autotuning pick its first candidate again."""
        self._bench_calls = 0


def install() -> StandInDriver:
    """Make a new stand-in the active Triton driver and return it; :func:`uninstall` undoes it."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: the kernels must be defined for the compiler")
    stand_in = StandInDriver()
    triton_driver.set_active(stand_in)
    return stand_in


def uninstall() -> None:
    triton_driver._active = None  # the next use of driver.active creates the real default again


def patch_for_cpu_tensors(common) -> None:
    """mobileops' helpers refuse CPU tensors outside the interpreter and ask CUDA for the SM
    count; with the stand-in they run on CPU tensors (the recorder never reads them)."""
    common.check_device = lambda x: None
    common.sm_count = lambda device: SM90_PROPERTIES["multiprocessor_count"]


def capture(common, helper) -> list[tuple]:
    """The (kernel, tuned, grid_of, args, meta) of every launch ``helper()`` makes."""
    captured = []
    real = common.launch
    common.launch = lambda *launch: captured.append(launch)
    try:
        helper()
    finally:
        common.launch = real
    return captured


def comparable(launch_args: tuple) -> tuple:
    """A launch's arguments with the launch metadata (a fresh LazyDict per call) as its contents."""
    metadata = launch_args[6]
    return launch_args[:6] + (metadata.get() if metadata is not None else None,) + launch_args[7:]


def cases(common, dwconv, se):
    """(name, captured launch) for the timed calls: 32x128x20x20 fp16 channels_last."""
    from mobileops import backend

    x = torch.randn(32, 128, 20, 20, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    w = torch.randn(128, 1, 3, 3, dtype=torch.float16)
    stat = torch.ones(128)
    y = torch.empty_like(x)
    w1, b1 = torch.randn(32, 128, dtype=torch.float16), torch.zeros(32, dtype=torch.float16)
    w2, b2 = torch.randn(128, 32, dtype=torch.float16), torch.zeros(128, dtype=torch.float16)
    parts = torch.randn(64, 128)

    def forward():
        dwconv.forward(x, w, stat, stat, stat, stat, out=y, stride=1, padding=1, activation="relu6",
                       norm="running", eps=1e-5)

    def squeeze_excite():
        se.forward(x, w1, b1, w2, b2, out=torch.empty_like(x), gate="hsigmoid", post_act="hswish")

    found = []
    os.environ["MOBILEOPS_AUTOTUNE"] = "0"
    backend.forget_choices()  # the launchers read the variable once
    found.append(("dwconv_bn_act._forward_kernel fixed config", capture(common, forward)[0]))
    found.append(("_common.sum_rows_kernel fixed config",
                  capture(common, lambda: common.sum_rows(parts, torch.float32))[0]))
    os.environ["MOBILEOPS_AUTOTUNE"] = "1"
    backend.forget_choices()
    found.append(("dwconv_bn_act._forward_kernel autotuned", capture(common, forward)[0]))
    pool, scale = capture(common, squeeze_excite)
    found.append((f"squeeze_excite.{pool[0].__name__} {'fixed config' if pool[4] else 'autotuned'}", pool))
    found.append((f"squeeze_excite.{scale[0].__name__} {'fixed config' if scale[4] else 'autotuned'}", scale))
    return found


def prepared_launch(common, captured) -> tuple:
    """A captured launch as the launchers make it (``_common.Prepared``, its tensors and floats
    passed per call), and those values."""
    kernel, tuned, grid_of, args, meta = captured
    varying = tuple(k for k, v in args.items() if isinstance(v, (torch.Tensor, float)))
    prepared = common.Prepared(kernel, tuned, grid_of, {k: v for k, v in args.items() if k not in varying}, meta,
                               varying)
    return prepared, tuple(args[k] for k in varying)


def time_launch(launch, captured, launches: int, repeats: int) -> tuple[list[float], list[float]]:
    """Wall and thread-CPU microseconds per launch, one value per repeat."""
    wall, cpu = [], []
    for _ in range(repeats):
        began, began_cpu = time.perf_counter(), time.thread_time()
        for _ in range(launches):
            launch(*captured)
        wall.append((time.perf_counter() - began) / launches * 1e6)
        cpu.append((time.thread_time() - began_cpu) / launches * 1e6)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--launches", type=int, default=2000, help="launches per timed repeat")
    parser.add_argument("--repeats", type=int, default=9)
    options = parser.parse_args()
    stand_in = install()
    from mobileops.kernels import _common as common
    from mobileops.kernels import _launch
    from mobileops.kernels import dwconv_bn_act as dwconv
    from mobileops.kernels import squeeze_excite as se

    if _launch.DISABLED_REASON is not None:
        raise SystemExit(f"the fast path is off on this triton: {_launch.DISABLED_REASON}")
    patch_for_cpu_tensors(common)
    meta = dict(triton=triton.__version__, torch=torch.__version__, python=platform.python_version(),
                device=f"stand-in CUDA sm_90 driver, launches recorded not run; CPU "
                       f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                       f"load {os.getloadavg()[0]:.0f}")
    for name, captured in cases(common, dwconv, se):
        recorded = {}
        for path, fast in (("normal", False), ("fast", True)):
            _launch.enabled = fast
            stand_in.start_tuning()
            for _ in range(3):  # compile / tune, then fill the fast path's cache
                common.launch(*captured)
            recorded[path] = comparable(stand_in.last)
            wall, cpu = time_launch(common.launch, captured, options.launches, options.repeats)
            row = dict(meta, call=name, path=path, us_median=round(statistics.median(wall), 2),
                       us_min=round(min(wall), 2), us_max=round(max(wall), 2),
                       cpu_us_median=round(statistics.median(cpu), 2), n=options.launches,
                       repeats=options.repeats)
            if fast:
                row["same_launch_as_normal"] = recorded["fast"] == recorded["normal"]
            print(json.dumps(row), flush=True)
        prepared, values = prepared_launch(common, captured)
        for _ in range(3):
            prepared(*values)
        wall, cpu = time_launch(prepared, values, options.launches, options.repeats)
        print(json.dumps(dict(meta, call=name, path="prepared", us_median=round(statistics.median(wall), 2),
                              us_min=round(min(wall), 2), us_max=round(max(wall), 2),
                              cpu_us_median=round(statistics.median(cpu), 2), n=options.launches,
                              repeats=options.repeats, direct=prepared.direct is not None,
                              same_launch_as_normal=comparable(stand_in.last) == recorded["normal"])), flush=True)
    _launch.enabled = True


if __name__ == "__main__":
    main()
