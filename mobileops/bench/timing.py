"""Timers, the copy-bandwidth reference and the environment record of a benchmark run.

GPU times are CUDA-event timings (``triton.testing.do_bench``) or, for launch-bound cases,
CUDA-graph replays (``do_bench_cudagraph``); CPU times are ``perf_counter`` around single
calls. The samplers return every timed call (milliseconds), the ``*_time_ms`` helpers their
median. Every timer calls the function once first, so
autotuning, compilation and cuDNN's algorithm search happen outside the measurement.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

#: H100 L2 size; inputs smaller than a few times this are rotated so reads come from HBM.
L2_BYTES = 50 * 2 ** 20


def cuda_samples_ms(fn: Callable[[], object], graph: bool = False) -> list[float]:
    """Milliseconds of each timed run of ``fn`` on the current CUDA stream (CUDA events, or
    graph replays when ``graph``)."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    if graph:
        samples = triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="all")
    else:
        samples = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="all")
    return [float(t) for t in samples]


def cuda_time_ms(fn: Callable[[], object], graph: bool = False) -> float:
    """Median milliseconds of ``fn`` on the current CUDA stream (CUDA events or graph replay)."""
    return statistics.median(cuda_samples_ms(fn, graph))


def cpu_time_ms(fn: Callable[[], object], repeat: int = 15, budget_s: float = 2.0) -> float:
    """Median milliseconds of ``repeat`` calls, fewer when one call is slow (at least 3)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    repeat = max(3, min(repeat, int(budget_s / max(first, 1e-9))))
    times: list[float] = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def interleaved_cpu_samples_ms(fns: dict[str, Callable[[], object]], rounds: int = 15,
                               budget_s: float = 4.0) -> dict[str, list[float]]:
    """Milliseconds of each call of each function, timed in turn round after round, so that a
    shared machine's slow spells hit every implementation alike (side-by-side ratios stay
    meaningful on a CPU where absolute times drift). At least 3 rounds, fewer than
    ``rounds`` when one round would exceed ``budget_s / rounds``."""
    first = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - start
    rounds = max(3, min(rounds, int(budget_s / max(sum(first.values()), 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return samples


def time_ms(fn: Callable[[], object], device: torch.device, graph: bool = False) -> float:
    """Median milliseconds of ``fn`` with the timer that suits ``device``."""
    return cuda_time_ms(fn, graph) if device.type == "cuda" else cpu_time_ms(fn)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a device copy (bytes read + bytes written): the roofline reference.

    1 GiB on a GPU, 64 MiB on a CPU (both far larger than the last-level cache).
    """
    numel = 2 ** 28 if device.type == "cuda" else 2 ** 24
    src = torch.empty(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * numel * 4 / (ms * 1e-3)


class Rotation:
    """Cycles through copies of a tensor so that consecutive calls do not hit in the L2."""

    def __init__(self, x: torch.Tensor, bytes_needed: int = 4 * L2_BYTES, limit: int = 16):
        count = min(limit, max(1, math.ceil(bytes_needed / max(1, x.numel() * x.element_size()))))
        self.tensors = [x] + [x.clone() for _ in range(count - 1)]
        self.index = 0

    def next(self) -> torch.Tensor:
        self.index = (self.index + 1) % len(self.tensors)
        return self.tensors[self.index]


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's (processor or architecture) for CPU runs."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def environment(device: torch.device) -> dict:
    """Device, versions and date for the header of a results file."""
    import mobileops

    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               device=device_name(device), device_type=device.type, python=platform.python_version(),
               torch=torch.__version__, cuda=torch.version.cuda, mobileops=mobileops.__version__,
               cpu_threads=torch.get_num_threads(),
               autotune=os.environ.get("MOBILEOPS_AUTOTUNE", "1") != "0")
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env
