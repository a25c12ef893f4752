"""Bad input to every public op, on every backend that runs here: each error is a ValueError or
TypeError that names the argument at fault and what was expected, raised before any kernel
runs. Also the tensors updated in place (running statistics), which must not alias inputs."""

import math

import pytest
import torch
from helpers import DEVICES, runnable_backends

import mobileops
from mobileops import backend, ops

BACKENDS = [pytest.param(b, id=b) for b in runnable_backends("dwconv_bn_act", DEVICES[0])]
C = 4


def _x(c=C, dtype=torch.float32):
    return torch.randn(2, c, 5, 5, dtype=dtype)


def _call(op, x=None, **over):
    """``op`` on valid float32 arguments, with the named ones replaced."""
    x = _x() if x is None else x
    c = x.shape[1] if isinstance(x, torch.Tensor) and x.dim() == 4 else C
    if op == "squeeze_excite":
        args = dict(fc1_weight=torch.randn(2, c), fc1_bias=None, fc2_weight=torch.randn(c, 2), fc2_bias=None)
    else:
        args = dict(bn_weight=torch.ones(c), bn_bias=torch.zeros(c), running_mean=torch.zeros(c),
                    running_var=torch.ones(c), training=True)
        if op in ("dwconv_bn_act", "dwconv_act"):
            args["weight"] = torch.randn(c, 1, 3, 3)
        if op == "dwconv_act":
            args = dict(weight=args["weight"], bias=torch.zeros(c))
    args.update(over)
    return getattr(ops, op)(x, **args)


OPS = ["dwconv_bn_act", "dwconv_act", "bn_act", "squeeze_excite"]
BN_OPS = ["dwconv_bn_act", "bn_act"]
CONV_OPS = ["dwconv_bn_act", "dwconv_act"]

# (ops it applies to, how to break the call, error type, what the message must say)
BAD = [
    (OPS, dict(x=torch.randn(C, 5, 5)), ValueError, "x must be a 4-D"),
    (OPS, dict(x=torch.randn(1, 2, C, 5, 5)), ValueError, "x must be a 4-D"),
    (OPS, dict(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
    (OPS, dict(x=torch.ones(2, C, 5, 5, dtype=torch.int32)), TypeError, "x must be float16, bfloat16, float32"),
    (OPS, dict(x=torch.ones(2, C, 5, 5, dtype=torch.complex64)), TypeError, "x must be float16, bfloat16, float32"),
    (OPS, dict(x=torch.ones(2, C, 5, 5, dtype=torch.bool)), TypeError, "x must be float16, bfloat16, float32"),
    # wrong channel count, device, dtype of a parameter
    (CONV_OPS, dict(weight=torch.randn(C + 1, 1, 3, 3)), ValueError, r"weight must have shape \(4, 1, 3, 3\)"),
    (CONV_OPS, dict(weight=torch.randn(C, 3, 3)), ValueError, "weight must be a 4-D"),
    (CONV_OPS, dict(weight=torch.randn(C, 1, 3, 5)), ValueError, r"weight must have shape \(4, 1, 5, 5\)"),
    (CONV_OPS, dict(weight=torch.randn(C, 1, 3, 3, dtype=torch.float64)), TypeError, "weight has dtype torch.float64"),
    (CONV_OPS, dict(weight=torch.randn(C, 1, 3, 3, device="meta")), ValueError, "weight is on meta but x is on cpu"),
    (CONV_OPS, dict(weight=torch.ones(C, 1, 3, 3, dtype=torch.int64)), TypeError, "weight must be a floating"),
    (CONV_OPS, dict(weight=torch.randn(C, 1, 7, 7), padding=0), ValueError, "does not fit the input"),
    (CONV_OPS, dict(stride=0), ValueError, "stride must be an integer >= 1, got 0"),
    (CONV_OPS, dict(stride=1.5), ValueError, "stride must be an integer >= 1"),
    (CONV_OPS, dict(stride=True), ValueError, "stride must be an integer >= 1"),
    (CONV_OPS, dict(padding=-1), ValueError, "padding must be an integer >= 0"),
    (["dwconv_act"], dict(bias=torch.zeros(C - 1)), ValueError, r"bias must have shape \(4,\)"),
    (["dwconv_act"], dict(bias=torch.zeros(C, dtype=torch.float64)), TypeError, "bias has dtype torch.float64"),
    (BN_OPS, dict(bn_weight=torch.ones(C - 1)), ValueError, r"bn_weight must have shape \(4,\)"),
    (BN_OPS, dict(bn_bias=torch.zeros(C, dtype=torch.int64)), TypeError, "bn_bias must be a floating"),
    (BN_OPS, dict(bn_bias=torch.zeros(C, dtype=torch.complex64)), TypeError, "bn_bias must be a floating"),
    (BN_OPS, dict(running_mean=torch.zeros(C, device="meta")), ValueError, "running_mean is on meta but x is on cpu"),
    (BN_OPS, dict(running_var=torch.ones(C + 1)), ValueError, r"running_var must have shape \(4,\)"),
    (BN_OPS, dict(running_var=None), ValueError, "running_mean and running_var must both be given"),
    (BN_OPS, dict(running_mean=[0.0] * C), TypeError, "running_mean must be a torch.Tensor or None"),
    (BN_OPS, dict(momentum=float("nan")), ValueError, r"momentum must be a number in \[0, 1\], got nan"),
    (BN_OPS, dict(momentum=1.5), ValueError, r"momentum must be a number in \[0, 1\]"),
    (BN_OPS, dict(momentum=-0.1), ValueError, r"momentum must be a number in \[0, 1\]"),
    (BN_OPS, dict(momentum="0.1"), ValueError, r"momentum must be a number in \[0, 1\]"),
    (BN_OPS, dict(eps=-1e-5), ValueError, "eps must be a positive number, got -1e-05"),
    (BN_OPS, dict(eps=0.0), ValueError, "eps must be a positive number"),
    (BN_OPS, dict(eps=float("nan")), ValueError, "eps must be a positive number"),
    (BN_OPS, dict(training="yes"), TypeError, "training must be a bool"),
    (BN_OPS, dict(x=torch.randn(1, C, 1, 1)), ValueError, "more than one value per channel"),
    (["dwconv_bn_act", "dwconv_act", "bn_act"], dict(activation="gelu"), ValueError, "activation must be one of"),
    (["squeeze_excite"], dict(fc1_weight=torch.randn(2, C + 1)), ValueError, r"fc1_weight must have shape \(2, 4\)"),
    (["squeeze_excite"], dict(fc2_weight=torch.randn(C, 3)), ValueError, r"fc2_weight must have shape \(4, 2\)"),
    (["squeeze_excite"], dict(fc1_bias=torch.zeros(3)), ValueError, r"fc1_bias must have shape \(2,\)"),
    (["squeeze_excite"], dict(fc2_weight=torch.randn(C, 2, dtype=torch.float64)), TypeError, "fc2_weight has dtype"),
    (["squeeze_excite"], dict(fc1_weight=torch.randn(2, C, device="meta")), ValueError, "fc1_weight is on meta"),
    (["squeeze_excite"], dict(gate="relu"), ValueError, "gate must be one of"),
    (["squeeze_excite"], dict(post_act="gelu"), ValueError, "post_act must be one of"),
]
CASES = [pytest.param(op, over, error, match, id=f"{op}-{i}") for i, (names, over, error, match) in enumerate(BAD)
         for op in names]


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("op, over, error, match", CASES)
def test_bad_input_is_refused_naming_the_argument(op, over, error, match, backend_name):
    with mobileops.use_backend(backend_name), backend.record_calls() as calls:
        with pytest.raises(error, match=match) as raised:
            _call(op, **over)
    assert str(raised.value).startswith(f"{op}:"), "the message starts with the op's name"
    assert not calls, "nothing may run before the arguments are checked"


def test_every_op_and_error_kind_is_covered():
    covered = {(op, error) for names, _, error, _ in BAD for op in names}
    assert covered >= {(op, e) for op in OPS for e in (ValueError, TypeError)}


# ---- tensors written in place -----------------------------------------------------------------

@pytest.mark.parametrize("op", BN_OPS)
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_running_statistics_must_not_alias_inputs_or_each_other(op, backend_name):
    x = _x()
    storage = torch.zeros(2 * C)
    aliased = [
        ("running_mean and running_var share memory", dict(running_mean=storage[:C], running_var=storage[:C])),
        ("running_var and bn_weight share memory", dict(bn_weight=storage[:C], running_var=storage[:C])),
        # a module's affine weight is an nn.Parameter, not a plain tensor
        ("running_var and bn_weight share memory",
         dict(bn_weight=torch.nn.Parameter(storage[:C], requires_grad=False), running_var=storage[:C])),
        ("running_mean and x share memory", dict(running_mean=x[0, 0, 0, :C])),
        ("must not repeat elements", dict(running_mean=torch.zeros(1).expand(C))),
    ]
    # x a strided (non-dense) view: its span is walked from its strides
    x_big = torch.randn(2, C, 5, 12)
    aliased_strided = dict(running_mean=x_big[1, 0, 0, :C])
    if op == "dwconv_bn_act":
        weight = torch.randn(C, 1, 3, 3)
        aliased.append(("running_mean and weight share memory", dict(weight=weight, running_mean=weight.view(-1)[:C])))
    with mobileops.use_backend(backend_name):
        for match, over in aliased:
            with pytest.raises(ValueError, match=match):
                _call(op, x, **over)
        with pytest.raises(ValueError, match="running_mean and x share memory"):
            _call(op, x_big[..., ::2], **aliased_strided)
        # neighbouring slices of one buffer are fine, and so is any aliasing when nothing is written
        rm, rv = storage[:C], storage[C:].fill_(1.0)
        y = _call(op, x, running_mean=rm, running_var=rv)
        assert torch.isfinite(y).all() and rm.abs().sum() > 0
        _call(op, x, running_mean=storage[:C], running_var=storage[:C], training=False)


# ---- what each backend supports -------------------------------------------------------------

@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("k, stride", [(1, 1), (2, 1), (4, 3), (9, 2)])
def test_triton_and_torch_take_any_kernel_size_and_stride(backend_name, k, stride):
    """The Triton kernels are generic in K and stride (compile-time constants); only the CUDA
    extension is limited to K = 3, 5, 7 (tests/test_cuda_emulated.py)."""
    g = torch.Generator().manual_seed(k)
    x = torch.randn(2, 3, 10, 9, generator=g, dtype=torch.float64)
    w = torch.randn(3, 1, k, k, generator=g, dtype=torch.float64)
    outs = []
    for name in (backend_name, "torch"):
        with mobileops.use_backend(name):
            outs.append(ops.dwconv_bn_act(x, w, None, None, None, None, stride=stride, activation="relu6",
                                          training=True))
    assert outs[0].shape[-2:] == (math.floor((10 + 2 * ((k - 1) // 2) - k) / stride) + 1,
                                  math.floor((9 + 2 * ((k - 1) // 2) - k) / stride) + 1)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-9, atol=1e-12)
