"""The seed activations, and the mapping from activation modules to fused-op names."""

from __future__ import annotations

import torch
from torch import nn

from mobileops import ops


class h_sigmoid(nn.Module):  # the seed's class name
    """Hard sigmoid ``relu6(x + 3) / 6`` (MobileNetV3). ``inplace`` is kept for signature
    compatibility; the result is always a new tensor."""

    def __init__(self, inplace: bool = True):
        super().__init__()
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.activation(x, "hsigmoid")


class h_swish(nn.Module):  # the seed's class name
    """Hard swish ``x * relu6(x + 3) / 6`` (MobileNetV3). ``inplace`` as in :class:`h_sigmoid`."""

    def __init__(self, inplace: bool = True):
        super().__init__()
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.activation(x, "hswish")


_NAMES = (
    (nn.Identity, "none"),
    (nn.ReLU6, "relu6"),
    (nn.ReLU, "relu"),
    (h_swish, "hswish"),
    (nn.Hardswish, "hswish"),
    (nn.SiLU, "silu"),
    (h_sigmoid, "hsigmoid"),
    (nn.Hardsigmoid, "hsigmoid"),
    (nn.Sigmoid, "sigmoid"),
)


def activation_name(module: nn.Module | None) -> str | None:
    """The fused-op name of an activation module (None -> "none"), or None if it has none.

    Only exact types are recognised, so a subclass with a different forward is never
    mistaken for the activation it derives from.
    """
    if module is None:
        return "none"
    for cls, name in _NAMES:
        if type(module) is cls:
            return name
    return None
