"""CUDA-extension launchers of Squeeze-and-Excitation, with the signatures of
:mod:`mobileops.kernels.squeeze_excite`. Kernels: ``csrc/squeeze_excite_{fwd,bwd}.cu``.

The FC weights and biases go to the kernels as contiguous accumulation-dtype copies (float32,
or float64 for float64 x: they are tiny); their gradients come back in the weights' dtypes.
"""

from __future__ import annotations

import torch

from mobileops.cuda import _extension as ext
from mobileops.cuda.dwconv_bn_act import _chunking


def _sum_chunks(x: torch.Tensor, acc: torch.dtype) -> tuple[int, int, torch.Tensor | None]:
    """(chunk, chunks, the partial sums' buffer or None for one chunk) of x's SE channel sums."""
    n, c, h, w = x.shape
    chunk, chunks = _chunking(h * w, c, x.element_size(), ext.channels_last(x), samples=n)
    return chunk, chunks, torch.empty((n * chunks, c), device=x.device, dtype=acc) if chunks > 1 else None


def forward(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
            b2: torch.Tensor | None, *, out: torch.Tensor, gate: str,
            post_act: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Write the SE output into ``out``; returns ``(out, pooled, gates)``, the last two (N, C)
    in the accumulation dtype, for the backward. The op in :mod:`mobileops.ops` has validated
    the tensors; the binding checks what it is given (codes, sizes, shared-memory fit)."""
    acc = ext.acc_dtype(x)
    pooled = torch.zeros(x.shape[:2], device=x.device, dtype=acc)
    gates = torch.zeros_like(pooled)
    if x.numel() == 0:
        return out, pooled, gates
    stream = ext.prepare(x)
    # Converted copies are held until the launch returns: passing only a temporary's address
    # would free it at once, and the next copy could take its memory.
    w1, b1, w2, b2 = (ext.as_acc(t, acc) for t in (w1, b1, w2, b2))
    chunk, chunks, part = _sum_chunks(x, acc)
    ext.extension().squeeze_excite_forward(
        dtype=ext.DTYPE_CODES[x.dtype], gate=ext.ACTIVATION_CODES[gate], post_act=ext.ACTIVATION_CODES[post_act],
        x=x.data_ptr(), x_strides=ext.strides(x), x_shape=x.shape, hidden=w1.shape[0], w1=w1.data_ptr(),
        b1=ext.ptr(b1), w2=w2.data_ptr(), b2=ext.ptr(b2), chunk=chunk, chunks=chunks, part=ext.ptr(part),
        pooled=pooled.data_ptr(), gates=gates.data_ptr(),
        y=out.data_ptr(), y_strides=ext.strides(out), channels_last=ext.channels_last(out), stream=stream)
    return out, pooled, gates


def backward(dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
             b2: torch.Tensor | None, pooled: torch.Tensor, gates: torch.Tensor, *, gate: str, post_act: str,
             memory_format: torch.memory_format):
    """Gradients of :func:`forward`: ``(dx, dw1, db1 or None, dw2, db2 or None)``."""
    acc = ext.acc_dtype(x)
    n, c = x.shape[:2]
    r = w1.shape[0]
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
    # Held until the launch returns (see forward).
    fc1, fc1_bias, fc2, fc2_bias = (ext.as_acc(t, acc) for t in (w1, b1, w2, b2))
    pooled, gates = pooled.contiguous(), gates.contiguous()
    chunk, chunks, part = _sum_chunks(x, acc)
    ext.extension().squeeze_excite_backward(
        dtype=ext.DTYPE_CODES[x.dtype], gate=ext.ACTIVATION_CODES[gate], post_act=ext.ACTIVATION_CODES[post_act],
        dy=dy.data_ptr(), dy_strides=ext.strides(dy), x=x.data_ptr(), x_strides=ext.strides(x), x_shape=x.shape,
        hidden=r, w1=fc1.data_ptr(), b1=ext.ptr(fc1_bias), w2=fc2.data_ptr(), b2=ext.ptr(fc2_bias), chunk=chunk,
        chunks=chunks, part=ext.ptr(part), pooled=pooled.data_ptr(), gates=gates.data_ptr(),
        d_gate=per_channel[0].data_ptr(), d_pre_gate=per_channel[1].data_ptr(), hidden_act=per_hidden[0].data_ptr(),
        d_pre_hidden=per_hidden[1].data_ptr(), d_pooled=per_channel[2].data_ptr(), dw1=dw1.data_ptr(),
        db1=ext.ptr(db1), dw2=dw2.data_ptr(), db2=ext.ptr(db2), dx=dx.data_ptr(), dx_strides=ext.strides(dx),
        channels_last=ext.channels_last(dx), stream=stream)

    def back(grad, like):
        return None if grad is None else grad.to(like.dtype)

    return dx, back(dw1, w1), back(db1, b1), back(dw2, w2), back(db2, b2)
