"""Activations understood by the fused ops, looked up by name."""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("none", "relu", "relu6", "hswish", "silu", "hsigmoid")
GATES = ("hsigmoid", "sigmoid")

_FUNCTIONS = {
    "none": lambda x: x,
    "relu": F.relu,
    "relu6": F.relu6,
    # Written out rather than F.hardswish / F.hardsigmoid: their CPU backward kernels use a
    # float32 1/6 even for float64 tensors, which would spoil the float64 reference.
    "hswish": lambda x: x * (F.relu6(x + 3.0) / 6.0),
    "silu": F.silu,
    "hsigmoid": lambda x: F.relu6(x + 3.0) / 6.0,
    "sigmoid": torch.sigmoid,
}


def check_activation(name, argument: str = "activation", choices=ACTIVATIONS, op: str = "") -> str:
    """Return ``name`` if it is one of ``choices``, else raise a ValueError naming ``argument``
    (and the calling ``op``, when given)."""
    if not isinstance(name, str) or name not in choices:
        where = f"{op}: " if op else ""
        raise ValueError(f"{where}{argument} must be one of {', '.join(map(repr, choices))}; got {name!r}")
    return name


def activation(x: torch.Tensor, name: str) -> torch.Tensor:
    """Apply the activation called ``name`` (one of :data:`ACTIVATIONS` or ``"sigmoid"``) to ``x``."""
    return _FUNCTIONS[check_activation(name, choices=ACTIVATIONS + ("sigmoid",))](x)
