"""Fused ops vs the plain nn-module composition in float64, on every runnable backend."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_within_bound, backend_params, runnable_backends
from torch import nn

import mobileops
from mobileops import ops
from mobileops import reference as ref_blocks

ACT_MODULES = {
    "none": nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6, "hswish": ref_blocks.RefHSwish,
    "silu": nn.SiLU, "hsigmoid": ref_blocks.RefHSigmoid,
}
# (N, C, H, W, K, stride): odd channels and sizes, H or W of 1, stride 2 on odd sizes.
DW_SHAPES = [(1, 3, 7, 7, 3, 1), (2, 17, 13, 13, 5, 2), (2, 33, 1, 1, 3, 1), (1, 8, 7, 13, 7, 2),
             (3, 5, 1, 9, 3, 2)]
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _bn_module(c, seed=3):
    g = _gen(seed)
    bn = nn.BatchNorm2d(c, momentum=0.2, eps=1e-3).double()
    with torch.no_grad():
        bn.weight.copy_(1 + 0.3 * torch.randn(c, generator=g))
        bn.bias.copy_(0.2 * torch.randn(c, generator=g))
        bn.running_mean.copy_(0.2 * torch.randn(c, generator=g))
        bn.running_var.copy_(0.5 + torch.rand(c, generator=g))
    return bn


def _leaf(t, device, dtype=None, layout=torch.contiguous_format):
    t = t.detach().to(device=device, dtype=dtype or t.dtype)
    if t.dim() == 4:
        t = t.contiguous(memory_format=layout)
    return t.requires_grad_(True)


def _dw_reference(shape, activation, training):
    n, c, h, w, k, stride = shape
    x = torch.randn(n, c, h, w, generator=_gen(1), dtype=torch.float64)
    conv = nn.Conv2d(c, c, k, stride, (k - 1) // 2, groups=c, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(c, 1, k, k, generator=_gen(2), dtype=torch.float64) / k)
    bn = _bn_module(c)
    seq = nn.Sequential(conv, bn, ACT_MODULES[activation]()).train(training)
    return x, seq


def _dw_parity_cases():
    """Every (shape, activation) pair; in Triton's slow CPU interpreter every activation on
    the smallest shape and one rotating activation on each other shape."""
    acts = list(ACT_MODULES)
    for device, backend_name in (p.values for p in backend_params("dwconv_bn_act")):
        interpreted = backend_name == "triton" and device == "cpu"
        for i, shape in enumerate(DW_SHAPES):
            chosen = [acts[i % len(acts)]] if interpreted and i > 0 else acts
            for activation in chosen:
                yield pytest.param(device, backend_name, activation, shape,
                                   id=f"{device}-{backend_name}-{activation}-{shape}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("device,backend_name,activation,shape", list(_dw_parity_cases()))
def test_dwconv_bn_act_float64_parity(device, backend_name, layout, training, activation, shape):
    x, seq = _dw_reference(shape, activation, training)
    conv, bn = seq[0], seq[1]
    xr = x.clone().requires_grad_(True)
    y_ref = seq(xr)
    grad = torch.randn(y_ref.shape, generator=_gen(4), dtype=torch.float64)
    y_ref.backward(grad)

    xo = _leaf(x, device, layout=LAYOUTS[layout])
    bn_params = _bn_module(x.shape[1])
    w, gamma, beta = (_leaf(t, device) for t in (conv.weight, bn_params.weight, bn_params.bias))
    fresh = _bn_module(x.shape[1])
    rm, rv = fresh.running_mean.to(device), fresh.running_var.to(device)
    with mobileops.use_backend(backend_name):
        y = ops.dwconv_bn_act(xo, w, gamma, beta, rm, rv, stride=shape[5], activation=activation,
                              training=training, momentum=0.2, eps=1e-3)
    assert y.is_contiguous(memory_format=LAYOUTS[layout])
    torch.testing.assert_close(y.cpu(), y_ref.detach(), rtol=1e-9, atol=1e-10)
    y.backward(grad.to(device))
    for name, ours, ref in (("x", xo, xr), ("weight", w, conv.weight), ("bn_weight", gamma, bn.weight),
                            ("bn_bias", beta, bn.bias)):
        torch.testing.assert_close(ours.grad.cpu(), ref.grad, rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"d{n}: {m}")
    torch.testing.assert_close(rm.cpu(), bn.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rv.cpu(), bn.running_var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device,backend_name", backend_params("dwconv_bn_act"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_dwconv_bn_act_low_precision_bound(device, backend_name, dtype, training):
    x, seq = _dw_reference((2, 24, 15, 15, 5, 2), "hswish", training)
    y_ref = seq(x).detach()
    conv, bn = seq[0], _bn_module(24)
    args = lambda: (x.to(device, dtype), conv.weight.detach().to(device, dtype),
                    *(t.detach().float().to(device) for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)))
    kwargs = dict(stride=2, activation="hswish", training=training, momentum=0.2, eps=1e-3)
    with mobileops.use_backend("torch"):
        y_torch = ops.dwconv_bn_act(*args(), **kwargs)
    with mobileops.use_backend(backend_name):
        y = ops.dwconv_bn_act(*args(), **kwargs)
    assert y.dtype == dtype
    assert_within_bound(y.cpu(), y_ref, y_torch.cpu(), f"dwconv_bn_act {dtype}")


@pytest.mark.parametrize("device,backend_name", backend_params("dwconv_bn_act"))
def test_dwconv_bn_act_under_autocast(device, backend_name):
    amp_dtype = torch.bfloat16 if device == "cpu" else torch.float16
    x, seq = _dw_reference((2, 16, 9, 9, 3, 1), "relu6", True)
    y_ref = seq(x).detach()
    bn = _bn_module(16)
    with torch.autocast(device_type=device, dtype=amp_dtype), mobileops.use_backend(backend_name):
        y = ops.dwconv_bn_act(x.float().to(device), seq[0].weight.detach().float().to(device),
                              bn.weight.detach().float().to(device), bn.bias.detach().float().to(device),
                              bn.running_mean.float().to(device), bn.running_var.float().to(device),
                              activation="relu6", training=True, momentum=0.2, eps=1e-3)
    torch.testing.assert_close(y.double().cpu(), y_ref, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("device,backend_name", backend_params("dwconv_bn_act"))
def test_dwconv_bn_act_non_contiguous_slice(device, backend_name):
    big = torch.randn(2, 40, 12, 15, generator=_gen(5), dtype=torch.float64)
    x = big[:, 3:20, 1:10, ::2]  # 17 channels, 9 x 8, strided in every dimension
    assert not x.is_contiguous()
    w = torch.randn(17, 1, 3, 3, generator=_gen(6), dtype=torch.float64)
    bn = _bn_module(17)
    expected = F.relu(F.batch_norm(F.conv2d(x.contiguous(), w, None, 1, 1, 1, 17), bn.running_mean,
                                   bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps))
    with mobileops.use_backend(backend_name):
        y = ops.dwconv_bn_act(x.to(device), w.to(device), bn.weight.detach().to(device),
                              bn.bias.detach().to(device), bn.running_mean.to(device),
                              bn.running_var.to(device), activation="relu", eps=bn.eps)
    torch.testing.assert_close(y.cpu(), expected.detach(), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("device,backend_name", backend_params("dwconv_bn_act"))
def test_dwconv_bn_act_without_running_stats_uses_batch_stats(device, backend_name):
    x = torch.randn(2, 6, 5, 5, generator=_gen(7), dtype=torch.float64)
    w = torch.randn(6, 1, 3, 3, generator=_gen(8), dtype=torch.float64)
    bn = nn.BatchNorm2d(6, track_running_stats=False, affine=False).double().eval()
    expected = bn(F.conv2d(x, w, None, 1, 1, 1, 6))
    with mobileops.use_backend(backend_name):
        y = ops.dwconv_bn_act(x.to(device), w.to(device), None, None, None, None, training=False)
    torch.testing.assert_close(y.cpu(), expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("device,backend_name", backend_params("dwconv_act"))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_dwconv_act_parity(device, backend_name, layout, with_bias):
    x = torch.randn(2, 17, 13, 7, generator=_gen(9), dtype=torch.float64)
    conv = nn.Conv2d(17, 17, 5, 2, 2, groups=17, bias=with_bias).double()
    xr = x.clone().requires_grad_(True)
    y_ref = ref_blocks.RefHSwish()(conv(xr))
    grad = torch.randn(y_ref.shape, generator=_gen(10), dtype=torch.float64)
    y_ref.backward(grad)
    xo, w = _leaf(x, device, layout=LAYOUTS[layout]), _leaf(conv.weight, device)
    b = _leaf(conv.bias, device) if with_bias else None
    with mobileops.use_backend(backend_name):
        y = ops.dwconv_act(xo, w, b, stride=2, activation="hswish")
    assert y.is_contiguous(memory_format=LAYOUTS[layout])
    y.backward(grad.to(device))
    torch.testing.assert_close(y.cpu(), y_ref.detach(), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(xo.grad.cpu(), xr.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(w.grad.cpu(), conv.weight.grad, rtol=1e-9, atol=1e-10)
    if with_bias:
        torch.testing.assert_close(b.grad.cpu(), conv.bias.grad, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("device,backend_name", backend_params("bn_act"))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", ["silu", "hswish", "relu", "none"])
@pytest.mark.parametrize("shape", [(1, 3, 7, 7), (2, 33, 13, 1), (4, 16, 1, 1)], ids=str)
def test_bn_act_float64_parity(device, backend_name, layout, training, activation, shape):
    x = torch.randn(*shape, generator=_gen(11), dtype=torch.float64)
    bn = _bn_module(shape[1]).train(training)
    xr = x.clone().requires_grad_(True)
    y_ref = ACT_MODULES[activation]()(bn(xr))
    grad = torch.randn(y_ref.shape, generator=_gen(12), dtype=torch.float64)
    y_ref.backward(grad)
    fresh = _bn_module(shape[1])
    xo = _leaf(x, device, layout=LAYOUTS[layout])
    gamma, beta = _leaf(fresh.weight, device), _leaf(fresh.bias, device)
    rm, rv = fresh.running_mean.to(device), fresh.running_var.to(device)
    with mobileops.use_backend(backend_name):
        y = ops.bn_act(xo, gamma, beta, rm, rv, activation=activation, training=training, momentum=0.2, eps=1e-3)
    assert y.is_contiguous(memory_format=LAYOUTS[layout])
    y.backward(grad.to(device))
    torch.testing.assert_close(y.cpu(), y_ref.detach(), rtol=1e-9, atol=1e-10)
    for name, ours, ref in (("x", xo, xr), ("bn_weight", gamma, bn.weight), ("bn_bias", beta, bn.bias)):
        torch.testing.assert_close(ours.grad.cpu(), ref.grad, rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"d{n}: {m}")
    torch.testing.assert_close(rm.cpu(), bn.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rv.cpu(), bn.running_var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device,backend_name", backend_params("squeeze_excite"))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("gate,post_act", [("hsigmoid", "none"), ("hsigmoid", "hswish"), ("sigmoid", "relu")])
@pytest.mark.parametrize("shape", [(1, 72, 7, 7), (2, 17, 13, 1), (3, 8, 1, 1)], ids=str)
def test_squeeze_excite_float64_parity(device, backend_name, layout, gate, post_act, shape):
    n, c, h, w = shape
    x = torch.randn(*shape, generator=_gen(13), dtype=torch.float64)
    se = ref_blocks.RefSELayer(c).double()
    if gate == "sigmoid":
        se.fc[3] = nn.Sigmoid()
    xr = x.clone().requires_grad_(True)
    y_ref = ACT_MODULES.get(post_act, nn.ReLU)()(se(xr))
    grad = torch.randn(y_ref.shape, generator=_gen(14), dtype=torch.float64)
    y_ref.backward(grad)
    xo = _leaf(x, device, layout=LAYOUTS[layout])
    params = [_leaf(p, device) for p in (se.fc[0].weight, se.fc[0].bias, se.fc[2].weight, se.fc[2].bias)]
    with mobileops.use_backend(backend_name):
        y = ops.squeeze_excite(xo, *params, gate=gate, post_act=post_act)
    assert y.is_contiguous(memory_format=LAYOUTS[layout])
    y.backward(grad.to(device))
    torch.testing.assert_close(y.cpu(), y_ref.detach(), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(xo.grad.cpu(), xr.grad, rtol=1e-9, atol=1e-10)
    refs = (se.fc[0].weight, se.fc[0].bias, se.fc[2].weight, se.fc[2].bias)
    for ours, ref in zip(params, refs):
        torch.testing.assert_close(ours.grad.cpu(), ref.grad, rtol=1e-9, atol=1e-10)


def test_squeeze_excite_without_biases():
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    w1, w2 = torch.randn(2, 8, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    gate = torch.sigmoid(F.relu(x.mean((2, 3)) @ w1.t()) @ w2.t())
    torch.testing.assert_close(ops.squeeze_excite(x, w1, None, w2, None, gate="sigmoid"), x * gate[:, :, None, None])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend_name", [b for b in runnable_backends("squeeze_excite", "cuda") if b != "torch"]
                         if torch.cuda.is_available() else [])
def test_squeeze_excite_gates_right_on_the_first_call_of_each_variant(backend_name):
    """Regression: the Triton SE MLP read back pooled means that other threads of its program
    had just stored, with nothing ordering the two; on an H100 the first call of a freshly
    compiled variant (C=1, hidden 5, float32) once gave gates off by 1e-3. Each channel count
    and hidden width here is a new variant (Triton specialises on 1 and multiples of 16), and
    each is checked on its first call and on two more, on fresh memory."""
    g = torch.Generator().manual_seed(5)
    for c, hidden in [(1, 5), (1, 1), (3, 2), (16, 3), (24, 7), (32, 8), (33, 16), (48, 12), (64, 16)]:
        for call in range(3):
            x = torch.randn(3, c, 28, 3, generator=g).cuda()
            w1, w2 = torch.randn(hidden, c, generator=g).cuda(), torch.randn(c, hidden, generator=g).cuda()
            with mobileops.use_backend("torch"):
                ref64 = ops.squeeze_excite(x.double(), w1.double(), None, w2.double(), None, post_act="hswish")
                out_torch = ops.squeeze_excite(x, w1, None, w2, None, post_act="hswish")
            with mobileops.use_backend(backend_name):
                out = ops.squeeze_excite(x, w1, None, w2, None, post_act="hswish")
            assert_within_bound(out, ref64, out_torch, f"{backend_name}: C={c} hidden={hidden} call {call}")


def test_activation_by_name():
    x = torch.linspace(-8, 8, 33, dtype=torch.float64)
    for name, module in ACT_MODULES.items():
        torch.testing.assert_close(ops.activation(x, name), module()(x.clone()))
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.activation(x, "gelu")
