"""Small helpers shared by the blocks: channel rounding, padding, BN folding."""

from __future__ import annotations

import torch
from torch import nn


def make_divisible(value: float, divisor: int, min_value: int | None = None,
                   round_down_protect: bool = True) -> int:
    """Round ``value`` to a multiple of ``divisor`` (MobileNetV4's rule).

    The result is ``max(min_value, int(value + divisor / 2) // divisor * divisor)``
    (``min_value`` defaults to ``divisor``); with ``round_down_protect`` a result below
    90% of ``value`` is raised by one ``divisor``. E.g. 20 -> 24, 12 -> 16, 64 -> 64.
    """
    if min_value is None:
        min_value = divisor
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if round_down_protect and new_value < 0.9 * value:
        new_value += divisor
    return int(new_value)


def check_sizes(block: str, minimum: int = 1, **sizes) -> None:
    """Raise ValueError naming ``block`` and the argument unless every value in ``sizes`` is an
    int (not a bool) of at least ``minimum``; a tuple or list (a kernel size per dimension) is
    checked element by element. Constructors call it so that a size that cannot work fails
    where it is given, not as a backend error at the first forward."""
    for name, value in sizes.items():
        values = value if isinstance(value, (tuple, list)) else (value,)
        if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in values):
            raise ValueError(f"{block}: {name} must be an integer >= {minimum}, got {value!r}")


def autopad(k, p=None, d: int = 1):
    """YOLOv5's "same" padding for kernel ``k`` (int or list) with dilation ``d``."""
    if d > 1:
        k = d * (k - 1) + 1 if isinstance(k, int) else [d * (x - 1) + 1 for x in k]
    if p is None:
        p = k // 2 if isinstance(k, int) else [x // 2 for x in k]
    return p


@torch.no_grad()
def fold_bn_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new Conv2d (with bias) computing ``bn(conv(x))`` with ``bn`` in eval mode."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm2d without running statistics "
                         "(track_running_stats=False) into a convolution")
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      conv.padding, conv.dilation, conv.groups, bias=True,
                      padding_mode=conv.padding_mode, device=conv.weight.device,
                      dtype=conv.weight.dtype)
    # Fold in float64 so that the fused weights round once.
    inv_std = torch.rsqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(inv_std)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(inv_std)
    scale = gamma * inv_std
    conv_bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(inv_std)
    fused.weight.copy_(conv.weight.double() * scale.view(-1, 1, 1, 1))
    fused.bias.copy_(beta + (conv_bias - bn.running_mean.double()) * scale)
    fused.train(conv.training)
    return fused


def fuse_conv_bn(parent: nn.Module, conv_name: str, bn_name: str, keep_slot: bool = False) -> None:
    """Fold ``parent.<bn_name>`` into ``parent.<conv_name>`` in place (no-op if already folded).

    The BN child is deleted, or replaced by ``nn.Identity`` when ``keep_slot`` (a Sequential
    whose indices must not shift).
    """
    bn = parent._modules.get(bn_name)
    if type(bn) is not nn.BatchNorm2d:
        return
    parent._modules[conv_name] = fold_bn_into_conv(parent._modules[conv_name], bn)
    if keep_slot:
        parent._modules[bn_name] = nn.Identity()
    else:
        del parent._modules[bn_name]


def fuse_modules(module: nn.Module) -> nn.Module:
    """Fold every BatchNorm2d under ``module`` into the convolution before it, in place.

    Children with a ``fuse()`` method fuse themselves; other containers are searched
    recursively, and in a Sequential each Conv2d directly followed by a BatchNorm2d is folded.
    """
    names = list(module._modules)
    for i, name in enumerate(names):
        child = module._modules[name]
        if child is None:
            continue
        if callable(getattr(child, "fuse", None)):
            child.fuse()
        elif (isinstance(module, nn.Sequential) and type(child) is nn.BatchNorm2d and i > 0
              and type(module._modules[names[i - 1]]) is nn.Conv2d):
            fuse_conv_bn(module, names[i - 1], name, keep_slot=True)
        else:
            fuse_modules(child)
    return module
