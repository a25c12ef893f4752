"""Host time per fused-op call spent in mobileops' own Python (validation, backend selection,
autograd wiring, allocation, launch arguments), measured with the Triton kernel launches
replaced by no-ops, so it runs on any machine:

    TRITON_INTERPRET=1 python benchmarks/host_overhead.py          # CPU
    python benchmarks/host_overhead.py --real                      # GPU: also with real launches

With ``--real`` (CUDA only) each op is timed a second time with its launches, synchronising
once at the end: where the kernels are shorter than the host path this is the call's wall time,
and its difference to the stubbed time is what Triton's launcher and the driver add. Prints
one JSON object per (op, mode) with the device, the versions and microseconds per call (the
median of ``--repeats`` timings of ``--iterations`` calls each).
"""

import argparse
import contextlib
import json
import platform
import statistics
import time

import torch

import mobileops
from mobileops import ops


@contextlib.contextmanager
def _launches_stubbed():
    """Every Triton launch of mobileops goes through kernels._common.launch."""
    from mobileops.kernels import _common

    real_launch, real_check = _common.launch, _common.check_device
    _common.launch = lambda *args, **kwargs: None
    _common.check_device = lambda x: None
    try:
        yield
    finally:
        _common.launch, _common.check_device = real_launch, real_check


def _calls(device: torch.device, dtype: torch.dtype) -> dict:
    """One call per mode, on a detector-like layer: batch 32, 128 channels, 20x20, channels_last."""
    def t(*shape, grad=False):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)

    x = t(32, 128, 20, 20).contiguous(memory_format=torch.channels_last)
    xg = x.detach().clone().requires_grad_(True)
    w, wg = t(128, 1, 3, 3), t(128, 1, 3, 3, grad=True)
    gamma, beta = torch.ones(128, device=device), torch.zeros(128, device=device)
    gamma_g, beta_g = gamma.clone().requires_grad_(True), beta.clone().requires_grad_(True)
    rm, rv = torch.zeros(128, device=device), torch.ones(128, device=device)
    fc1, fc2 = t(32, 128), t(128, 32)
    dy = torch.ones_like(x)

    def train_step():
        y = ops.dwconv_bn_act(xg, wg, gamma_g, beta_g, rm, rv, activation="hswish", training=True)
        # autograd.grad, not backward(): accumulating into .grad would add a real pass over x
        torch.autograd.grad(y, (xg, wg, gamma_g, beta_g), dy)

    return {
        "bn_act inference": lambda: ops.bn_act(x, gamma, beta, rm, rv, activation="relu6"),
        "dwconv_bn_act inference": lambda: ops.dwconv_bn_act(x, w, gamma, beta, rm, rv, activation="relu6"),
        "squeeze_excite inference": lambda: ops.squeeze_excite(x, fc1, None, fc2, None),
        "dwconv_bn_act train forward": lambda: ops.dwconv_bn_act(xg, wg, gamma_g, beta_g, rm, rv,
                                                                 activation="hswish", training=True),
        "dwconv_bn_act train forward+backward": train_step,
    }


def _time_us(fn, iterations: int, repeats: int, sync) -> float:
    for _ in range(5):
        fn()
    sync()
    samples = []
    for _ in range(repeats):
        began = time.perf_counter()
        for _ in range(iterations):
            fn()
        sync()
        samples.append((time.perf_counter() - began) / iterations * 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--real", action="store_true", help="also time real launches (needs CUDA)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if args.real and not cuda:
        raise SystemExit("--real needs a CUDA device")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    import triton

    meta = dict(device=torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
                torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
                dtype=str(dtype).replace("torch.", ""), backend="triton")
    modes = [("stubbed launches", _launches_stubbed)]
    if args.real:
        modes.append(("real launches", contextlib.nullcontext))
    with mobileops.use_backend("triton"):
        for op, fn in _calls(device, dtype).items():
            for mode, context in modes:
                grad = contextlib.nullcontext() if "train" in op else torch.no_grad()
                with context(), grad:
                    us = _time_us(fn, args.iterations, args.repeats, sync)
                print(json.dumps(dict(meta, op=op, mode=mode, us_per_call=round(us, 1))), flush=True)


if __name__ == "__main__":
    main()
