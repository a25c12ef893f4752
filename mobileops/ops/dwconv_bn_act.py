"""Depthwise convolution + BatchNorm + activation, and its BN-folded form.

The ``torch`` backend here is the reference: the plain PyTorch composition
(``conv2d(groups=C)`` -> ``batch_norm`` -> activation), autograd by PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mobileops import backend
from mobileops.ops import _checks, _plan
from mobileops.ops.activation import activation as apply_activation
from mobileops.ops.activation import check_activation


def dwconv_bn_act(x: torch.Tensor, weight: torch.Tensor, bn_weight: torch.Tensor | None,
                  bn_bias: torch.Tensor | None, running_mean: torch.Tensor | None,
                  running_var: torch.Tensor | None, *, stride: int = 1,
                  padding: int | None = None, activation: str = "none", training: bool = False,
                  momentum: float = 0.1, eps: float = 1e-5) -> torch.Tensor:
    """Depthwise KxK convolution (no bias), then BatchNorm, then an activation.

    Args:
        x: input (N, C, H, W), float16/bfloat16/float32/float64, NCHW or channels_last.
        weight: depthwise kernel (C, 1, K, K), same dtype as ``x`` (outside autocast).
        bn_weight, bn_bias: BN affine parameters (C,) or None (identity affine).
        running_mean, running_var: BN running statistics (C,), or both None to always
            normalise with batch statistics (``track_running_stats=False``).
        stride: convolution stride (>= 1).
        padding: zero padding on each side; None means "same" padding ``(K - 1) // 2``.
        activation: one of ``none, relu, relu6, hswish, silu, hsigmoid``.
        training: True normalises with the batch mean and biased variance and updates the
            running statistics in place (unbiased variance) like ``nn.BatchNorm2d``; False
            normalises with the running statistics.
        momentum: the running-statistics update factor for this call, i.e.
            ``nn.BatchNorm2d``'s exponential average factor (``1 / num_batches_tracked``
            when the module's momentum is None).
        eps: BN epsilon.

    Returns:
        (N, C, H_out, W_out) tensor in ``x``'s dtype and memory format.
    """
    key = _plan.call_key(x, (weight, bn_weight, bn_bias, running_mean, running_var),
                         (stride, type(stride), padding, type(padding), activation, training, type(training)))
    plan = _plan.lookup(_DWCONV_BN_ACT_PLANS, key)
    if plan is None:
        plan = _plan.remember(_DWCONV_BN_ACT_PLANS, key, _dwconv_bn_act_plan(
            x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, activation, training))
    _checks.check_bn_scalars("dwconv_bn_act", momentum, eps)
    if plan.in_place is not None:
        plan.in_place(running_mean, running_var, x, bn_weight, bn_bias, weight)
    return plan.impl(x, weight, bn_weight, bn_bias, running_mean, running_var, momentum=float(momentum),
                     eps=float(eps), **plan.options)


_DWCONV_BN_ACT_PLANS = backend.plan_cache()


def _dwconv_bn_act_plan(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, activation,
                        training) -> _plan.Plan:
    """Validate a call signature of :func:`dwconv_bn_act` and choose its implementation."""
    op = "dwconv_bn_act"
    _checks.check_input(op, x)
    k = _checks.check_depthwise_weight(op, weight, x)
    _checks.check_bn_tensors(op, x, bn_weight, bn_bias, running_mean, running_var, training)
    stride = _checks.check_int(op, "stride", stride, 1)
    padding = _checks.resolve_padding(op, padding, k)
    check_activation(activation, op=op)
    out_hw = _checks.check_conv_output(op, x, k, stride, padding)
    batch_stats = training or running_mean is None
    _checks.check_batch_stats_size(op, x.shape, out_hw, batch_stats)
    inference = not batch_stats and not _checks.needs_grad(x, weight, bn_weight, bn_bias)
    impl = backend.resolve(op, x.device, inference=inference, numel=x.numel())
    in_place = None
    if training and running_mean is not None:
        in_place = _checks.InPlaceCheck(op, {"running_mean": running_mean, "running_var": running_var},
                                        {"x": x, "bn_weight": bn_weight, "bn_bias": bn_bias, "weight": weight})
    return _plan.bind(impl, (x, weight, bn_weight, bn_bias, running_mean, running_var),
                      dict(stride=stride, padding=padding, activation=activation, training=training), in_place)


def dwconv_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
               stride: int = 1, padding: int | None = None,
               activation: str = "none") -> torch.Tensor:
    """Depthwise KxK convolution with an optional bias, then an activation.

    This is :func:`dwconv_bn_act` after the BatchNorm has been folded into ``weight`` and
    ``bias`` (``fuse()``); arguments as there, with ``bias`` of shape (C,) or None.
    """
    key = _plan.call_key(x, (weight, bias), (stride, type(stride), padding, type(padding), activation))
    plan = _plan.lookup(_DWCONV_ACT_PLANS, key)
    if plan is None:
        plan = _plan.remember(_DWCONV_ACT_PLANS, key, _dwconv_act_plan(x, weight, bias, stride, padding, activation))
    return plan.impl(x, weight, bias, **plan.options)


_DWCONV_ACT_PLANS = backend.plan_cache()


def _dwconv_act_plan(x, weight, bias, stride, padding, activation) -> _plan.Plan:
    """Validate a call signature of :func:`dwconv_act` and choose its implementation."""
    op = "dwconv_act"
    _checks.check_input(op, x)
    k = _checks.check_depthwise_weight(op, weight, x)
    _checks.check_tensor(op, "bias", bias, (x.shape[1],), x, optional=True, same_dtype=True)
    stride = _checks.check_int(op, "stride", stride, 1)
    padding = _checks.resolve_padding(op, padding, k)
    check_activation(activation, op=op)
    _checks.check_conv_output(op, x, k, stride, padding)
    impl = backend.resolve(op, x.device, inference=not _checks.needs_grad(x, weight, bias), numel=x.numel())
    return _plan.bind(impl, (x, weight, bias), dict(stride=stride, padding=padding, activation=activation))


@backend.register_impl("dwconv_bn_act", "torch")
def _dwconv_bn_act_torch(x, weight, bn_weight, bn_bias, running_mean, running_var, *, stride,
                         padding, activation, training, momentum, eps):
    y = _depthwise_conv(x, weight, None, stride, padding)
    y = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias,
                     training or running_mean is None, momentum, eps)
    return apply_activation(y, activation)


@backend.register_impl("dwconv_act", "torch")
def _dwconv_act_torch(x, weight, bias, *, stride, padding, activation):
    return apply_activation(_depthwise_conv(x, weight, bias, stride, padding), activation)


def _depthwise_conv(x, weight, bias, stride, padding):
    # The op's contract is x's memory format; CUDA's float64 depthwise conv returns NCHW for
    # channels_last input (seen on an H100), the other paths already match (then a no-op).
    y = F.conv2d(x, weight, bias, stride, padding, 1, x.shape[1])
    return y.contiguous(memory_format=_checks.suggest_memory_format(x))
