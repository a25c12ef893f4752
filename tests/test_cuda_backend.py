"""The cuda backend (CUDA extension) on a GPU: custom-op checks, the cuda and triton backends
against the torch backend on the detectors' real SE and BN shapes (tests/harness.py's check),
and determinism. The float64 grid of every op runs in test_ops.py and the real depthwise shapes
in test_dwconv_bn_act_triton.py (both parametrized over the GPU backends). Skipped without CUDA."""

import pytest
import torch
from harness import check, inputs, run

from mobileops import backend
from mobileops.bench.cases import op_shapes

CUDA = torch.cuda.is_available() and backend.backend_status()["cuda"] is None
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and the built extension")
#: Every result of squeeze_excite: on the real shapes all are compared by relative norm.
SE_RESULTS = ("y", "dx", "dfc1_weight", "dfc1_bias", "dfc2_weight", "dfc2_bias")


@needs_cuda
@pytest.mark.parametrize("backend_name", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("shape", op_shapes()["squeeze_excite"] if CUDA else [None], ids=str)
def test_squeeze_excite_real_shapes_agree_with_torch(shape, layout, dtype, backend_name):
    (c, h, w), opts, _ = shape
    opts = dict(opts)
    args = inputs("squeeze_excite", (4, c, h, w), hidden=opts["hidden"], dtype=dtype, layout=layout, device="cuda")
    check("squeeze_excite", backend_name, args, dtype=dtype, by_norm=SE_RESULTS, dy_layout=layout,
          gate=opts["gate"], post_act=opts["post_act"])


@needs_cuda
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bn_act_real_shapes_agree(training):
    """Output, gradients (the BN weight gradients, reductions over the batch, by norm) and running
    statistics in float32 on every sixth real BN shape."""
    for (c, h, w), opts, _ in op_shapes()["bn_act"][::6]:
        args = inputs("bn_act", (4, c, h, w), dtype=torch.float32, layout="nhwc", seed=c, device="cuda")
        check("bn_act", "cuda", args, dtype=torch.float32, by_norm=("dbn_weight", "dbn_bias"),
              activation=dict(opts)["activation"], training=training, momentum=0.03, eps=1e-3)


@needs_cuda
def test_cuda_custom_ops_pass_opcheck():
    x = torch.randn(2, 8, 9, 9, device="cuda", dtype=torch.float64)
    w = torch.randn(8, 1, 3, 3, device="cuda", dtype=torch.float64)
    gamma, beta, mean, var = [torch.rand(8, device="cuda", dtype=torch.float64) + 0.5 for _ in range(4)]
    torch.library.opcheck(torch.ops.mobileops.dwconv_bn_act_cuda.default,
                          (x, w, gamma, beta, mean, var, 2, 1, "hswish", "running", 1e-3))
    torch.library.opcheck(torch.ops.mobileops.dwconv_bn_act_cuda.default,
                          (x, None, gamma, beta, mean, var, 1, 0, "relu", "batch", 1e-3))
    torch.library.opcheck(torch.ops.mobileops.dwconv_bn_stats_cuda.default,
                          (x, w, mean.clone(), var.clone(), 1, 1, 0.1, 1e-3))
    w1 = torch.randn(2, 8, device="cuda", dtype=torch.float64)
    w2 = torch.randn(8, 2, device="cuda", dtype=torch.float64)
    torch.library.opcheck(torch.ops.mobileops.squeeze_excite_cuda.default,
                          (x, w1, None, w2, None, "hsigmoid", "hswish"))


@needs_cuda
def test_cuda_backend_is_deterministic():
    args = inputs("dwconv_bn_act", (8, 96, 40, 40), k=5, dtype=torch.float32, device="cuda")
    torch.use_deterministic_algorithms(True)
    try:
        first, second = (run("dwconv_bn_act", "cuda", args, activation="hswish", training=True) for _ in range(2))
    finally:
        torch.use_deterministic_algorithms(False)
    for name, result in first.items():
        assert torch.equal(result, second[name]), name
