"""The cuda backend (CUDA extension) on a GPU: custom-op checks, agreement with the Triton
backend and the torch backend on the detectors' real SE and BN shapes, and determinism. The
float64 grid of every op runs in test_ops.py and the real depthwise shapes in
test_dwconv_bn_act_triton.py (both parametrized over the GPU backends). Skipped without CUDA."""

import pytest
import torch
from helpers import relative_norm_error

import mobileops
from mobileops import backend, ops
from mobileops.bench.cases import op_shapes

CUDA = torch.cuda.is_available() and backend.backend_status()["cuda"] is None
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and the built extension")


def _se_inputs(c, h, w, hidden, dtype, layout, batch=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c, h, w, generator=g).to("cuda", dtype).contiguous(memory_format=layout)
    params = [torch.randn(hidden, c, generator=g) / c ** 0.5, torch.randn(hidden, generator=g) * 0.1,
              torch.randn(c, hidden, generator=g) / hidden ** 0.5, torch.randn(c, generator=g) * 0.1]
    return [x] + [p.to("cuda", dtype).requires_grad_(True) for p in params]


def _se_run(backend_name, inputs, dy, gate, post_act):
    x, *params = [t.detach().clone().requires_grad_(True) for t in inputs]
    with mobileops.use_backend(backend_name):
        y = ops.squeeze_excite(x, *params, gate=gate, post_act=post_act)
    y.backward(dy)
    return [y, x.grad] + [p.grad for p in params]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [s for s in op_shapes()["squeeze_excite"]] if CUDA else [None], ids=str)
def test_squeeze_excite_real_shapes_agree_with_triton_and_torch(shape, layout, dtype):
    (c, h, w), opts, _ = shape
    opts = dict(opts)
    inputs = _se_inputs(c, h, w, opts["hidden"], dtype, layout)
    dy = torch.randn_like(inputs[0])
    ref = _se_run("torch", [t.double() for t in inputs], dy.double(), opts["gate"], opts["post_act"])
    base = _se_run("torch", inputs, dy, opts["gate"], opts["post_act"])
    for backend_name in ("cuda", "triton"):
        got = _se_run(backend_name, inputs, dy, opts["gate"], opts["post_act"])
        for name, a, b, r in zip(("y", "dx", "dw1", "db1", "dw2", "db2"), got, base, ref):
            err, base_err = relative_norm_error(a, r), relative_norm_error(b, r)
            assert err <= 2 * base_err + (1e-5 if dtype == torch.float32 else 3e-3), f"{backend_name} {name}: {err}"


@needs_cuda
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bn_act_real_shapes_agree(training):
    for (c, h, w), opts, _ in op_shapes()["bn_act"][::6]:
        g = torch.Generator().manual_seed(c)
        x = torch.randn(4, c, h, w, generator=g).cuda().contiguous(memory_format=torch.channels_last)
        params = [1 + 0.1 * torch.randn(c, generator=g), 0.1 * torch.randn(c, generator=g),
                  0.1 * torch.randn(c, generator=g), 1 + torch.rand(c, generator=g)]
        outs = {}
        for backend_name in ("torch", "cuda"):
            gamma, beta, rm, rv = [p.cuda() for p in params]
            with mobileops.use_backend(backend_name):
                y = ops.bn_act(x, gamma, beta, rm, rv, activation=dict(opts)["activation"], training=training,
                               momentum=0.03, eps=1e-3)
            outs[backend_name] = (y, rm, rv)
        for a, b in zip(outs["cuda"], outs["torch"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


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
    torch.use_deterministic_algorithms(True)
    try:
        results = []
        for _ in range(2):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(8, 96, 40, 40, generator=g).cuda().requires_grad_(True)
            w = (torch.randn(96, 1, 5, 5, generator=g) / 5).cuda().requires_grad_(True)
            gamma = torch.ones(96, device="cuda", requires_grad=True)
            beta = torch.zeros(96, device="cuda", requires_grad=True)
            with mobileops.use_backend("cuda"):
                y = ops.dwconv_bn_act(x, w, gamma, beta, torch.zeros(96, device="cuda"), torch.ones(96, device="cuda"),
                                      activation="hswish", training=True)
            y.square().sum().backward()
            results.append([y, x.grad, w.grad, gamma.grad, beta.grad])
        for a, b in zip(*results):
            assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(False)
