"""CUDA-extension launchers of depthwise conv + BatchNorm + activation (``weight=None``: BN +
activation), with the signatures of :mod:`mobileops.kernels.dwconv_bn_act`.

Kernels: ``csrc/dwconv_bn_act_fwd.cu`` (apply, batch statistics) and ``csrc/dwconv_bn_act_bwd.cu``.
Per-channel parameters and statistics go to the kernels in the accumulation dtype (float32,
float64 for float64 input); running statistics of another dtype or layout are updated through a
float copy and written back.
"""

from __future__ import annotations

import math

import torch

from mobileops.cuda import _extension as ext

_OP = "dwconv_bn_act"


def _shape(x: torch.Tensor, weight: torch.Tensor | None, stride: int, padding: int):
    n, c, h, w = x.shape
    k = 0 if weight is None else weight.shape[-1]
    if k:
        ho, wo = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    else:
        ho, wo, stride, padding = h, w, 1, 0
    return k, [n, c, h, w, ho, wo, stride, padding]


def _check(x: torch.Tensor, weight: torch.Tensor | None, *params: torch.Tensor | None) -> int:
    code = ext.dtype_code(_OP, x)
    ext.check_tensor(_OP, "x", x, x.device, dim=4)
    if x.shape[1] > 65535:
        raise ValueError(f"{_OP} (cuda backend): at most 65535 channels, got {x.shape[1]}")
    if weight is not None:
        ext.check_tensor(_OP, "weight", weight, x.device, x.dtype, dim=4)
        if weight.shape[-1] not in (3, 5, 7) or weight.shape[-2] != weight.shape[-1]:
            raise ValueError(f"{_OP} (cuda backend): kernel size must be 3, 5 or 7, got {tuple(weight.shape[-2:])}")
    for i, p in enumerate(params):
        ext.check_tensor(_OP, f"per-channel argument {i}", p, x.device, dim=1)
        if p is not None and p.numel() != x.shape[1]:
            raise ValueError(f"{_OP} (cuda backend): per-channel argument {i} has {p.numel()} values, "
                             f"expected {x.shape[1]}")
    return code


def _chunking(positions: int, channels: int, channels_last: bool) -> tuple[int, int]:
    """(chunk, chunks): enough (chunk, channel group) blocks to fill a GPU, at least 4 positions
    per thread; a fixed function of the shape and layout, so the reduction order, and the
    result, never change between runs. The reducing kernels' blocks are 32 channels x 8
    position rows in channels_last and 1 channel x 256 rows otherwise (csrc/common.cuh,
    reduce_block)."""
    rows, groups = (8, math.ceil(channels / 32)) if channels_last else (256, channels)
    chunks = max(1, min(math.ceil(positions / (4 * rows)), math.ceil(2048 / max(1, groups))))
    chunk = math.ceil(positions / chunks)
    return chunk, math.ceil(positions / chunk)


def _weight(weight: torch.Tensor | None) -> torch.Tensor | None:
    return None if weight is None else weight.detach().contiguous()


def _params(weight, gamma, beta, mean, var, acc: torch.dtype) -> list[torch.Tensor | None]:
    """The conv weight (contiguous) and the BN tensors (in ``acc``) as the kernels read them.
    The caller must hold the list until the launch returns: a converted copy whose address
    alone is passed would be freed at once, and the next copy could take its memory."""
    return [_weight(weight)] + [ext.as_acc(t, acc) for t in (gamma, beta, mean, var)]


def forward(x: torch.Tensor, weight: torch.Tensor | None, gamma: torch.Tensor | None,
            beta: torch.Tensor | None, mean: torch.Tensor | None, var: torch.Tensor | None,
            *, out: torch.Tensor, stride: int, padding: int, activation: str, norm: str,
            eps: float) -> torch.Tensor:
    """Write ``act((conv(x) - mean) * rstd * gamma + beta)`` into ``out`` (see the Triton
    launcher for ``norm``) and return it."""
    code = _check(x, weight, gamma, beta, mean, var)
    ext.check_tensor(_OP, "out", out, x.device, x.dtype, dim=4)
    k, shape = _shape(x, weight, stride, padding)
    if tuple(out.shape) != (shape[0], shape[1], shape[4], shape[5]):
        raise ValueError(f"{_OP} (cuda backend): out has shape {tuple(out.shape)}, expected "
                         f"{(shape[0], shape[1], shape[4], shape[5])}")
    if out.numel() == 0:
        return out
    acc = ext.acc_dtype(x)
    stream = ext.prepare(x)
    params = _params(weight, gamma, beta, mean, var, acc)  # referenced until the launch returns
    ext.extension().dwconv_bn_act_forward(
        code, k, ext.ACTIVATION_CODES[activation], ext.NORM_CODES[norm], ext.ptr(x), ext.strides(x),
        *map(ext.ptr, params), float(eps), ext.ptr(out), ext.strides(out),
        shape, ext.channels_last(out), stream)
    return out


def batch_stats(x: torch.Tensor, weight: torch.Tensor | None, running_mean: torch.Tensor | None,
                running_var: torch.Tensor | None, *, stride: int, padding: int, momentum: float,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and rstd of conv(x) in the accumulation dtype, updating the
    running statistics in place (nn.BatchNorm2d's rule) when given."""
    code = _check(x, weight, running_mean, running_var)
    k, shape = _shape(x, weight, stride, padding)
    acc = ext.acc_dtype(x)
    c, positions = shape[1], shape[0] * shape[4] * shape[5]
    if positions < 2:
        raise ValueError(f"{_OP} (cuda backend): batch statistics need at least 2 values per channel")
    layout = ext.channels_last(x)
    chunk, chunks = _chunking(positions, c, layout)
    parts = torch.empty((3, chunks, c), device=x.device, dtype=acc)
    mean = torch.empty(c, device=x.device, dtype=acc)
    rstd = torch.empty_like(mean)
    update = running_mean is not None
    run_mean, run_var = ext.as_acc(running_mean, acc), ext.as_acc(running_var, acc)
    stream = ext.prepare(x)
    conv_weight = _weight(weight)  # referenced until the launch returns (see _params)
    ext.extension().dwconv_bn_stats(
        code, k, ext.ptr(x), ext.strides(x), ext.ptr(conv_weight), shape, chunk, chunks, ext.ptr(parts[0]),
        ext.ptr(parts[1]), ext.ptr(parts[2]), ext.ptr(mean), ext.ptr(rstd), ext.ptr(run_mean), ext.ptr(run_var),
        float(momentum), float(eps), layout, stream)
    if update:
        for target, updated in ((running_mean, run_mean), (running_var, run_var)):
            if updated.data_ptr() != target.data_ptr():
                target.copy_(updated)
    return mean, rstd


def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, gamma: torch.Tensor | None,
             beta: torch.Tensor | None, mean: torch.Tensor | None, var: torch.Tensor | None,
             *, stride: int, padding: int, activation: str, norm: str, eps: float,
             weight_grad: bool, memory_format: torch.memory_format):
    """Gradients of :func:`forward`: ``(dx, dweight or None, sum_du, sum_du_xhat)`` as the
    Triton launcher returns them."""
    code = _check(x, weight, gamma, beta, mean, var)
    ext.check_tensor(_OP, "dy", dy, x.device, x.dtype, dim=4)
    k, shape = _shape(x, weight, stride, padding)
    n, c, h, w, ho, wo = shape[:6]
    if tuple(dy.shape) != (n, c, ho, wo):
        raise ValueError(f"{_OP} (cuda backend): dy has shape {tuple(dy.shape)}, expected {(n, c, ho, wo)}")
    acc = ext.acc_dtype(x)
    weight_grad = weight_grad and weight is not None
    dx = torch.empty((n, c, h, w), device=x.device, dtype=x.dtype, memory_format=memory_format)
    positions = n * ho * wo
    if dx.numel() == 0 or positions == 0:
        zeros = torch.zeros(c, device=x.device, dtype=acc)
        return dx.zero_(), torch.zeros_like(weight) if weight_grad else None, zeros, zeros.clone()
    chunk, chunks = _chunking(positions, c, ext.channels_last(dx))
    parts = torch.empty((2, chunks, c), device=x.device, dtype=acc)
    # separate tensors: the custom op's outputs must not share storage
    sums = [torch.empty(c, device=x.device, dtype=acc) for _ in range(2)]
    dz = torch.empty((n, c, ho, wo), device=x.device, dtype=acc, memory_format=memory_format) if k else None
    taps = k * k
    part_dw = torch.empty((chunks, c * taps), device=x.device, dtype=acc) if weight_grad else None
    dw = torch.empty((c, 1, k, k), device=x.device, dtype=acc) if weight_grad else None
    stream = ext.prepare(x)
    params = _params(weight, gamma, beta, mean, var, acc)  # referenced until the launch returns
    ext.extension().dwconv_bn_act_backward(
        code, k, ext.ACTIVATION_CODES[activation], ext.NORM_CODES[norm], ext.ptr(dy), ext.strides(dy), ext.ptr(x),
        ext.strides(x), *map(ext.ptr, params), float(eps), shape, chunk, chunks,
        ext.ptr(parts[0]), ext.ptr(parts[1]), ext.ptr(sums[0]), ext.ptr(sums[1]), ext.ptr(dz),
        ext.strides(dz) if dz is not None else (0, 0, 0, 0), ext.ptr(part_dw), ext.ptr(dw), ext.ptr(dx),
        ext.strides(dx), ext.channels_last(dx), stream)
    return dx, dw.to(weight.dtype) if dw is not None else None, sums[0], sums[1]
