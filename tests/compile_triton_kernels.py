"""Compile every Triton kernel launch of the fused ops for real GPUs, without a GPU.

Triton's CPU interpreter accepts code the compiler rejects (non-constexpr globals, runtime
values passed as constexpr...). This script runs the ops' launch helpers on CPU tensors with
the launches captured instead of run, then compiles each captured kernel with the exact
signature and constants of that launch to a cubin for each architecture given. Run it in a
process where TRITON_INTERPRET is unset (kernels defined for the compiler):

    python tests/compile_triton_kernels.py [--quick] 80 90

``--quick`` compiles one dtype/kernel-size combination (fp16, 3x3, stride 2, channels_last):
every kernel once, about a minute. The full run covers 4 dtypes x 3 kernel sizes (~100
variants, several minutes per architecture).
"""

import os
import sys

import torch

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("unset TRITON_INTERPRET: the kernels must be defined for the compiler")
os.environ["MOBILEOPS_AUTOTUNE"] = "0"  # the fixed configuration: one compile per launch

from triton import compile as triton_compile
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mobileops.kernels import _common as common
from mobileops.kernels import dwconv_bn_act as kernels
from mobileops.kernels import squeeze_excite as se_kernels

TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64",
         torch.int32: "*i32"}  # int32: the ticket counters


FULL = [(dtype, k, stride, layout) for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
        for k, stride, layout in ((3, 1, torch.channels_last), (5, 2, torch.contiguous_format),
                                  (7, 2, torch.channels_last))]
QUICK = [(torch.float16, 3, 2, torch.channels_last)]


def capture_launches(cases):
    launches = []
    common.check_device = lambda x: None
    common.sm_count = lambda device: 132
    common.launch = lambda kernel, tuned, grid_of, args, meta: launches.append((kernel, args, dict(meta)))
    for dtype, k, stride, layout in cases:
        c = 24
        x = torch.zeros(2, c, 20, 20, dtype=dtype).contiguous(memory_format=layout)
        w = torch.zeros(c, 1, k, k, dtype=dtype)
        stat = torch.ones(c, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        pad = (k - 1) // 2
        ho = (20 + 2 * pad - k) // stride + 1
        y = torch.zeros(2, c, ho, ho, dtype=dtype).contiguous(memory_format=layout)
        conv = dict(stride=stride, padding=pad, eps=1e-5)
        kernels.forward(x, w, stat, stat, stat, stat, out=y, activation="hswish", norm="running", **conv)
        kernels.forward(x, w, None, stat, None, None, out=y, activation="silu", norm="none", **conv)
        kernels.batch_stats(x, w, stat, stat, momentum=0.1, **conv)
        for norm, act in (("batch", "relu6"), ("running", "hsigmoid"), ("none", "relu")):
            kernels.backward(y, x, w, stat, stat, stat, stat, activation=act, norm=norm, weight_grad=True,
                             memory_format=layout, **conv)
        # bn_act: the same kernels without the convolution
        kernels.batch_stats(x, None, stat, stat, momentum=0.1, stride=1, padding=0, eps=1e-5)
        kernels.backward(x, x, None, stat, stat, stat, stat, activation="silu", norm="batch", weight_grad=False,
                         memory_format=layout, stride=1, padding=0, eps=1e-5)
        # squeeze_excite (one variant per dtype and layout)
        w1, w2 = torch.zeros(6, c, dtype=dtype), torch.zeros(c, 6, dtype=dtype)
        b1, b2 = torch.zeros(6, dtype=dtype), torch.zeros(c, dtype=dtype)
        _, pooled, gates = se_kernels.forward(x, w1, b1, w2, b2, out=torch.empty_like(x), gate="hsigmoid",
                                              post_act="hswish")
        se_kernels.backward(x, x, w1, b1, w2, b2, pooled, gates, gate="sigmoid", post_act="relu",
                            memory_format=layout)
    return launches


def signature(kernel, args, meta):
    sig, constants = {}, {}
    for param in kernel.params:
        name = param.name
        value = args[name] if name in args else meta[name]
        if param.is_constexpr:
            sig[name], constants[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            sig[name] = TYPES[value.dtype]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            sig[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: cannot type argument {name}={value!r}")
    return sig, constants


def main(archs, cases):
    seen = set()
    for kernel, args, meta in capture_launches(cases):
        sig, constants = signature(kernel, args, meta)
        warps = meta.get("num_warps", 4)
        key = (kernel.__name__, tuple(sorted(sig.items())),
               tuple(sorted((k, str(v)) for k, v in constants.items())), warps)
        if key in seen:
            continue
        seen.add(key)
        for arch in archs:
            triton_compile(ASTSource(fn=kernel, signature=sig, constexprs=constants),
                           target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps))
    print(f"compiled {len(seen)} kernel variants for sm_{', sm_'.join(map(str, archs))}")


if __name__ == "__main__":
    quick = "--quick" in sys.argv[1:]
    main([int(a) for a in sys.argv[1:] if a != "--quick"] or [80, 90], QUICK if quick else FULL)
