"""Fused ops vs the plain PyTorch composition (tests/harness.py), forward and backward, on every
backend that runs here: torch, triton (in its interpreter without a GPU) and cuda (the emulated
kernels without a GPU)."""

import pytest
import torch
import torch.nn.functional as F
from harness import (
    ACT_MODULES,
    ACTIVATIONS,
    EAGER,
    F64,
    LAYOUTS,
    check,
    inputs,
    over_targets,
    run,
    target_fixture,  # noqa: F401 (the fixture over_targets parametrizes)
    targets,
)
from helpers import assert_within_bound, runnable_backends

import mobileops
from mobileops import ops

# (N, C, H, W, K, stride): odd channels and sizes, H or W of 1, stride 2 on odd sizes.
DW_SHAPES = [(1, 3, 7, 7, 3, 1), (2, 17, 13, 13, 5, 2), (2, 33, 1, 1, 3, 1), (1, 8, 7, 13, 7, 2),
             (3, 5, 1, 9, 3, 2)]
# The same kinds of shape, tiny, for the emulated CUDA kernels (every CUDA thread an OS thread).
EMULATED_DW_SHAPES = [(2, 5, 7, 6, 3, 2), (1, 3, 9, 9, 5, 1), (2, 4, 5, 7, 7, 2), (3, 2, 1, 5, 3, 1)]
BN_SHAPES = [(1, 3, 7, 7), (2, 33, 13, 1), (4, 16, 1, 1)]
SE_SHAPES = [(1, 72, 7, 7), (2, 17, 13, 1), (3, 8, 1, 1)]
EMULATED_SE_SHAPES = [(3, 12, 5, 4)]
ACTS = list(ACTIVATIONS)


def _emulated(target):
    return target.backend == "cuda" and target.device == "cpu"


def _dw_parity_cases():
    """Every (shape, activation) pair. In Triton's slow CPU interpreter every activation on the
    smallest shape and one rotating activation on each other shape; the emulated CUDA kernels
    take tiny shapes, one activation each, rotating with the mode (and every activation below)."""
    for param in targets("dwconv_bn_act"):
        t = param.values[0]
        for training in (True, False):
            for i, shape in enumerate(EMULATED_DW_SHAPES if _emulated(t) else DW_SHAPES):
                if _emulated(t):
                    chosen = [ACTS[(2 * i + training) % len(ACTS)]]
                else:
                    chosen = [ACTS[i % len(ACTS)]] if t.slow and i > 0 else ACTS
                for activation in chosen:
                    yield pytest.param(t, training, activation, shape,
                                       id=f"{param.id}-{'train' if training else 'eval'}-{activation}-{shape}")


def _dw(shape, layout, **kwargs):
    n, c, h, w, k, _ = shape
    return inputs("dwconv_bn_act", (n, c, h, w), k=k, layout=layout, **kwargs)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("target,training,activation,shape", list(_dw_parity_cases()), indirect=["target"])
def test_dwconv_bn_act_float64_parity(target, layout, training, activation, shape):
    """Output, every gradient and the running statistics against nn.Conv2d + BatchNorm2d + act;
    a channels_last output gradient whatever the layout (strides must not matter)."""
    ours = check("dwconv_bn_act", target, _dw(shape, layout, device=target.device), dy_layout="nhwc",
                 stride=shape[5], activation=activation, training=training, momentum=0.2, eps=1e-3)
    assert ours["y"].is_contiguous(memory_format=LAYOUTS[layout])


@over_targets("dwconv_bn_act")
@pytest.mark.parametrize("activation", ACTS)
def test_dwconv_bn_act_every_activation_on_both_sides_of_its_kinks(target, activation):
    args = inputs("dwconv_bn_act", (2, 3, 5, 5), scale=4, seed=11, device=target.device)
    check("dwconv_bn_act", target, args, activation=activation, training=True)


def _low_precision_cases():
    for param in targets("dwconv_bn_act"):
        if param.values[0].backend != "torch":  # the torch backend is the bound's own base
            yield param


@pytest.mark.parametrize("target", list(_low_precision_cases()), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_dwconv_bn_act_low_precision_bound(target, dtype, training):
    """Output, gradients and running statistics in fp32/fp16/bf16 storage within the error bound."""
    shape, act = ((2, 4, 6, 6, 3, 1), "relu6") if _emulated(target) else ((2, 24, 15, 15, 5, 2), "hswish")
    ours = check("dwconv_bn_act", target, _dw(shape, "nhwc", device=target.device), dtype=dtype, stride=shape[5],
                 activation=act, training=training, momentum=0.2, eps=1e-3)
    assert ours["y"].is_contiguous(memory_format=torch.channels_last)


@over_targets("dwconv_bn_act", emulated=False)
def test_dwconv_bn_act_under_autocast(target):
    device, backend_name = target.device, target.backend
    amp_dtype = torch.bfloat16 if device == "cpu" else torch.float16
    args = _dw((2, 16, 9, 9, 3, 1), "nchw", seed=1)
    kwargs = dict(activation="relu6", training=True, momentum=0.2, eps=1e-3)
    y_ref = run("dwconv_bn_act", EAGER, args, **kwargs)["y"]
    with torch.autocast(device_type=device, dtype=amp_dtype), mobileops.use_backend(backend_name):
        y = ops.dwconv_bn_act(*(t.float().to(device) for t in args.values()), **kwargs)
    torch.testing.assert_close(y.double().cpu(), y_ref, rtol=3e-2, atol=3e-2)


@over_targets("dwconv_bn_act")
def test_non_contiguous_slices_and_no_running_stats(target):
    """A view strided in every dimension; without running statistics the ops use batch statistics
    whatever ``training`` says."""
    big = torch.randn(2, 40, 12, 15, generator=torch.Generator().manual_seed(5), dtype=F64).to(target.device)
    x = big[:, 3:20, 1:10, ::2]  # 17 channels, 9 x 8
    assert not x.is_contiguous()
    args = inputs("dwconv_bn_act", (1, 17, 1, 1), stats=False, seed=6, device=target.device) | dict(x=x)
    check("dwconv_bn_act", target, args, stride=2, activation="relu6", eps=1e-3)
    args = inputs("dwconv_act", (1, 17, 1, 1), seed=8, device=target.device) | dict(x=x)
    check("dwconv_act", target, args, activation="silu")


@over_targets("dwconv_bn_act")
def test_dwconv_bn_act_without_affine_or_running_stats_uses_batch_stats(target):
    args = inputs("dwconv_bn_act", (2, 6, 5, 5), seed=7, stats=False, device=target.device)
    args |= dict(bn_weight=None, bn_bias=None)
    check("dwconv_bn_act", target, args, training=False)


@over_targets("dwconv_act")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_dwconv_act_parity(target, layout, with_bias):
    args = inputs("dwconv_act", (2, 17, 13, 7), k=5, biases=with_bias, layout=layout, seed=9, device=target.device)
    ours = check("dwconv_act", target, args, stride=2, activation="hswish")
    assert ours["y"].is_contiguous(memory_format=LAYOUTS[layout])


def _bn_cases():
    """Every shape and activation; the emulated CUDA kernels one activation per shape and mode."""
    acts = ["silu", "hswish", "relu", "none"]
    for param in targets("bn_act"):
        t = param.values[0]
        for training in (True, False):
            for i, shape in enumerate(BN_SHAPES):
                for activation in [acts[(2 * i + training) % len(acts)]] if _emulated(t) else acts:
                    yield pytest.param(t, training, activation, shape,
                                       id=f"{param.id}-{'train' if training else 'eval'}-{activation}-{shape}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("target,training,activation,shape", list(_bn_cases()), indirect=["target"])
def test_bn_act_float64_parity(target, layout, training, activation, shape):
    args = inputs("bn_act", shape, layout=layout, seed=11, device=target.device)
    ours = check("bn_act", target, args, activation=activation, training=training, momentum=0.2, eps=1e-3)
    assert ours["y"].is_contiguous(memory_format=LAYOUTS[layout])


def _se_cases():
    for param in targets("squeeze_excite"):
        t = param.values[0]
        for shape in EMULATED_SE_SHAPES if _emulated(t) else SE_SHAPES:
            yield pytest.param(t, shape, id=f"{param.id}-{shape}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("gate,post_act,biases", [("hsigmoid", "none", True), ("hsigmoid", "hswish", True),
                                                  ("sigmoid", "relu", False)])
@pytest.mark.parametrize("target,shape", list(_se_cases()), indirect=["target"])
def test_squeeze_excite_float64_parity(target, shape, layout, gate, post_act, biases):
    args = inputs("squeeze_excite", shape, biases=biases, layout=layout, seed=13, device=target.device)
    ours = check("squeeze_excite", target, args, gate=gate, post_act=post_act)
    assert ours["y"].is_contiguous(memory_format=LAYOUTS[layout])


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
