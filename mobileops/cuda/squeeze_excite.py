"""CUDA-extension launchers of Squeeze-and-Excitation, with the signatures of
:mod:`mobileops.kernels.squeeze_excite`. Kernels: ``csrc/squeeze_excite_{fwd,bwd}.cu``.

The FC weights and biases go to the kernels as contiguous accumulation-dtype copies (float32,
or float64 for float64 x: they are tiny); their gradients come back in the weights' dtypes.
"""

from __future__ import annotations

import torch

from mobileops.cuda import _extension as ext

_OP = "squeeze_excite"


def _check(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
           b2: torch.Tensor | None) -> tuple[int, int]:
    code = ext.dtype_code(_OP, x)
    ext.check_tensor(_OP, "x", x, x.device, dim=4)
    c = x.shape[1]
    ext.check_tensor(_OP, "fc1_weight", w1, x.device, dim=2)
    r = w1.shape[0]
    ext.check_tensor(_OP, "fc2_weight", w2, x.device, dim=2)
    ext.check_tensor(_OP, "fc1_bias", b1, x.device, dim=1)
    ext.check_tensor(_OP, "fc2_bias", b2, x.device, dim=1)
    if tuple(w1.shape) != (r, c) or tuple(w2.shape) != (c, r) or (b1 is not None and b1.numel() != r) \
            or (b2 is not None and b2.numel() != c):
        raise ValueError(f"{_OP} (cuda backend): FC shapes do not match {c} channels: fc1 {tuple(w1.shape)}, "
                         f"fc2 {tuple(w2.shape)}")
    limit = 48 * 1024 // (8 if x.dtype == torch.float64 else 4)
    if 2 * (c + r) > limit:
        raise ValueError(f"{_OP} (cuda backend): {c} channels + {r} hidden units exceed one block's shared memory")
    return code, r


def _check_like_x(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    """``t`` (the output or its gradient) must have ``x``'s device, dtype and shape."""
    ext.check_tensor(_OP, name, t, x.device, x.dtype, dim=4)
    if tuple(t.shape) != tuple(x.shape):
        raise ValueError(f"{_OP} (cuda backend): {name} has shape {tuple(t.shape)}, expected {tuple(x.shape)}")


def forward(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
            b2: torch.Tensor | None, *, out: torch.Tensor, gate: str,
            post_act: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Write the SE output into ``out``; returns ``(out, pooled, gates)``, the last two (N, C)
    in the accumulation dtype, for the backward."""
    code, r = _check(x, w1, b1, w2, b2)
    _check_like_x("out", out, x)
    acc = ext.acc_dtype(x)
    n, c = x.shape[:2]
    pooled = torch.zeros((n, c), device=x.device, dtype=acc)
    gates = torch.zeros_like(pooled)
    if x.numel() == 0:
        return out, pooled, gates
    stream = ext.prepare(x)
    fc = [ext.as_acc(t, acc) for t in (w1, b1, w2, b2)]  # held until the launch returns (see backward)
    ext.extension().squeeze_excite_forward(
        code, ext.ACTIVATION_CODES[gate], ext.ACTIVATION_CODES[post_act], ext.ptr(x), ext.strides(x),
        list(x.shape), r, *map(ext.ptr, fc), ext.ptr(pooled), ext.ptr(gates), ext.ptr(out), ext.strides(out),
        ext.channels_last(out), stream)
    return out, pooled, gates


def backward(dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
             b2: torch.Tensor | None, pooled: torch.Tensor, gates: torch.Tensor, *, gate: str, post_act: str,
             memory_format: torch.memory_format):
    """Gradients of :func:`forward`: ``(dx, dw1, db1 or None, dw2, db2 or None)``."""
    code, r = _check(x, w1, b1, w2, b2)
    _check_like_x("dy", dy, x)
    acc = ext.acc_dtype(x)
    n, c = x.shape[:2]
    for name, t in (("pooled", pooled), ("gates", gates)):
        ext.check_tensor(_OP, name, t, x.device, acc, dim=2)
        if tuple(t.shape) != (n, c):
            raise ValueError(f"{_OP} (cuda backend): {name} must be {(n, c)}, got {tuple(t.shape)}")
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype, memory_format=memory_format)
    if x.numel() == 0:
        return (dx, *[torch.zeros_like(t) if t is not None else None for t in (w1, b1, w2, b2)])
    per_channel = torch.empty((3, n, c), device=x.device, dtype=acc)  # d_gate, d_pre_gate, d_pooled
    per_hidden = torch.empty((2, n, r), device=x.device, dtype=acc)  # hidden, d_pre_hidden
    dw1 = torch.empty((r, c), device=x.device, dtype=acc)
    dw2 = torch.empty((c, r), device=x.device, dtype=acc)
    db1 = torch.empty(r, device=x.device, dtype=acc) if b1 is not None else None
    db2 = torch.empty(c, device=x.device, dtype=acc) if b2 is not None else None
    stream = ext.prepare(x)
    # Converted copies are held until the launch returns: passing only a temporary's address
    # would free it at once, and the next copy could take its memory.
    held = [ext.as_acc(t, acc) for t in (w1, b1, w2, b2)] + [pooled.contiguous(), gates.contiguous()]
    ext.extension().squeeze_excite_backward(
        code, ext.ACTIVATION_CODES[gate], ext.ACTIVATION_CODES[post_act], ext.ptr(dy), ext.strides(dy), ext.ptr(x),
        ext.strides(x), list(x.shape), r, *map(ext.ptr, held), ext.ptr(per_channel[0]), ext.ptr(per_channel[1]),
        ext.ptr(per_hidden[0]),
        ext.ptr(per_hidden[1]), ext.ptr(per_channel[2]), ext.ptr(dw1), ext.ptr(db1), ext.ptr(dw2), ext.ptr(db2),
        ext.ptr(dx), ext.strides(dx), ext.channels_last(dx), stream)

    def back(grad, like):
        return None if grad is None else grad.to(like.dtype)

    return dx, back(dw1, w1), back(db1, b1), back(dw2, w2), back(db2, b2)
