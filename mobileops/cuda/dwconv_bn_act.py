"""CUDA-extension launchers of depthwise conv + BatchNorm + activation (``weight=None``: BN +
activation), with the signatures of :mod:`mobileops.kernels.dwconv_bn_act`.

Kernels: ``csrc/dwconv_bn_act_fwd.cu`` (apply, batch statistics) and ``csrc/dwconv_bn_act_bwd.cu``.
Per-channel parameters and statistics go to the kernels in the accumulation dtype (float32,
float64 for float64 input); running statistics of another dtype or layout are updated through a
float copy and written back.
"""

from __future__ import annotations

import functools
import math

import torch

from mobileops.cuda import _extension as ext

#: dz_strides when there is no conv (and so no dz workspace).
_NO_STRIDES = (0, 0, 0, 0)


def _kernel_size(weight: torch.Tensor | None) -> int:
    """The kernels' K: 0 without a conv (bn_act)."""
    return 0 if weight is None else weight.shape[-1]


def _out_hw(x_shape: torch.Size, k: int, stride: int, padding: int) -> tuple[int, int]:
    """The conv output's (H_out, W_out); the binding derives the same and checks it."""
    h, w = x_shape[2:]
    return ((h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1) if k else (h, w)


#: csrc/common.cuh's reducing-block constants (kReduceThreads, kLastChannels, kLineBytes) and
#: pack size; tests/test_cuda_emulated.py checks reduce_shape against the binding's.
REDUCE_THREADS, LAST_CHANNELS, LINE_BYTES, PACK_BYTES = 256, 32, 128, 16


def pack_width(element: int) -> int:
    """Channels in one 16-byte pack of ``element``-byte values (csrc VecWidth: float64 stays one)."""
    return 1 if element >= 8 else PACK_BYTES // element


def reduce_shape(channels: int, vec: int, element: int, channels_last: bool) -> tuple[int, int, int]:
    """(lanes, rows, channel groups) of a reducing block with ``vec`` channels of ``element``
    bytes per lane, as csrc/common.cuh reduce_shape: NCHW 1 x 256; channels_last with packs as
    many lanes as cover a 128-byte line of a position's channels, fewer when C is small; one
    channel per lane 32."""
    if not channels_last:
        return 1, REDUCE_THREADS, channels
    lanes = LAST_CHANNELS
    if vec > 1:
        lanes = 1
        while lanes < LINE_BYTES // (vec * element) and lanes * vec < channels:
            lanes *= 2
    return lanes, REDUCE_THREADS // lanes, -(-channels // (lanes * vec))


@functools.lru_cache(maxsize=1024)
def _chunking(positions: int, channels: int, element: int, channels_last: bool,
              samples: int = 1) -> tuple[int, int]:
    """(chunk, chunks) of ``positions``: enough (sample, chunk, channel group) blocks to fill a
    GPU (up to 2048, at least two per SM at the detectors' shapes: tests/test_static_report.py),
    at least 2 positions per thread. ``samples`` reductions of ``positions`` each run side by
    side (the SE channel sums: one per sample; the depthwise statistics: one over the batch). A
    fixed function of the shape, element size and layout, so the reduction order, and the
    result, never change between runs. Sized for the 16-byte packs where C is a multiple of the
    pack (the other passes and a misaligned input's fallback keep the same chunks). Cached: it
    depends on the call's signature only."""
    vec = pack_width(element) if channels_last and channels % pack_width(element) == 0 else 1
    _, rows, groups = reduce_shape(channels, vec, element, channels_last)
    chunks = max(1, min(math.ceil(positions / (2 * rows)), math.ceil(2048 / max(1, samples * groups))))
    chunk = math.ceil(positions / chunks)
    return chunk, math.ceil(positions / chunk)


def _weight(weight: torch.Tensor | None) -> torch.Tensor | None:
    return None if weight is None else weight.detach().contiguous()


def _params(weight, gamma, beta, mean, var, acc: torch.dtype) -> list[torch.Tensor | None]:
    """The conv weight (contiguous) and the BN tensors (in ``acc``) as the kernels read them.
    The caller must hold them until the launch returns: a converted copy whose address alone
    is passed would be freed at once, and the next copy could take its memory."""
    return [_weight(weight)] + [ext.as_acc(t, acc) for t in (gamma, beta, mean, var)]


def forward(x: torch.Tensor, weight: torch.Tensor | None, gamma: torch.Tensor | None,
            beta: torch.Tensor | None, mean: torch.Tensor | None, var: torch.Tensor | None,
            *, out: torch.Tensor, stride: int, padding: int, activation: str, norm: str,
            eps: float) -> torch.Tensor:
    """Write ``act((conv(x) - mean) * rstd * gamma + beta)`` into ``out`` (see the Triton
    launcher for ``norm``) and return it. The op in :mod:`mobileops.ops` has validated the
    tensors; the binding checks what it is given (codes, kernel size, sizes, ``out``'s shape)."""
    if out.numel() == 0:
        return out
    stream = ext.prepare(x)
    conv_weight, gamma, beta, mean, var = _params(weight, gamma, beta, mean, var, ext.acc_dtype(x))
    ext.extension().dwconv_bn_act_forward(
        dtype=ext.DTYPE_CODES[x.dtype], kernel_size=_kernel_size(weight), activation=ext.ACTIVATION_CODES[activation],
        norm=ext.NORM_CODES[norm], x=x.data_ptr(), x_strides=ext.strides(x), x_shape=x.shape, stride=stride,
        padding=padding, weight=ext.ptr(conv_weight), gamma=ext.ptr(gamma), beta=ext.ptr(beta), mean=ext.ptr(mean),
        var=ext.ptr(var), eps=eps, y=out.data_ptr(), y_strides=ext.strides(out), y_shape=out.shape,
        channels_last=ext.channels_last(out), stream=stream)
    return out


def batch_stats(x: torch.Tensor, weight: torch.Tensor | None, running_mean: torch.Tensor | None,
                running_var: torch.Tensor | None, *, stride: int, padding: int, momentum: float,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and rstd of conv(x) in the accumulation dtype, updating the
    running statistics in place (nn.BatchNorm2d's rule) when given."""
    k = _kernel_size(weight)
    ho, wo = _out_hw(x.shape, k, stride, padding)
    acc = ext.acc_dtype(x)
    c = x.shape[1]
    layout = ext.channels_last(x)
    chunk, chunks = _chunking(x.shape[0] * ho * wo, c, x.element_size(), layout)
    parts = torch.empty((3, chunks, c), device=x.device, dtype=acc)
    mean = torch.empty(c, device=x.device, dtype=acc)
    rstd = torch.empty_like(mean)
    run_mean, run_var = ext.as_acc(running_mean, acc), ext.as_acc(running_var, acc)
    stream = ext.prepare(x)
    conv_weight = _weight(weight)  # referenced until the launch returns (see _params)
    ext.extension().dwconv_bn_stats(
        dtype=ext.DTYPE_CODES[x.dtype], kernel_size=k, x=x.data_ptr(), x_strides=ext.strides(x), x_shape=x.shape,
        stride=stride, padding=padding, weight=ext.ptr(conv_weight), chunk=chunk, chunks=chunks,
        part_count=parts[0].data_ptr(), part_mean=parts[1].data_ptr(), part_m2=parts[2].data_ptr(),
        mean=mean.data_ptr(), rstd=rstd.data_ptr(), running_mean=ext.ptr(run_mean), running_var=ext.ptr(run_var),
        momentum=momentum, eps=eps, channels_last=layout, stream=stream)
    if running_mean is not None:
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
    k = _kernel_size(weight)
    n, c, h, w = x.shape
    ho, wo = _out_hw(x.shape, k, stride, padding)
    acc = ext.acc_dtype(x)
    weight_grad = weight_grad and weight is not None
    dx = torch.empty((n, c, h, w), device=x.device, dtype=x.dtype, memory_format=memory_format)
    positions = n * ho * wo
    if dx.numel() == 0 or positions == 0:
        zeros = torch.zeros(c, device=x.device, dtype=acc)
        return dx.zero_(), torch.zeros_like(weight) if weight_grad else None, zeros, zeros.clone()
    layout = ext.channels_last(dx)
    chunk, chunks = _chunking(positions, c, x.element_size(), layout)
    parts = torch.empty((2, chunks, c), device=x.device, dtype=acc)
    # separate tensors: the custom op's outputs must not share storage
    sum_du, sum_dux = torch.empty(c, device=x.device, dtype=acc), torch.empty(c, device=x.device, dtype=acc)
    # dz in x's dtype: half the bytes of an accumulation-type round trip (eager's BatchNorm
    # backward rounds it the same way)
    dz = torch.empty((n, c, ho, wo), device=x.device, dtype=x.dtype, memory_format=memory_format) if k else None
    part_dw = torch.empty((chunks, c * k * k), device=x.device, dtype=acc) if weight_grad else None
    dw = torch.empty((c, 1, k, k), device=x.device, dtype=acc) if weight_grad else None
    stream = ext.prepare(x)
    conv_weight, gamma, beta, mean, var = _params(weight, gamma, beta, mean, var, acc)
    ext.extension().dwconv_bn_act_backward(
        dtype=ext.DTYPE_CODES[x.dtype], kernel_size=k, activation=ext.ACTIVATION_CODES[activation],
        norm=ext.NORM_CODES[norm], dy=dy.data_ptr(), dy_strides=ext.strides(dy), dy_shape=dy.shape, x=x.data_ptr(),
        x_strides=ext.strides(x), x_shape=x.shape, stride=stride, padding=padding, weight=ext.ptr(conv_weight),
        gamma=ext.ptr(gamma), beta=ext.ptr(beta), mean=ext.ptr(mean), var=ext.ptr(var), eps=eps, chunk=chunk,
        chunks=chunks, part_du=parts[0].data_ptr(), part_dux=parts[1].data_ptr(), sum_du=sum_du.data_ptr(),
        sum_dux=sum_dux.data_ptr(), dz=ext.ptr(dz), dz_strides=ext.strides(dz) if k else _NO_STRIDES,
        part_dw=ext.ptr(part_dw), dw=ext.ptr(dw), dx=dx.data_ptr(), dx_strides=ext.strides(dx), channels_last=layout,
        stream=stream)
    return dx, dw.to(weight.dtype) if dw is not None else None, sum_du, sum_dux
