"""Benchmark ``dwconv_bn_act`` against eager PyTorch, eager with BN folded, and torch.compile.

Shapes are the distinct depthwise layers of the two detectors at 640x640 (taken from a meta
forward, :func:`mobileops.yolo.fused_op_calls`). Every implementation runs in the same process
on the same inputs; each row records device, versions, dtype, layout, shape, median time,
ratios to each baseline and achieved bandwidth as a fraction of a device-to-device copy
measured in the same run. Minimum bytes: inference reads x and writes y (2 passes); the
training forward's floor is 3 passes (x twice, y once); the backward's is 5 (x and dy twice,
dx once).

    python benchmarks/bench_dwconv_bn_act.py --out benchmarks/results            # GPU: full run
    python benchmarks/bench_dwconv_bn_act.py --quick --out /tmp/bench             # a subset

Without CUDA it times the CPU subset (torch backend vs eager vs folded, inference, batch 1)
and says that the Triton and CUDA kernels need a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import mobileops
from mobileops import backend, ops, yolo
from mobileops.nn.helpers import fold_bn_into_conv

ACTIVATIONS = {"none": nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6, "hswish": nn.Hardswish,
               "silu": nn.SiLU, "hsigmoid": nn.Hardsigmoid}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
PASSES = {"inference": 2, "train_forward": 3, "backward": 5}
L2_BYTES = 50 * 2 ** 20


def detector_layers():
    """Distinct (C, H, W, K, stride, activation) of the detectors' dwconv_bn_act calls at 640."""
    seen = {}
    for cfg in ("yolov5n-c3uib", "yolov5-mobilenetv3"):
        for call in yolo.fused_op_calls(yolo.build(cfg), (1, 3, 640, 640)):
            if call["op"] == "dwconv_bn_act":
                (_, c, h, w), _ = call["inputs"][0]
                key = (c, h, w, call["inputs"][1][0][-1], call["options"]["stride"], call["options"]["activation"])
                seen.setdefault(key, cfg)
    return [(key, cfg) for key, cfg in seen.items()]


def make_module(c, k, stride, activation, device, dtype, seed=0):
    """The eager baseline: depthwise Conv2d -> BatchNorm2d -> activation, BN with real stats."""
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Conv2d(c, c, k, stride, (k - 1) // 2, groups=c, bias=False),
                           nn.BatchNorm2d(c, eps=1e-3, momentum=0.03), ACTIVATIONS[activation]())
    with torch.no_grad():
        module[1].weight.uniform_(0.5, 1.5)
        module[1].bias.uniform_(-0.2, 0.2)
        module[1].running_mean.uniform_(-0.2, 0.2)
        module[1].running_var.uniform_(0.5, 1.5)
    module = module.to(device)
    module[0].to(dtype)  # conv weights in the activation dtype, BN parameters stay float32
    return module


def folded(module):
    conv = fold_bn_into_conv(module[0], module[1])
    return nn.Sequential(conv, module[2]).eval()


class Fused(nn.Module):
    """The same parameters through mobileops.ops.dwconv_bn_act on a chosen backend."""

    def __init__(self, module, backend_name, activation):
        super().__init__()
        self.conv, self.bn, self.backend_name, self.activation = module[0], module[1], backend_name, activation

    def forward(self, x):
        with mobileops.use_backend(self.backend_name):
            return ops.dwconv_bn_act(x, self.conv.weight, self.bn.weight, self.bn.bias, self.bn.running_mean,
                                     self.bn.running_var, stride=self.conv.stride[0], activation=self.activation,
                                     training=self.training, momentum=self.bn.momentum, eps=self.bn.eps)


def gpu_time(fn, graph: bool) -> float:
    """Median milliseconds: CUDA graphs for launch-bound cases, CUDA events otherwise."""
    import triton.testing

    fn()  # first call autotunes / compiles outside the measurement
    torch.cuda.synchronize()
    if graph:
        return float(triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median"))
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def cpu_time(fn, repeat=15) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device) -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write), the roofline reference."""
    src = torch.empty(2 ** 28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = gpu_time(lambda: dst.copy_(src), graph=False) if device.type == "cuda" else cpu_time(lambda: dst.copy_(src), 5)
    return 2 * src.numel() * 4 / (ms * 1e-3)


def rotating_inputs(x, bytes_needed=4 * L2_BYTES, limit=16):
    """Enough copies of x that cycling through them defeats the L2 cache."""
    count = min(limit, max(1, math.ceil(bytes_needed / (x.numel() * x.element_size()))))
    return [x.clone() for _ in range(count)]


def case_functions(mode, impls, xs, dy):
    """name -> zero-argument callable running one measurement of ``mode`` for each impl."""
    fns = {}
    for name, model in impls.items():
        if mode == "inference":
            state = {"i": 0}

            def run(model=model, state=state):
                state["i"] = (state["i"] + 1) % len(xs)
                with torch.no_grad():
                    return model(xs[state["i"]])
        elif mode == "train_forward":
            state = {"i": 0}

            def run(model=model, state=state):
                state["i"] = (state["i"] + 1) % len(xs)
                return model(xs[state["i"]])
        else:
            x = xs[0].detach().requires_grad_(True)
            y = model(x)
            inputs = [x] + [p for p in model.parameters() if p.requires_grad]

            def run(y=y, inputs=inputs):
                return torch.autograd.grad(y, inputs, dy, retain_graph=True)
        fns[name] = run
    return fns


def bench_case(layer, cfg, batch, dtype_name, layout_name, mode, device, copy_bps, compile_mode, timer):
    (c, h, w, k, stride, activation) = layer
    dtype, layout = DTYPES[dtype_name], LAYOUTS[layout_name]
    module = make_module(c, k, stride, activation, device, dtype).to(memory_format=layout)
    module.train(mode != "inference")
    if mode == "backward":
        module.train(True)
    x = torch.randn(batch, c, h, w, device=device, dtype=dtype).contiguous(memory_format=layout)
    ho, wo = (h + 2 * ((k - 1) // 2) - k) // stride + 1, (w + 2 * ((k - 1) // 2) - k) // stride + 1
    dy = torch.randn(batch, c, ho, wo, device=device, dtype=dtype).contiguous(memory_format=layout)
    impls = {"eager": module}
    if mode == "inference":
        impls["eager_folded"] = folded(module).to(memory_format=layout)
    if compile_mode:
        impls["compile"] = torch.compile(module, mode=compile_mode)
    for name in ("triton", "cuda") if device.type == "cuda" else ("torch",):
        if "dwconv_bn_act" in backend.implemented_ops(name) and backend._backend_problem(name, device) is None:
            impls[f"mobileops_{name}"] = Fused(module, name, activation).train(module.training)
    xs = rotating_inputs(x) if mode != "backward" else [x]
    times, errors = {}, {}
    for name, fn in case_functions(mode, impls, xs, dy).items():
        try:
            times[name] = timer(fn)
        except Exception as exc:  # noqa: BLE001 - recorded in the row, the run goes on
            errors[name] = f"{type(exc).__name__}: {exc}"[:300]
    elem = x.element_size()
    x_bytes, y_bytes = x.numel() * elem, dy.numel() * elem
    min_bytes = {"inference": x_bytes + y_bytes, "train_forward": 2 * x_bytes + y_bytes,
                 "backward": 3 * x_bytes + 2 * y_bytes}[mode]
    row = dict(op="dwconv_bn_act", mode=mode, detector=cfg, batch=batch, channels=c, height=h, width=w,
               kernel=k, stride=stride, activation=activation, dtype=dtype_name, layout=layout_name,
               min_bytes=min_bytes, times_ms=times, errors=errors)
    for name, ms in times.items():
        if name.startswith("mobileops"):
            row[f"{name}_fraction_of_copy"] = (min_bytes / (ms * 1e-3)) / copy_bps
            for base in ("eager", "eager_folded", "compile"):
                if base in times:
                    row[f"{name}_speedup_vs_{base}"] = times[base] / ms
    return row


def environment(device) -> dict:
    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               python=platform.python_version(), torch=torch.__version__, mobileops=mobileops.__version__,
               cuda=torch.version.cuda, device=torch.cuda.get_device_name(device) if device.type == "cuda"
               else platform.processor() or platform.machine())
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the JSON")
    parser.add_argument("--quick", action="store_true", help="a few layers, batch 32, fp16, both layouts")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--compile-mode", default="max-autotune-no-cudagraphs", help="torch.compile mode")
    parser.add_argument("--modes", default=",".join(PASSES), help="inference,train_forward,backward")
    parser.add_argument("--layers", default=None, help="indices into the layer list, e.g. 0,3,7")
    parser.add_argument("--batches", default=None, help="e.g. 1,32")
    parser.add_argument("--dtypes", default=None, help="e.g. fp16,bf16")
    parser.add_argument("--layouts", default=None, help="e.g. nchw,nhwc")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    layers = detector_layers()
    modes = [m for m in args.modes.split(",") if m]
    if cuda:
        torch.backends.cudnn.benchmark = True
        batches, dtypes, layouts = [1, 32], list(DTYPES), list(LAYOUTS)
        if args.quick:
            layers, batches, dtypes = layers[::4], [32], ["fp16"]
    else:
        print("no CUDA device: timing the CPU subset (torch backend vs eager vs folded); the Triton and "
              "CUDA kernels need a CUDA device", file=sys.stderr)
        layers, batches, dtypes, layouts, modes = layers[:2], [1], ["fp32"], ["nchw"], ["inference"]
    if args.layers:
        layers = [detector_layers()[int(i)] for i in args.layers.split(",")]
    batches = [int(b) for b in args.batches.split(",")] if args.batches else batches
    dtypes = args.dtypes.split(",") if args.dtypes else dtypes
    layouts = args.layouts.split(",") if args.layouts else layouts
    use_compile = cuda and not args.no_compile
    copy_bps = copy_bandwidth(device)
    rows = []
    cases = [(layer, cfg, b, d, lay, m) for layer, cfg in layers for b in batches for d in dtypes
             for lay in layouts for m in modes]
    for i, (layer, cfg, b, d, lay, m) in enumerate(cases, 1):
        timer = (lambda fn, g=(b == 1 and m == "inference"): gpu_time(fn, g)) if cuda else cpu_time
        row = bench_case(layer, cfg, b, d, lay, m, device, copy_bps, args.compile_mode if use_compile else None,
                         timer)
        rows.append(row)
        ratios = " ".join(f"{k.replace('_speedup_vs_', ' vs ')}={v:.2f}x"
                          for k, v in row.items() if "_speedup_vs_" in k)
        print(f"[{i}/{len(cases)}] {m} b{b} {layer} {d} {lay}: "
              + " ".join(f"{k}={v:.3f}ms" for k, v in row["times_ms"].items()) + f"  {ratios}", flush=True)
    env = environment(device)
    result = dict(environment=env, copy_bytes_per_s=copy_bps, compile_mode=args.compile_mode if use_compile else None,
                  rows=rows)
    args.out.mkdir(parents=True, exist_ok=True)
    slug = env["device"].replace(" ", "-").replace("/", "-")
    path = args.out / f"dwconv_bn_act-{slug}-{env['date'][:10]}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
