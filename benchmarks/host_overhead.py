"""Host time per fused-op call, side by side with the eager PyTorch composition it replaces.

    python benchmarks/host_overhead.py            # CPU: the three CPU modes below, one JSON row each
    python benchmarks/host_overhead.py --real     # GPU host: real launches and eager on CUDA too

Modes (the ``mode`` field of each row):

``mobileops python``
    Kernel launches replaced by no-ops (``mobileops.kernels._common.Prepared`` and
    ``mobileops.kernels._common.launch``) in Triton's interpreter build: validation, the call
    plan, autograd wiring, allocation and the launchers' own work up to the prepared launch -
    mobileops' own Python. The prepared launch itself (its argument tuple, guards, Triton's
    launcher) is the next mode's. Also counts the launches per call.
``through triton's launcher``
    Run in a subprocess without ``TRITON_INTERPRET``: the kernels are really compiled for sm_90
    and every launch goes through Triton's own Python launch path (and mobileops' direct launch
    of :mod:`mobileops.kernels._launch`); only the C launcher is replaced by a recorder (the
    stand-in driver of ``benchmarks/triton_launch_path.py``). On a CPU this is the whole host
    path of a call except the driver's own launch cost.
``eager composition``
    The plain PyTorch ops the fused op replaces (conv2d, batch_norm, the activation; SE's pool,
    linears and gate). On a CPU they run on a tiny float32 tensor (:data:`EAGER_CPU_SHAPE`,
    a few hundred flops per op): PyTorch's dispatcher, allocation and autograd recording with
    next to no compute, the CPU's proxy for the host time eager mode spends per call on a GPU.
    (The meta device is no proxy: its convolution and batch-norm shape functions are Python and
    take milliseconds.) On CUDA the real ops at the real shape.
``autograd floor``
    For each training forward+backward: one ``torch.autograd.Function`` over the same inputs
    whose forward and backward only allocate their outputs, called and differentiated with
    ``autograd.grad`` as the fused op is. PyTorch's own cost of any differentiable call
    (Function.apply, graph recording, the engine), which no library can go below: the part of a
    fused call above it is what mobileops can still cut.
``real launches`` (``--real`` only)
    The fused op with its kernels really launched; synchronising once per repeat.

Every row: call, backend, dtype, shape, layout, launches (per call, counted in the first mode),
us_median / us_min / us_max over ``--repeats`` timings of ``--iterations`` calls, device and
versions. The default shape is a detector-like layer: batch 32, 128 channels, 20x20,
channels_last, float16.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPE = (32, 128, 20, 20)
EAGER_CPU_SHAPE = (1, 8, 4, 4)
REDUCED = 32  # SE's hidden width (EAGER_CPU_SHAPE: 4)
#: The inputs (keys of ``_inputs``) each op's training forward+backward differentiates.
DIFFERENTIATED = {"dwconv_bn_act": ("x", "w", "gamma", "beta"), "bn_act": ("x", "gamma", "beta"),
                  "squeeze_excite": ("x", "fc1", "fc2")}
WARMUP_CALLS = 5  # untimed calls before each timing (the launch count divides them out)
LAUNCHER_MODE = "through triton's launcher"


def _inputs(device, dtype, shape=SHAPE):
    g = torch.Generator().manual_seed(0)

    def t(*size, scale=1.0):
        return (scale * torch.randn(*size, generator=g)).to(device=device, dtype=dtype)

    c = shape[1]
    reduced = REDUCED if shape == SHAPE else max(1, c // 2)
    x = t(*shape).contiguous(memory_format=torch.channels_last)
    stat_kw = dict(device=device, dtype=torch.float32 if dtype != torch.float64 else dtype)
    return dict(x=x, w=t(c, 1, 3, 3), gamma=torch.ones(c, **stat_kw), beta=torch.zeros(c, **stat_kw),
                rm=torch.zeros(c, **stat_kw), rv=torch.ones(c, **stat_kw), fc1=t(reduced, c, scale=0.1),
                fc2=t(c, reduced, scale=0.1), dy=torch.ones_like(x))


def _trainable(a: dict) -> dict:
    a = dict(a)
    for name in ("x", "w", "gamma", "beta", "fc1", "fc2"):
        a[name] = a[name].detach().clone().requires_grad_(True)
    return a


def fused_calls(device, dtype) -> dict:
    """name -> (zero-argument call of mobileops' op, needs grad)."""
    from mobileops import ops

    a, t = _inputs(device, dtype), _trainable(_inputs(device, dtype))

    def dw_train():
        return ops.dwconv_bn_act(t["x"], t["w"], t["gamma"], t["beta"], t["rm"], t["rv"], activation="hswish",
                                 training=True)

    def bn_train():
        return ops.bn_act(t["x"], t["gamma"], t["beta"], t["rm"], t["rv"], activation="hswish", training=True)

    def se_train():
        return ops.squeeze_excite(t["x"], t["fc1"], None, t["fc2"], None, gate="hsigmoid", post_act="none")

    return _with_backward({
        "bn_act inference": lambda: ops.bn_act(a["x"], a["gamma"], a["beta"], a["rm"], a["rv"], activation="relu6"),
        "dwconv_bn_act inference": lambda: ops.dwconv_bn_act(a["x"], a["w"], a["gamma"], a["beta"], a["rm"],
                                                             a["rv"], activation="relu6"),
        "squeeze_excite inference": lambda: ops.squeeze_excite(a["x"], a["fc1"], None, a["fc2"], None),
        "dwconv_bn_act train forward": dw_train,
    }, {"dwconv_bn_act": dw_train, "bn_act": bn_train, "squeeze_excite": se_train}, t)


def eager_calls(device, dtype, shape=SHAPE) -> dict:
    """The same calls as :func:`fused_calls` through the plain PyTorch ops."""
    a, t = _inputs(device, dtype, shape), _trainable(_inputs(device, dtype, shape))

    def conv_bn(v, act, training):
        y = F.conv2d(v["x"], v["w"], None, 1, 1, 1, v["x"].shape[1])
        return act(F.batch_norm(y, v["rm"], v["rv"], v["gamma"], v["beta"], training, 0.1, 1e-5))

    def bn(v, act, training):
        return act(F.batch_norm(v["x"], v["rm"], v["rv"], v["gamma"], v["beta"], training, 0.1, 1e-5))

    def se(v):
        hidden = F.relu(F.linear(v["x"].mean(dim=(2, 3)), v["fc1"]))
        return v["x"] * F.hardsigmoid(F.linear(hidden, v["fc2"]))[:, :, None, None]

    return _with_backward({
        "bn_act inference": lambda: bn(a, F.relu6, False),
        "dwconv_bn_act inference": lambda: conv_bn(a, F.relu6, False),
        "squeeze_excite inference": lambda: se(a),
        "dwconv_bn_act train forward": lambda: conv_bn(t, F.hardswish, True),
    }, {"dwconv_bn_act": lambda: conv_bn(t, F.hardswish, True), "bn_act": lambda: bn(t, F.hardswish, True),
        "squeeze_excite": lambda: se(t)}, t)


class _NoOpCall(torch.autograd.Function):
    """Allocates its output and its inputs' gradients, nothing else (the autograd floor)."""

    @staticmethod
    def forward(ctx, x, *params):
        ctx.save_for_backward(x, *params)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, dy):
        return tuple(torch.empty_like(t) for t in ctx.saved_tensors)


def floor_calls(device, dtype) -> dict:
    """name -> zero-argument call: each op's training forward+backward as a no-op Function over
    the inputs the fused op differentiates."""
    t = _trainable(_inputs(device, dtype))
    forwards = {op: functools.partial(_NoOpCall.apply, *(t[n] for n in names)) for op, names in DIFFERENTIATED.items()}
    return {name: fn for name, (fn, _) in _with_backward({}, forwards, t).items()}


def _with_backward(calls: dict, forwards: dict, t: dict) -> dict:
    """Add a ``<op> train forward+backward`` call per op of ``forwards`` (op -> its training
    forward): ``autograd.grad`` over :data:`DIFFERENTIATED` (not ``backward()``, whose
    accumulation into ``.grad`` would add a pass over x)."""
    def step(forward, names):
        return lambda: torch.autograd.grad(forward(), [t[n] for n in names], t["dy"])

    calls = {name: (fn, "train" in name) for name, fn in calls.items()}
    for op, forward in forwards.items():
        calls[f"{op} train forward+backward"] = (step(forward, DIFFERENTIATED[op]), True)
    return calls


@contextlib.contextmanager
def launches_stubbed(counter: list):
    """Every Triton launch of mobileops goes through a prepared launch (``kernels._common.Prepared``,
    whose direct relaunch builds no argument dict) or ``kernels._common.launch``: count, do not
    run."""
    from mobileops.kernels import _common

    real_launch, real_prepared, real_check = _common.launch, _common.Prepared.__call__, _common.check_device
    _common.launch = lambda *args, **kwargs: counter.append(1)
    _common.Prepared.__call__ = lambda self, *values: counter.append(1)
    _common.check_device = lambda x: None
    try:
        yield
    finally:
        _common.launch, _common.Prepared.__call__, _common.check_device = real_launch, real_prepared, real_check


def time_us(fn, grad: bool, iterations: int, repeats: int, sync) -> list[float]:
    """Microseconds per call, one value per repeat of ``iterations`` calls."""
    with contextlib.nullcontext() if grad else torch.no_grad():
        for _ in range(WARMUP_CALLS):
            fn()
        sync()
        samples = []
        for _ in range(repeats):
            began = time.perf_counter()
            for _ in range(iterations):
                fn()
            sync()
            samples.append((time.perf_counter() - began) / iterations * 1e6)
    return samples


def _row(meta: dict, call: str, mode: str, backend: str, samples: list[float], launches, dtype, iterations,
         shape=SHAPE) -> dict:
    return dict(meta, call=call, mode=mode, backend=backend, dtype=str(dtype).replace("torch.", ""),
                shape=list(shape), layout="channels_last", launches=launches,
                us_median=round(statistics.median(samples), 1), us_min=round(min(samples), 1),
                us_max=round(max(samples), 1), n=len(samples) * iterations)


def _meta(device: torch.device, extra: str = "") -> dict:
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor()
                                                                              or platform.machine())
    return dict(device=name + extra, torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), cores=os.cpu_count(),
                # kernels/_launch.py's direct launch (on unless MOBILEOPS_TRITON_FAST_LAUNCH=0)
                fast_launch=os.environ.get("MOBILEOPS_TRITON_FAST_LAUNCH", "1") != "0")


def _launcher_rows(args) -> list[dict]:
    """The 'through triton's launcher' rows, measured in a subprocess (see the module doc)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, __file__, "--launcher-mode", "--iterations", str(args.iterations),
               "--repeats", str(args.repeats), "--dtype", args.dtype]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.launcher_timeout)
    if done.returncode != 0:
        raise SystemExit(f"the launcher-mode subprocess failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def install_stand_in_driver() -> None:
    """Make the triton backend compile for and launch through the stand-in CUDA sm_90 driver of
    ``triton_launch_path.py`` on CPU tensors (run without ``TRITON_INTERPRET``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import triton_launch_path as stand_in_driver

    stand_in_driver.install()
    from mobileops import backend
    from mobileops.kernels import _common

    stand_in_driver.patch_for_cpu_tensors(_common)
    real_problem = backend._backend_problem
    backend._backend_problem = lambda name, device: None if name == "triton" else real_problem(name, device)
    backend.forget_choices()


def _launcher_mode(args) -> None:
    """In the subprocess: the fused calls with the stand-in driver (no GPU needed)."""
    install_stand_in_driver()
    from mobileops import use_backend

    dtype = getattr(torch, args.dtype)
    meta = _meta(torch.device("cpu"), " (stand-in CUDA sm_90 driver: compiled, launches recorded)")
    with use_backend("triton"):
        for call, (fn, grad) in fused_calls(torch.device("cpu"), dtype).items():
            samples = time_us(fn, grad, args.iterations, args.repeats, lambda: None)
            print(json.dumps(_row(meta, call, LAUNCHER_MODE, "triton", samples, None, dtype, args.iterations)),
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=200, help="calls per timed repeat")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--real", action="store_true", help="also time real launches and eager on CUDA")
    parser.add_argument("--no-launcher", action="store_true", help="skip the 'through triton's launcher' mode")
    parser.add_argument("--launcher-timeout", type=float, default=1200, help="seconds for that mode's subprocess")
    parser.add_argument("--launcher-mode", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.launcher_mode:
        return _launcher_mode(args)
    cuda = torch.cuda.is_available()
    if args.real and not cuda:
        raise SystemExit("--real needs a CUDA device")
    if not cuda and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        os.environ["TRITON_INTERPRET"] = "1"  # before mobileops defines its kernels
    device = torch.device("cuda" if cuda else "cpu")
    threads = torch.get_num_threads()
    if not cuda:
        # One thread: a CPU op's thread pool would wake workers for tiny tensors (and wait for
        # them on a busy machine), which is no part of the per-call cost this measures.
        torch.set_num_threads(1)
    try:
        rows = _measure(args, device)
    finally:
        torch.set_num_threads(threads)
    for row in rows:
        print(json.dumps(row), flush=True)


def _measure(args, device: torch.device) -> list[dict]:
    import mobileops

    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    meta = _meta(device)
    rows, launches = [], {}
    with mobileops.use_backend("triton"):
        for call, (fn, grad) in fused_calls(device, dtype).items():
            counter = []
            with launches_stubbed(counter):
                samples = time_us(fn, grad, args.iterations, args.repeats, sync)
            launches[call] = len(counter) // (args.iterations * args.repeats + WARMUP_CALLS)
            rows.append(_row(meta, call, "mobileops python", "triton", samples, launches[call], dtype,
                             args.iterations))
            if args.real:
                samples = time_us(fn, grad, args.iterations, args.repeats, sync)
                rows.append(_row(meta, call, "real launches", "triton", samples, launches[call], dtype,
                                 args.iterations))
    for call, fn in floor_calls(device, dtype).items():
        samples = time_us(fn, True, args.iterations, args.repeats, sync)
        rows.append(_row(meta, call, "autograd floor", "torch", samples, 0, dtype, args.iterations))
    eager_dtype, eager_shape = (dtype, SHAPE) if cuda else (torch.float32, EAGER_CPU_SHAPE)
    for call, (fn, grad) in eager_calls(device, eager_dtype, eager_shape).items():
        samples = time_us(fn, grad, args.iterations, args.repeats, sync)
        rows.append(_row(meta, call, "eager composition", "eager", samples, None, eager_dtype, args.iterations,
                         eager_shape))
    if not cuda and not args.no_launcher:
        for row in _launcher_rows(args):
            rows.append(dict(row, launches=launches.get(row["call"])))
    return rows


if __name__ == "__main__":
    main()
