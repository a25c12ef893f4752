"""How a block's (conv, BatchNorm, activation) triple is routed to the fused ops.

Blocks keep plain ``nn.Conv2d`` / ``nn.BatchNorm2d`` / activation submodules (that is what
makes their ``state_dict`` identical to the seed's) and call :func:`conv_bn_act` instead of
running them one by one.  Anything the ops cannot express (an unknown activation module, a
dilated or biased depthwise conv...) runs through the plain modules, so results never change.
"""

from __future__ import annotations

import torch
from torch import nn

from mobileops import ops
from mobileops.nn.activation import activation_name
from mobileops.ops._checks import autocast_on


def is_same_padded_depthwise(conv: nn.Module) -> bool:
    """True for a square, undilated, zero-padded depthwise conv with "same" padding."""
    if type(conv) is not nn.Conv2d:
        return False
    k = conv.kernel_size
    return (conv.groups == conv.in_channels == conv.out_channels and k[0] == k[1]
            and conv.stride[0] == conv.stride[1] and conv.dilation == (1, 1)
            and conv.padding == ((k[0] - 1) // 2,) * 2 and conv.padding_mode == "zeros")


def bn_op_arguments(bn: nn.BatchNorm2d) -> dict:
    """Keyword arguments of the fused BN ops reproducing ``bn.forward`` exactly.

    Like ``nn.BatchNorm2d.forward`` this increments ``num_batches_tracked`` in training.
    """
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    # The ops already normalise with batch statistics when no running statistics are given.
    track = not bn.training or bn.track_running_stats
    return dict(bn_weight=bn.weight, bn_bias=bn.bias,
                running_mean=bn.running_mean if track else None,
                running_var=bn.running_var if track else None,
                training=bn.training, momentum=factor, eps=bn.eps)


def conv_bn_act(x: torch.Tensor, conv: nn.Module, bn: nn.Module | None,
                act: nn.Module | None) -> torch.Tensor:
    """``act(bn(conv(x)))`` through the fused ops; ``bn`` may be None or Identity (folded)."""
    _check_conv_input(x, conv)
    if bn is not None and type(bn) is not nn.BatchNorm2d:
        if type(bn) is not nn.Identity:
            return _plain(x, conv, bn, act)
        bn = None
    name = activation_name(act)
    op_act = name if name in ops.ACTIVATIONS else "none"
    if is_same_padded_depthwise(conv):
        stride = conv.stride[0]
        if bn is None:
            y = ops.dwconv_act(x, conv.weight, conv.bias, stride=stride, activation=op_act)
        elif conv.bias is None:
            y = ops.dwconv_bn_act(x, conv.weight, stride=stride, activation=op_act, **bn_op_arguments(bn))
        else:
            return _plain(x, conv, bn, act)
    else:
        y = conv(x)
        if bn is None:
            y = ops.activation(y, op_act)
        else:
            y = ops.bn_act(y, activation=op_act, **bn_op_arguments(bn))
    return y if op_act == name else act(y)


def _plain(x, conv, bn, act):
    y = bn(conv(x))
    return y if act is None else act(y)


def _check_conv_input(x, conv) -> None:
    expected = f"a floating (N, {conv.in_channels}, H, W) tensor"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{type(conv).__name__}: expected {expected}, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != conv.in_channels:
        raise ValueError(f"{type(conv).__name__}: expected {expected}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{type(conv).__name__}: expected {expected}, got dtype {x.dtype}")
    weight = conv.weight
    if x.device != weight.device:
        raise ValueError(f"{type(conv).__name__}: input is on {x.device} but the block's weights are on "
                         f"{weight.device}; move the input or the model")
    # Under autocast the ops cast input and weights to one dtype, as F.conv2d does.
    if x.dtype != weight.dtype and not autocast_on(x.device):
        raise TypeError(f"{type(conv).__name__}: input has dtype {x.dtype} but the block's weights have "
                        f"{weight.dtype}; cast the input or the model, or run under torch.autocast")
