"""Triton kernels: Squeeze-and-Excitation, forward and backward.

``y = post_act(x * gate(fc2(relu(fc1(mean_hw(x))))))`` with the FC weights in ``nn.Linear``
layout. Passes (all strided, so NCHW, channels_last and slices run without a copy):

=========  =====================================================================================
forward    ``_channel_sum_kernel`` (per-chunk sums of x) -> ``_mlp_kernel`` (one program per sample:
           pool, FC, ReLU, FC, gate) -> ``_scale_kernel`` (y = post_act(x * gate)).
           Two passes over x plus one small launch.
backward   ``_channel_sum_kernel`` (per-chunk sums of dv * x, dv = dL/d(x * gate)) ->
           ``_mlp_backward_kernel`` (one program per sample: d gate, d hidden, d pooled) ->
           ``_outer_sum_kernel`` (FC weight gradients, samples added in order) ->
           ``_input_grad_kernel`` (dx = dv * gate + d pooled / HW).
=========  =====================================================================================

The pooled means and gates (N x C, fp32) are the only saved activations besides x. No
atomics: every reduction adds per-program or per-sample partials in a fixed order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mobileops.kernels import _common as common
from mobileops.kernels._common import ACTIVATION_CODES, activation, activation_grad, channel_block, tile_coords

_MLP_BLOCK_C = 32


@triton.jit
def _channel_sum_kernel(x_ptr, dy_ptr, gate_ptr, part_ptr, C, HW, W, chunks_per_sample, CHUNK,
                        sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw,
                        POST: tl.constexpr, GRAD: tl.constexpr, INDEX64: tl.constexpr, ACC: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-chunk channel sums of x (forward), or of dv * x (backward, GRAD)."""
    pid = tl.program_id(0)
    n, start, c, cmask = tile_coords(pid, chunks_per_sample, C, CHUNK, BLOCK_C, INDEX64)
    end = tl.minimum(start + CHUNK, HW)
    if GRAD:
        g = tl.load(gate_ptr + n * C + c, mask=cmask, other=0.0).to(ACC)
    acc = tl.zeros([BLOCK_C], dtype=ACC)
    for t in range(start, end, BLOCK_P):
        p = t + tl.arange(0, BLOCK_P)
        m = (p < end)[:, None] & cmask[None, :]
        h = p // W
        w = p % W
        xv = tl.load(x_ptr + n * sxn + (h * sxh + w * sxw)[:, None] + (c * sxc)[None, :], mask=m,
                     other=0.0).to(ACC)
        if GRAD:
            dy = tl.load(dy_ptr + n * sdn + (h * sdh + w * sdw)[:, None] + (c * sdc)[None, :], mask=m,
                         other=0.0).to(ACC)
            dv = activation_grad(xv * g[None, :], dy, POST)
            acc += tl.sum(tl.where(m, dv * xv, 0.0), axis=0)
        else:
            acc += tl.sum(xv, axis=0)
    tl.store(part_ptr + pid.to(tl.int64) * C + c, acc, mask=cmask)


@triton.jit
def _sample_channel_sums(part_ptr, n, c, cmask, C, chunks_per_sample, ACC: tl.constexpr,
                         BLOCK_C: tl.constexpr):
    s = tl.zeros([BLOCK_C], dtype=ACC)
    for k in range(0, chunks_per_sample):
        s += tl.load(part_ptr + (n * chunks_per_sample + k).to(tl.int64) * C + c, mask=cmask, other=0.0)
    return s


@triton.jit
def _hidden(pooled_ptr, w1_ptr, b1_ptr, n, r, rmask, C, HAS_B1: tl.constexpr, ACC: tl.constexpr,
            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """fc1(pooled) for one sample (before the ReLU)."""
    h = tl.zeros([BLOCK_R], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < C
        pooled = tl.load(pooled_ptr + n * C + c, mask=cmask, other=0.0)
        w1 = tl.load(w1_ptr + r[:, None] * C + c[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        h += tl.sum(w1.to(ACC) * pooled[None, :], axis=1)
    if HAS_B1:
        h += tl.load(b1_ptr + r, mask=rmask, other=0.0).to(ACC)
    return h


@triton.jit
def _mlp_kernel(part_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, pooled_ptr, gate_ptr, C, R, chunks_per_sample,
                inv_hw_hi, inv_hw_lo, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, GATE: tl.constexpr,
                ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """One sample: pooled mean, hidden = relu(fc1), gate = gate(fc2(hidden))."""
    n = tl.program_id(0)
    inv_hw = tl.cast(inv_hw_hi, ACC) + tl.cast(inv_hw_lo, ACC)
    r = tl.arange(0, BLOCK_R)
    rmask = r < R
    # fc1 from the pooled values in registers: reading back the pooled_ptr just stored would
    # race, since other threads of the program stored them and nothing orders global memory
    # between threads (an H100 run once gave a stale gate on a first call). Same adds, in the same
    # order, as _hidden, which the backward uses on the stored values.
    h = tl.zeros([BLOCK_R], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < C
        pooled = _sample_channel_sums(part_ptr, n, c, cmask, C, chunks_per_sample, ACC, BLOCK_C) * inv_hw
        tl.store(pooled_ptr + n * C + c, pooled, mask=cmask)
        w1 = tl.load(w1_ptr + r[:, None] * C + c[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        h += tl.sum(w1.to(ACC) * pooled[None, :], axis=1)
    if HAS_B1:
        h += tl.load(b1_ptr + r, mask=rmask, other=0.0).to(ACC)
    h = tl.maximum(h, 0.0, propagate_nan=tl.PropagateNan.ALL)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < C
        w2 = tl.load(w2_ptr + c[:, None] * R + r[None, :], mask=cmask[:, None] & rmask[None, :], other=0.0)
        a = tl.sum(w2.to(ACC) * h[None, :], axis=1)
        if HAS_B2:
            a += tl.load(b2_ptr + c, mask=cmask, other=0.0).to(ACC)
        tl.store(gate_ptr + n * C + c, activation(a, GATE), mask=cmask)


@triton.jit
def _mlp_backward_kernel(part_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, pooled_ptr, d_pre_gate_ptr, hidden_ptr,
                         d_pre_hidden_ptr, d_pooled_ptr, C, R, chunks_per_sample, inv_hw_hi, inv_hw_lo,
                         HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, GATE: tl.constexpr, ACC: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """One sample, recomputing the MLP from the saved pooled means: the gradients at the fc2
    output, at the fc1 output (after the ReLU mask) and at the pooled means (already / HW)."""
    n = tl.program_id(0)
    inv_hw = tl.cast(inv_hw_hi, ACC) + tl.cast(inv_hw_lo, ACC)
    r = tl.arange(0, BLOCK_R)
    rmask = r < R
    h_pre = _hidden(pooled_ptr, w1_ptr, b1_ptr, n, r, rmask, C, HAS_B1, ACC, BLOCK_R, BLOCK_C)
    h = tl.maximum(h_pre, 0.0, propagate_nan=tl.PropagateNan.ALL)
    dh = tl.zeros([BLOCK_R], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < C
        w2 = tl.load(w2_ptr + c[:, None] * R + r[None, :], mask=cmask[:, None] & rmask[None, :], other=0.0).to(ACC)
        a = tl.sum(w2 * h[None, :], axis=1)
        if HAS_B2:
            a += tl.load(b2_ptr + c, mask=cmask, other=0.0).to(ACC)
        d_gate = _sample_channel_sums(part_ptr, n, c, cmask, C, chunks_per_sample, ACC, BLOCK_C)
        da = tl.where(cmask, activation_grad(a, d_gate, GATE), 0.0)
        tl.store(d_pre_gate_ptr + n * C + c, da, mask=cmask)
        dh += tl.sum(w2 * da[:, None], axis=0)
    d_pre_hidden = tl.where(h_pre > 0.0, dh, 0.0)
    tl.store(hidden_ptr + n * R + r, h, mask=rmask)
    tl.store(d_pre_hidden_ptr + n * R + r, d_pre_hidden, mask=rmask)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < C
        w1 = tl.load(w1_ptr + r[:, None] * C + c[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        dp = tl.sum(w1.to(ACC) * d_pre_hidden[:, None], axis=0) * inv_hw
        tl.store(d_pooled_ptr + n * C + c, dp, mask=cmask)


@triton.jit
def _outer_sum_kernel(a_ptr, b_ptr, out_ptr, N, M1, M2, ACC: tl.constexpr, BLOCK_1: tl.constexpr,
                      BLOCK_2: tl.constexpr):
    """out[i, j] = sum_n a[n, i] * b[n, j], samples added in order (a weight gradient)."""
    i = tl.program_id(0) * BLOCK_1 + tl.arange(0, BLOCK_1)
    j = channel_block() * BLOCK_2 + tl.arange(0, BLOCK_2)
    imask = i < M1
    jmask = j < M2
    acc = tl.zeros([BLOCK_1, BLOCK_2], dtype=ACC)
    for n in range(0, N):
        a = tl.load(a_ptr + n * M1 + i, mask=imask, other=0.0).to(ACC)
        b = tl.load(b_ptr + n * M2 + j, mask=jmask, other=0.0).to(ACC)
        acc += a[:, None] * b[None, :]
    tl.store(out_ptr + i[:, None] * M2 + j[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=imask[:, None] & jmask[None, :])


@triton.jit
def _scale_kernel(x_ptr, gate_ptr, y_ptr, C, HW, W, sxn, sxc, sxh, sxw, syn, syc, syh, syw,
                  POST: tl.constexpr, INDEX64: tl.constexpr, ACC: tl.constexpr,
                  BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    n, p0, c, cmask = tile_coords(tl.program_id(0), tl.cdiv(HW, BLOCK_P), C, BLOCK_P, BLOCK_C, INDEX64)
    p = p0 + tl.arange(0, BLOCK_P)
    m = (p < HW)[:, None] & cmask[None, :]
    h = p // W
    w = p % W
    g = tl.load(gate_ptr + n * C + c, mask=cmask, other=0.0).to(ACC)
    xv = tl.load(x_ptr + n * sxn + (h * sxh + w * sxw)[:, None] + (c * sxc)[None, :], mask=m, other=0.0)
    y = activation(xv.to(ACC) * g[None, :], POST)
    tl.store(y_ptr + n * syn + (h * syh + w * syw)[:, None] + (c * syc)[None, :],
             y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _input_grad_kernel(x_ptr, dy_ptr, gate_ptr, d_pooled_ptr, dx_ptr, C, HW, W,
                       sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw, son, soc, soh, sow,
                       POST: tl.constexpr, INDEX64: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    n, p0, c, cmask = tile_coords(tl.program_id(0), tl.cdiv(HW, BLOCK_P), C, BLOCK_P, BLOCK_C, INDEX64)
    p = p0 + tl.arange(0, BLOCK_P)
    m = (p < HW)[:, None] & cmask[None, :]
    h = p // W
    w = p % W
    g = tl.load(gate_ptr + n * C + c, mask=cmask, other=0.0).to(ACC)
    dp = tl.load(d_pooled_ptr + n * C + c, mask=cmask, other=0.0).to(ACC)
    xv = tl.load(x_ptr + n * sxn + (h * sxh + w * sxw)[:, None] + (c * sxc)[None, :], mask=m, other=0.0).to(ACC)
    dy = tl.load(dy_ptr + n * sdn + (h * sdh + w * sdw)[:, None] + (c * sdc)[None, :], mask=m, other=0.0).to(ACC)
    dx = activation_grad(xv * g[None, :], dy, POST) * g[None, :] + dp[None, :]
    tl.store(dx_ptr + n * son + (h * soh + w * sow)[:, None] + (c * soc)[None, :],
             dx.to(dx_ptr.dtype.element_ty), mask=m)


_KEY = ["C", "HW", "W", "sxc", "sxw", "POST"]
_channel_sum_tuned = triton.autotune(common.configs(4096), key=_KEY + ["GRAD", "CHUNK"])(_channel_sum_kernel)
_scale_tuned = triton.autotune(common.configs(4096), key=_KEY)(_scale_kernel)
_input_grad_tuned = triton.autotune(common.configs(4096), key=_KEY)(_input_grad_kernel)


def _channel_sums(x, dy, gate, post_act):
    """(partials [N * chunks, C], chunks per sample) of x, or of dv * x when ``dy`` is given."""
    n, c, h, w = x.shape
    acc, acc_t = common.acc_dtype(x)
    chunk = common.chunk_size(x, h * w)
    per_sample = common.cdiv(h * w, chunk)
    parts = torch.empty((n * per_sample, c), device=x.device, dtype=acc_t)
    grad = dy is not None
    args = dict(x_ptr=x, dy_ptr=dy if grad else x, gate_ptr=gate if grad else parts, part_ptr=parts,
                C=c, HW=h * w, W=w, chunks_per_sample=per_sample, CHUNK=chunk, **common.strides("sx", x),
                **common.strides("sd", dy if grad else x), POST=ACTIVATION_CODES[post_act], GRAD=grad,
                INDEX64=common.index64(x, *([dy] if grad else [])), ACC=acc)
    common.launch(_channel_sum_kernel, _channel_sum_tuned,
                  lambda m: common.channel_grid(n * per_sample, c, m["BLOCK_C"]), args,
                  common.fixed_meta(x, reduction=True))
    return parts, per_sample


def _mlp_meta(r: int) -> dict:
    return dict(BLOCK_R=common.next_power_of_2(r), BLOCK_C=_MLP_BLOCK_C)


def _elementwise_grid(x):
    n, c, h, w = x.shape
    return lambda m: common.channel_grid(n * common.cdiv(h * w, m["BLOCK_P"]), c, m["BLOCK_C"])


def forward(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
            b2: torch.Tensor | None, *, out: torch.Tensor, gate: str,
            post_act: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Write the SE output into ``out`` (any strides); returns ``(out, pooled, gate)``, the
    last two (N, C) in float32 (float64 for float64 x) for the backward."""
    common.check_device(x)
    n, c, h, w = x.shape
    r = w1.shape[0]
    acc, acc_t = common.acc_dtype(x)
    pooled = torch.empty((n, c), device=x.device, dtype=acc_t)
    gates = torch.empty_like(pooled)
    if x.numel() == 0:
        return out, pooled.zero_(), gates.zero_()
    w1, w2 = w1.contiguous(), w2.contiguous()
    parts, per_sample = _channel_sums(x, None, None, post_act)
    inv_hi, inv_lo = common.split_float(1.0 / (h * w))
    args = dict(part_ptr=parts, w1_ptr=w1, b1_ptr=common.absent(b1, w1), w2_ptr=w2, b2_ptr=common.absent(b2, w2),
                pooled_ptr=pooled, gate_ptr=gates, C=c, R=r, chunks_per_sample=per_sample, inv_hw_hi=inv_hi,
                inv_hw_lo=inv_lo, HAS_B1=b1 is not None, HAS_B2=b2 is not None, GATE=ACTIVATION_CODES[gate], ACC=acc)
    common.launch(_mlp_kernel, None, lambda m: (n,), args, _mlp_meta(r))
    args = dict(x_ptr=x, gate_ptr=gates, y_ptr=out, C=c, HW=h * w, W=w, **common.strides("sx", x),
                **common.strides("sy", out), POST=ACTIVATION_CODES[post_act], INDEX64=common.index64(x, out), ACC=acc)
    common.launch(_scale_kernel, _scale_tuned, _elementwise_grid(x), args, common.fixed_meta(x, reduction=False))
    return out, pooled, gates


def backward(dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
             b2: torch.Tensor | None, pooled: torch.Tensor, gates: torch.Tensor, *, gate: str, post_act: str,
             memory_format: torch.memory_format):
    """Gradients of :func:`forward`: ``(dx, dw1, db1 or None, dw2, db2 or None)``, the weight
    gradients in the weights' dtypes."""
    common.check_device(x)
    n, c, h, w = x.shape
    r = w1.shape[0]
    acc, acc_t = common.acc_dtype(x)
    dx = torch.empty((n, c, h, w), device=x.device, dtype=x.dtype, memory_format=memory_format)
    if x.numel() == 0:
        zeros = [torch.zeros_like(t) if t is not None else None for t in (w1, b1, w2, b2)]
        return (dx, *zeros)
    w1, w2 = w1.contiguous(), w2.contiguous()
    parts, per_sample = _channel_sums(x, dy, gates, post_act)
    d_pre_gate = torch.empty((n, c), device=x.device, dtype=acc_t)
    d_pooled = torch.empty_like(d_pre_gate)
    hidden = torch.empty((n, r), device=x.device, dtype=acc_t)
    d_pre_hidden = torch.empty_like(hidden)
    inv_hi, inv_lo = common.split_float(1.0 / (h * w))
    args = dict(part_ptr=parts, w1_ptr=w1, b1_ptr=common.absent(b1, w1), w2_ptr=w2, b2_ptr=common.absent(b2, w2),
                pooled_ptr=pooled, d_pre_gate_ptr=d_pre_gate, hidden_ptr=hidden, d_pre_hidden_ptr=d_pre_hidden,
                d_pooled_ptr=d_pooled, C=c, R=r, chunks_per_sample=per_sample, inv_hw_hi=inv_hi, inv_hw_lo=inv_lo,
                HAS_B1=b1 is not None, HAS_B2=b2 is not None, GATE=ACTIVATION_CODES[gate], ACC=acc)
    common.launch(_mlp_backward_kernel, None, lambda m: (n,), args, _mlp_meta(r))
    dw2 = _outer_sum(d_pre_gate, hidden, w2.dtype)
    dw1 = _outer_sum(d_pre_hidden, pooled, w1.dtype)
    db2 = common.sum_rows(d_pre_gate, b2.dtype) if b2 is not None else None
    db1 = common.sum_rows(d_pre_hidden, b1.dtype) if b1 is not None else None
    args = dict(x_ptr=x, dy_ptr=dy, gate_ptr=gates, d_pooled_ptr=d_pooled, dx_ptr=dx, C=c, HW=h * w, W=w,
                **common.strides("sx", x), **common.strides("sd", dy), **common.strides("so", dx),
                POST=ACTIVATION_CODES[post_act], INDEX64=common.index64(x, dy, dx), ACC=acc)
    common.launch(_input_grad_kernel, _input_grad_tuned, _elementwise_grid(x), args,
                  common.fixed_meta(x, reduction=False))
    return dx, dw1, db1, dw2, db2


def _outer_sum(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    n, m1 = a.shape
    m2 = b.shape[1]
    out = torch.empty((m1, m2), device=a.device, dtype=out_dtype)
    acc = tl.float64 if a.dtype == torch.float64 else tl.float32
    args = dict(a_ptr=a, b_ptr=b, out_ptr=out, N=n, M1=m1, M2=m2, ACC=acc)
    common.launch(_outer_sum_kernel, None,
                  lambda m: common.channel_grid(common.cdiv(m1, m["BLOCK_1"]), m2, m["BLOCK_2"]), args,
                  dict(BLOCK_1=32, BLOCK_2=32))
    return out
