"""Triton kernels: depthwise KxK conv + BatchNorm + activation, forward and backward.

Every kernel takes the element strides of its tensors, so NCHW, channels_last and strided
slices all run without a copy. A program owns BLOCK_P output positions of one sample
(flattened over H_out * W_out) by BLOCK_C channels.

Passes (x: input, dy: output grad; "partials" are small per-program buffers reduced in a fixed
order afterwards, so every reduction is deterministic and nothing uses atomics):

=====================  =====================================================================
inference              ``_forward_kernel``: conv, BN from running stats, activation. 1 launch.
training forward       ``_stats_kernel`` (conv in registers -> per-chunk mean/M2 partials),
                       ``_stats_finalize_kernel`` (Chan merge -> mean, rstd; running-stat
                       update), ``_forward_kernel`` (recomputes the conv, normalises).
backward               ``_grad_sums_kernel`` (training only: partial sums of du, du * xhat),
                       ``_grad_input_kernel`` (recomputes the conv; dz, weight-grad partials,
                       eval-mode du sums), ``_dx_kernel`` (transposed depthwise conv of dz),
                       ``sum_rows_kernel`` (in _common) for each partial buffer.
=====================  =====================================================================

The conv output z is never stored: backward recomputes it from x and the saved per-channel
mean / rstd. Only dz round-trips through memory (in x's dtype), because the transposed conv
needs dz at neighbouring positions owned by other programs.

Launch helpers at the bottom allocate scratch with torch and pick block sizes: a fixed small
configuration under ``TRITON_INTERPRET=1`` (no autotuning there), otherwise ``triton.autotune``
keyed on the shape (the first call per shape benchmarks the candidates: warm up before
capturing a CUDA graph), except that reductions use one fixed configuration when
``torch.are_deterministic_algorithms_enabled()`` so results cannot depend on which
configuration won the tuning, and everything does when ``MOBILEOPS_AUTOTUNE=0``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from mobileops.codes import NORM_CODES
from mobileops.kernels import _common as common
from mobileops.kernels._common import ACTIVATION_CODES, activation, activation_grad, tile_coords

# How the kernel normalises: no BN (``dwconv_act``: beta is the conv bias), BN from the given
# running mean/var, or BN from batch statistics (mean and rstd given, and the backward
# includes their dependence on x).
# (constexpr globals: the kernels compare NORM against them)
NORM_NONE = tl.constexpr(NORM_CODES["none"])
NORM_RUNNING = tl.constexpr(NORM_CODES["running"])
NORM_BATCH = tl.constexpr(NORM_CODES["batch"])


@triton.jit
def _conv_tile(x_base, w_ptr, c, cmask, oh, ow, pmask, H, W, sxc, sxh, sxw,
               K: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, ACC: tl.constexpr,
               BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """The depthwise conv at output positions (oh, ow) x channels c, accumulated in ACC."""
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    row0 = oh * STRIDE - PAD
    col0 = ow * STRIDE - PAD
    w_c = w_ptr + c * (K * K)
    for kh in tl.static_range(K):
        ih = row0 + kh
        row_ptr = x_base + (ih * sxh)[:, None] + (c * sxc)[None, :]
        row_ok = (pmask & (ih >= 0) & (ih < H))[:, None] & cmask[None, :]
        for kw in tl.static_range(K):
            iw = col0 + kw
            xv = tl.load(row_ptr + (iw * sxw)[:, None], mask=row_ok & ((iw >= 0) & (iw < W))[:, None], other=0.0)
            wv = tl.load(w_c + (kh * K + kw), mask=cmask, other=0.0)
            acc += xv.to(ACC) * wv.to(ACC)[None, :]
    return acc


@triton.jit
def _channel_params(gamma_ptr, beta_ptr, mean_ptr, var_ptr, c, cmask, eps,
                    NORM: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
                    ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-channel (mean, rstd, gamma, beta) so that u = (z - mean) * rstd * gamma + beta."""
    if NORM == NORM_NONE:
        mean = tl.zeros([BLOCK_C], dtype=ACC)
        rstd = tl.full([BLOCK_C], 1.0, dtype=ACC)
    elif NORM == NORM_RUNNING:
        mean = tl.load(mean_ptr + c, mask=cmask, other=0.0).to(ACC)
        var = tl.load(var_ptr + c, mask=cmask, other=1.0).to(ACC)
        rstd = 1.0 / tl.sqrt(var + eps)
    else:
        mean = tl.load(mean_ptr + c, mask=cmask, other=0.0).to(ACC)
        rstd = tl.load(var_ptr + c, mask=cmask, other=1.0).to(ACC)
    if HAS_GAMMA:
        gamma = tl.load(gamma_ptr + c, mask=cmask, other=1.0).to(ACC)
    else:
        gamma = tl.full([BLOCK_C], 1.0, dtype=ACC)
    if HAS_BETA:
        beta = tl.load(beta_ptr + c, mask=cmask, other=0.0).to(ACC)
    else:
        beta = tl.zeros([BLOCK_C], dtype=ACC)
    return mean, rstd, gamma, beta


@triton.jit
def _forward_kernel(x_ptr, w_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, y_ptr,
                    C, H, W, HO, WO,
                    sxn, sxc, sxh, sxw, syn, syc, syh, syw, eps_hi, eps_lo,
                    K: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, ACT: tl.constexpr,
                    NORM: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
                    INDEX64: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    n, p0, c, cmask = tile_coords(tl.program_id(0), tl.cdiv(HO * WO, BLOCK_P), C, BLOCK_P, BLOCK_C, INDEX64)
    p = p0 + tl.arange(0, BLOCK_P)
    pmask = p < HO * WO
    oh = p // WO
    ow = p % WO
    eps = tl.cast(eps_hi, ACC) + tl.cast(eps_lo, ACC)
    mean, rstd, gamma, beta = _channel_params(gamma_ptr, beta_ptr, mean_ptr, var_ptr, c, cmask, eps,
                                              NORM, HAS_GAMMA, HAS_BETA, ACC, BLOCK_C)
    z = _conv_tile(x_ptr + n * sxn, w_ptr, c, cmask, oh, ow, pmask, H, W, sxc, sxh, sxw,
                   K, STRIDE, PAD, ACC, BLOCK_P, BLOCK_C)
    u = (z - mean[None, :]) * rstd[None, :] * gamma[None, :] + beta[None, :]
    y = activation(u, ACT)
    offs = n * syn + (oh * syh + ow * syw)[:, None] + (c * syc)[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=pmask[:, None] & cmask[None, :])


@triton.jit
def _stats_kernel(x_ptr, w_ptr, part_mean_ptr, part_m2_ptr,
                  C, H, W, HO, WO, chunks_per_sample, CHUNK,
                  sxn, sxc, sxh, sxw,
                  K: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
                  INDEX64: tl.constexpr, ACC: tl.constexpr,
                  BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-chunk mean and M2 (sum of squared deviations) of the conv output, per channel.

    Each tile's values are centred on the tile mean while still in registers and merged into
    the running (count, mean, M2) with Chan's formula, so no sum-of-squares cancellation.
    """
    pid = tl.program_id(0)
    n, start, c, cmask = tile_coords(pid, chunks_per_sample, C, CHUNK, BLOCK_C, INDEX64)
    end = tl.minimum(start + CHUNK, HO * WO)
    count = tl.zeros([BLOCK_C], dtype=ACC)
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    for t in range(start, end, BLOCK_P):
        p = t + tl.arange(0, BLOCK_P)
        pmask = p < end
        z = _conv_tile(x_ptr + n * sxn, w_ptr, c, cmask, p // WO, p % WO, pmask, H, W,
                       sxc, sxh, sxw, K, STRIDE, PAD, ACC, BLOCK_P, BLOCK_C)
        t_count = tl.minimum(end - t, BLOCK_P).to(ACC)
        t_mean = tl.sum(z, axis=0) / t_count  # masked positions hold exact zeros
        d = tl.where(pmask[:, None], z - t_mean[None, :], 0.0)
        t_m2 = tl.sum(d * d, axis=0)
        total = count + t_count
        delta = t_mean - mean
        mean += delta * (t_count / total)
        m2 += t_m2 + delta * delta * (count * t_count / total)
        count = total
    row = pid.to(tl.int64) * C
    tl.store(part_mean_ptr + row + c, mean, mask=cmask)
    tl.store(part_m2_ptr + row + c, m2, mask=cmask)


@triton.jit
def _stats_finalize_kernel(part_mean_ptr, part_m2_ptr, mean_ptr, rstd_ptr, run_mean_ptr, run_var_ptr,
                           C, ROWS, chunks_per_sample, CHUNK, P, eps_hi, eps_lo, mom_hi, mom_lo,
                           UPDATE_RUNNING: tl.constexpr, ACC: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merge the chunk partials in a fixed order; write mean and rstd; update running stats
    the way nn.BatchNorm2d does (unbiased variance, ``momentum`` as the averaging factor)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    count = tl.zeros([BLOCK_C], dtype=ACC)
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    for r0 in range(0, ROWS, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        rmask = r < ROWS
        chunk_start = (r % chunks_per_sample) * CHUNK
        r_count = tl.where(rmask, tl.minimum(P - chunk_start, CHUNK), 0).to(ACC)
        m = rmask[:, None] & cmask[None, :]
        offs = r.to(tl.int64)[:, None] * C + c[None, :]
        p_mean = tl.load(part_mean_ptr + offs, mask=m, other=0.0).to(ACC)
        p_m2 = tl.load(part_m2_ptr + offs, mask=m, other=0.0).to(ACC)
        b_count = tl.sum(r_count, axis=0)
        b_mean = tl.sum(r_count[:, None] * p_mean, axis=0) / b_count
        dev = tl.where(m, p_mean - b_mean[None, :], 0.0)
        b_m2 = tl.sum(p_m2 + r_count[:, None] * dev * dev, axis=0)
        total = count + b_count
        delta = b_mean - mean
        mean += delta * (b_count / total)
        m2 += b_m2 + delta * delta * (count * b_count / total)
        count = total
    eps = tl.cast(eps_hi, ACC) + tl.cast(eps_lo, ACC)
    tl.store(mean_ptr + c, mean, mask=cmask)
    tl.store(rstd_ptr + c, 1.0 / tl.sqrt(m2 / count + eps), mask=cmask)
    if UPDATE_RUNNING:
        momentum = tl.cast(mom_hi, ACC) + tl.cast(mom_lo, ACC)
        old_mean = tl.load(run_mean_ptr + c, mask=cmask, other=0.0).to(ACC)
        old_var = tl.load(run_var_ptr + c, mask=cmask, other=0.0).to(ACC)
        new_mean = (1.0 - momentum) * old_mean + momentum * mean
        new_var = (1.0 - momentum) * old_var + momentum * (m2 / (count - 1.0))
        tl.store(run_mean_ptr + c, new_mean.to(run_mean_ptr.dtype.element_ty), mask=cmask)
        tl.store(run_var_ptr + c, new_var.to(run_var_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _grad_sums_kernel(x_ptr, w_ptr, dy_ptr, gamma_ptr, beta_ptr, mean_ptr, rstd_ptr,
                      part_du_ptr, part_dux_ptr,
                      C, H, W, HO, WO, chunks_per_sample, CHUNK,
                      sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw,
                      K: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, ACT: tl.constexpr,
                      HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
                      INDEX64: tl.constexpr, ACC: tl.constexpr,
                      BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Training backward, first pass: per-chunk sums of du and du * xhat (du = dL/du, the
    gradient at the BN output), recomputing the conv."""
    pid = tl.program_id(0)
    n, start, c, cmask = tile_coords(pid, chunks_per_sample, C, CHUNK, BLOCK_C, INDEX64)
    end = tl.minimum(start + CHUNK, HO * WO)
    mean, rstd, gamma, beta = _channel_params(gamma_ptr, beta_ptr, mean_ptr, rstd_ptr, c, cmask, 0.0,
                                              2, HAS_GAMMA, HAS_BETA, ACC, BLOCK_C)
    sum_du = tl.zeros([BLOCK_C], dtype=ACC)
    sum_dux = tl.zeros([BLOCK_C], dtype=ACC)
    for t in range(start, end, BLOCK_P):
        p = t + tl.arange(0, BLOCK_P)
        pmask = p < end
        oh = p // WO
        ow = p % WO
        z = _conv_tile(x_ptr + n * sxn, w_ptr, c, cmask, oh, ow, pmask, H, W, sxc, sxh, sxw,
                       K, STRIDE, PAD, ACC, BLOCK_P, BLOCK_C)
        xhat = (z - mean[None, :]) * rstd[None, :]
        m = pmask[:, None] & cmask[None, :]
        g = tl.load(dy_ptr + n * sdn + (oh * sdh + ow * sdw)[:, None] + (c * sdc)[None, :],
                    mask=m, other=0.0).to(ACC)
        du = tl.where(m, activation_grad(xhat * gamma[None, :] + beta[None, :], g, ACT), 0.0)
        sum_du += tl.sum(du, axis=0)
        sum_dux += tl.sum(du * xhat, axis=0)
    row = pid.to(tl.int64) * C
    tl.store(part_du_ptr + row + c, sum_du, mask=cmask)
    tl.store(part_dux_ptr + row + c, sum_dux, mask=cmask)


@triton.jit
def _grad_input_kernel(x_ptr, w_ptr, dy_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr,
                       sum_du_ptr, sum_dux_ptr, dz_ptr, part_dw_ptr, part_du_ptr, part_dux_ptr,
                       C, H, W, HO, WO, chunks_per_sample, CHUNK, inv_count_hi, inv_count_lo, eps_hi, eps_lo,
                       sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw, szn, szc, szh, szw,
                       K: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, ACT: tl.constexpr,
                       NORM: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
                       WEIGHT_GRAD: tl.constexpr, INDEX64: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, TAPS: tl.constexpr):
    """Backward, main pass: recompute z, form dz = dL/dz, store it, and accumulate the
    weight-gradient partials sum_p dz[p] * x[p + tap] for all K*K taps at once (a
    [BLOCK_P, TAPS, BLOCK_C] gather). Outside batch-stats mode also the sums of du, du * xhat."""
    pid = tl.program_id(0)
    n, start, c, cmask = tile_coords(pid, chunks_per_sample, C, CHUNK, BLOCK_C, INDEX64)
    end = tl.minimum(start + CHUNK, HO * WO)
    eps = tl.cast(eps_hi, ACC) + tl.cast(eps_lo, ACC)
    mean, rstd, gamma, beta = _channel_params(gamma_ptr, beta_ptr, mean_ptr, var_ptr, c, cmask, eps,
                                              NORM, HAS_GAMMA, HAS_BETA, ACC, BLOCK_C)
    if NORM == NORM_BATCH:
        inv_count = tl.cast(inv_count_hi, ACC) + tl.cast(inv_count_lo, ACC)
        mean_du = tl.load(sum_du_ptr + c, mask=cmask, other=0.0).to(ACC) * inv_count
        mean_dux = tl.load(sum_dux_ptr + c, mask=cmask, other=0.0).to(ACC) * inv_count
    sum_du = tl.zeros([BLOCK_C], dtype=ACC)
    sum_dux = tl.zeros([BLOCK_C], dtype=ACC)
    tap = tl.arange(0, TAPS)
    tap_ok = tap < K * K
    tap_h = tap // K - PAD
    tap_w = tap % K - PAD
    acc_w = tl.zeros([TAPS, BLOCK_C], dtype=ACC)
    x_base = x_ptr + n * sxn
    for t in range(start, end, BLOCK_P):
        p = t + tl.arange(0, BLOCK_P)
        pmask = p < end
        oh = p // WO
        ow = p % WO
        z = _conv_tile(x_base, w_ptr, c, cmask, oh, ow, pmask, H, W, sxc, sxh, sxw,
                       K, STRIDE, PAD, ACC, BLOCK_P, BLOCK_C)
        xhat = (z - mean[None, :]) * rstd[None, :]
        m = pmask[:, None] & cmask[None, :]
        g = tl.load(dy_ptr + n * sdn + (oh * sdh + ow * sdw)[:, None] + (c * sdc)[None, :],
                    mask=m, other=0.0).to(ACC)
        du = tl.where(m, activation_grad(xhat * gamma[None, :] + beta[None, :], g, ACT), 0.0)
        if NORM == NORM_BATCH:
            dz = (du - mean_du[None, :] - xhat * mean_dux[None, :]) * (gamma * rstd)[None, :]
            dz = tl.where(m, dz, 0.0)
        else:
            sum_du += tl.sum(du, axis=0)
            sum_dux += tl.sum(du * xhat, axis=0)
            dz = du * (gamma * rstd)[None, :]
        tl.store(dz_ptr + n * szn + (oh * szh + ow * szw)[:, None] + (c * szc)[None, :],
                 dz.to(dz_ptr.dtype.element_ty), mask=m)
        if WEIGHT_GRAD:
            ih = (oh * STRIDE)[:, None] + tap_h[None, :]
            iw = (ow * STRIDE)[:, None] + tap_w[None, :]
            ok = pmask[:, None] & tap_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            xv = tl.load(x_base + (ih * sxh + iw * sxw)[:, :, None] + (c * sxc)[None, None, :],
                         mask=ok[:, :, None] & cmask[None, None, :], other=0.0).to(ACC)
            acc_w += tl.sum(xv * dz[:, None, :], axis=0)
    row = pid.to(tl.int64)
    if WEIGHT_GRAD:
        tl.store(part_dw_ptr + row * C * (K * K) + c[None, :] * (K * K) + tap[:, None], acc_w,
                 mask=tap_ok[:, None] & cmask[None, :])
    if NORM != NORM_BATCH:
        tl.store(part_du_ptr + row * C + c, sum_du, mask=cmask)
        tl.store(part_dux_ptr + row * C + c, sum_dux, mask=cmask)


@triton.jit
def _dx_kernel(dz_ptr, w_ptr, dx_ptr, C, H, W, HO, WO,
               szn, szc, szh, szw, sxn, sxc, sxh, sxw,
               K: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
               INDEX64: tl.constexpr, ACC: tl.constexpr,
               BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx = the transposed depthwise conv of dz, over input positions (gather, no atomics)."""
    n, p0, c, cmask = tile_coords(tl.program_id(0), tl.cdiv(H * W, BLOCK_P), C, BLOCK_P, BLOCK_C, INDEX64)
    p = p0 + tl.arange(0, BLOCK_P)
    pmask = p < H * W
    ih = p // W
    iw = p % W
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    row0 = ih + PAD
    col0 = iw + PAD
    w_c = w_ptr + c * (K * K)
    for kh in tl.static_range(K):
        th = row0 - kh
        oh = th // STRIDE
        h_ok = pmask & (th >= 0) & (oh < HO)
        if STRIDE > 1:
            h_ok = h_ok & (th % STRIDE == 0)
        row_ptr = dz_ptr + n * szn + (oh * szh)[:, None] + (c * szc)[None, :]
        row_ok = h_ok[:, None] & cmask[None, :]
        for kw in tl.static_range(K):
            tw = col0 - kw
            ow = tw // STRIDE
            ok = (tw >= 0) & (ow < WO)
            if STRIDE > 1:
                ok = ok & (tw % STRIDE == 0)
            g = tl.load(row_ptr + (ow * szw)[:, None], mask=row_ok & ok[:, None], other=0.0)
            wv = tl.load(w_c + (kh * K + kw), mask=cmask, other=0.0)
            acc += g.to(ACC) * wv.to(ACC)[None, :]
    offs = n * sxn + (ih * sxh + iw * sxw)[:, None] + (c * sxc)[None, :]
    tl.store(dx_ptr + offs, acc.to(dx_ptr.dtype.element_ty), mask=pmask[:, None] & cmask[None, :])


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------

_FINALIZE_META = dict(BLOCK_R=16, BLOCK_C=32)


_TUNE_KEY = ["C", "H", "W", "HO", "WO", "sxc", "sxw", "K", "STRIDE", "ACT"]
_forward_tuned = triton.autotune(common.configs(4096), key=_TUNE_KEY + ["NORM"])(_forward_kernel)
_stats_tuned = triton.autotune(common.configs(4096), key=_TUNE_KEY[:-1] + ["CHUNK"])(_stats_kernel)
_grad_sums_tuned = triton.autotune(common.configs(4096), key=_TUNE_KEY + ["CHUNK"])(_grad_sums_kernel)
_dx_tuned = triton.autotune(common.configs(4096),
                            key=["C", "H", "W", "HO", "WO", "szc", "sxc", "K", "STRIDE"])(_dx_kernel)


@functools.cache
def _grad_input_tuned(taps: int):
    # The weight-gradient gather holds a [BLOCK_P, TAPS, BLOCK_C] tile: keep it small.
    return triton.autotune(common.configs(max(128, 8192 // taps)),
                           key=_TUNE_KEY + ["NORM", "CHUNK"])(_grad_input_kernel)


_IDENTITY_WEIGHTS: dict = {}


def _identity_weight(x: torch.Tensor) -> torch.Tensor:
    """A cached (C, 1, 1, 1) ones kernel: with it the kernels compute BatchNorm + activation
    alone (``bn_act``); multiplying by 1 is exact, so results equal an unfused BN."""
    key = (x.device, x.dtype, x.shape[1])
    if key not in _IDENTITY_WEIGHTS:
        _IDENTITY_WEIGHTS[key] = torch.ones(x.shape[1], 1, 1, 1, device=x.device, dtype=x.dtype)
    return _IDENTITY_WEIGHTS[key]


def _common(x, weight, stride, padding):
    n, c, h, w = x.shape
    k = weight.shape[-1]
    return n, c, h, w, k, (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1


# ----------------------------------------------------------------------------------------------
# Launch helpers (arguments are validated by mobileops.ops before they get here)
# ----------------------------------------------------------------------------------------------


def forward(x: torch.Tensor, weight: torch.Tensor | None, gamma: torch.Tensor | None,
            beta: torch.Tensor | None, mean: torch.Tensor | None, var: torch.Tensor | None,
            *, out: torch.Tensor, stride: int, padding: int, activation: str, norm: str,
            eps: float) -> torch.Tensor:
    """Write y = act((conv(x) - mean) * rstd * gamma + beta) into ``out`` (N, C, H_out, W_out),
    any strides, and return it.

    ``norm``: ``"none"`` (mean 0, rstd 1: ``beta`` is the conv bias), ``"running"`` (rstd from
    ``var`` and ``eps``) or ``"batch"`` (``var`` already holds rstd, from :func:`batch_stats`).
    ``weight=None`` means no convolution (BatchNorm + activation; stride 1, padding 0); the
    other launch helpers accept it too.
    """
    common.check_device(x)
    weight = _identity_weight(x) if weight is None else weight
    n, c, h, w, k, ho, wo = _common(x, weight, stride, padding)
    y = out
    if y.numel() == 0:
        return y
    acc, _ = common.acc_dtype(x)
    weight = weight.contiguous()
    eps_hi, eps_lo = common.split_float(eps)
    args = dict(x_ptr=x, w_ptr=weight, gamma_ptr=common.absent(gamma, weight), beta_ptr=common.absent(beta, weight),
                mean_ptr=common.absent(mean, weight), var_ptr=common.absent(var, weight), y_ptr=y,
                C=c, H=h, W=w, HO=ho, WO=wo, **common.strides("sx", x), **common.strides("sy", y),
                eps_hi=eps_hi, eps_lo=eps_lo, K=k, STRIDE=stride, PAD=padding,
                ACT=ACTIVATION_CODES[activation], NORM=NORM_CODES[norm], HAS_GAMMA=gamma is not None,
                HAS_BETA=beta is not None, INDEX64=common.index64(x, y), ACC=acc)
    common.launch(_forward_kernel, _forward_tuned,
                  lambda m: common.channel_grid(n * common.cdiv(ho * wo, m["BLOCK_P"]), c, m["BLOCK_C"]),
                  args, common.fixed_meta(x, reduction=False))
    return y


def batch_stats(x: torch.Tensor, weight: torch.Tensor | None, running_mean: torch.Tensor | None,
                running_var: torch.Tensor | None, *, stride: int, padding: int, momentum: float,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and rstd = 1/sqrt(biased var + eps) of conv(x), in float32
    (float64 for float64 input). Updates ``running_mean``/``running_var`` in place when given.
    Needs at least two values per channel (the caller checks)."""
    common.check_device(x)
    weight = _identity_weight(x) if weight is None else weight
    n, c, h, w, k, ho, wo = _common(x, weight, stride, padding)
    acc, acc_t = common.acc_dtype(x)
    positions = ho * wo
    chunk = common.chunk_size(x, positions)
    per_sample = common.cdiv(positions, chunk)
    rows = n * per_sample
    part_mean = torch.empty((rows, c), device=x.device, dtype=acc_t)
    part_m2 = torch.empty_like(part_mean)
    mean = torch.empty(c, device=x.device, dtype=acc_t)
    rstd = torch.empty_like(mean)
    weight = weight.contiguous()
    args = dict(x_ptr=x, w_ptr=weight, part_mean_ptr=part_mean, part_m2_ptr=part_m2,
                C=c, H=h, W=w, HO=ho, WO=wo, chunks_per_sample=per_sample, CHUNK=chunk,
                **common.strides("sx", x), K=k, STRIDE=stride, PAD=padding,
                INDEX64=common.index64(x), ACC=acc)
    common.launch(_stats_kernel, _stats_tuned, lambda m: common.channel_grid(rows, c, m["BLOCK_C"]),
                  args, common.fixed_meta(x, reduction=True))
    eps_hi, eps_lo = common.split_float(eps)
    mom_hi, mom_lo = common.split_float(momentum)
    update = running_mean is not None
    args = dict(part_mean_ptr=part_mean, part_m2_ptr=part_m2, mean_ptr=mean, rstd_ptr=rstd,
                run_mean_ptr=common.absent(running_mean, mean), run_var_ptr=common.absent(running_var, rstd),
                C=c, ROWS=rows, chunks_per_sample=per_sample, CHUNK=chunk, P=positions,
                eps_hi=eps_hi, eps_lo=eps_lo, mom_hi=mom_hi, mom_lo=mom_lo, UPDATE_RUNNING=update, ACC=acc)
    common.launch(_stats_finalize_kernel, None, lambda m: (common.cdiv(c, m["BLOCK_C"]),), args, _FINALIZE_META)
    return mean, rstd


def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, gamma: torch.Tensor | None,
             beta: torch.Tensor | None, mean: torch.Tensor | None, var: torch.Tensor | None,
             *, stride: int, padding: int, activation: str, norm: str, eps: float,
             weight_grad: bool, memory_format: torch.memory_format):
    """Gradients of :func:`forward` (for ``norm="batch"``: of the whole batch-statistics
    BatchNorm, through the mean and variance too).

    Returns ``(dx, dweight or None, sum_du, sum_du_xhat)``: dx in ``memory_format``; the last
    two, per channel in the accumulation dtype, are the BN bias and weight gradients (the
    conv-bias gradient for ``norm="none"``). Without a conv (``weight=None``) dL/dz is dx:
    the main pass writes it there and the transposed-conv pass is skipped.
    """
    common.check_device(x)
    identity = weight is None
    if identity:
        weight, weight_grad = _identity_weight(x), False
    n, c, h, w, k, ho, wo = _common(x, weight, stride, padding)
    acc, acc_t = common.acc_dtype(x)
    fmt = memory_format
    norm = NORM_CODES[norm]
    dx = torch.empty((n, c, h, w), device=x.device, dtype=x.dtype, memory_format=fmt)
    positions, taps = ho * wo, k * k
    if dx.numel() == 0 or positions == 0:
        zeros = torch.zeros(c, device=x.device, dtype=acc_t)
        dw = torch.zeros_like(weight) if weight_grad else None
        return dx.zero_(), dw, zeros, zeros.clone()
    weight = weight.contiguous()
    chunk = common.chunk_size(x, positions)
    per_sample = common.cdiv(positions, chunk)
    rows = n * per_sample
    index64 = common.index64(x, dy)
    shape_args = dict(C=c, H=h, W=w, HO=ho, WO=wo, K=k, STRIDE=stride, PAD=padding, INDEX64=index64, ACC=acc)
    param_args = dict(gamma_ptr=common.absent(gamma, weight), beta_ptr=common.absent(beta, weight),
                      HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None)
    chunk_grid = lambda m: common.channel_grid(rows, c, m["BLOCK_C"])
    sums = None
    if norm == NORM_CODES["batch"]:
        part_du = torch.empty((rows, c), device=x.device, dtype=acc_t)
        part_dux = torch.empty_like(part_du)
        args = dict(x_ptr=x, w_ptr=weight, dy_ptr=dy, mean_ptr=mean, rstd_ptr=var,
                    part_du_ptr=part_du, part_dux_ptr=part_dux, chunks_per_sample=per_sample, CHUNK=chunk,
                    **common.strides("sx", x), **common.strides("sd", dy), ACT=ACTIVATION_CODES[activation],
                    **shape_args, **param_args)
        common.launch(_grad_sums_kernel, _grad_sums_tuned, chunk_grid, args, common.fixed_meta(x, reduction=True))
        sums = (common.sum_rows(part_du, acc_t), common.sum_rows(part_dux, acc_t))
    else:
        part_du = torch.empty((rows, c), device=x.device, dtype=acc_t)
        part_dux = torch.empty_like(part_du)
    dz = dx if identity else torch.empty((n, c, ho, wo), device=x.device, dtype=x.dtype, memory_format=fmt)
    part_dw = torch.empty((rows, c * taps) if weight_grad else (1,), device=x.device, dtype=acc_t)
    eps_hi, eps_lo = common.split_float(eps)
    inv_hi, inv_lo = common.split_float(1.0 / (n * positions))
    stand_in = sums[0] if sums is not None else part_du
    padded_taps = common.next_power_of_2(taps)
    args = dict(x_ptr=x, w_ptr=weight, dy_ptr=dy, mean_ptr=common.absent(mean, weight),
                var_ptr=common.absent(var, weight),
                sum_du_ptr=stand_in, sum_dux_ptr=sums[1] if sums is not None else part_dux,
                dz_ptr=dz, part_dw_ptr=part_dw, part_du_ptr=part_du, part_dux_ptr=part_dux,
                chunks_per_sample=per_sample, CHUNK=chunk, inv_count_hi=inv_hi, inv_count_lo=inv_lo,
                eps_hi=eps_hi, eps_lo=eps_lo, **common.strides("sx", x), **common.strides("sd", dy),
                **common.strides("sz", dz),
                ACT=ACTIVATION_CODES[activation], NORM=norm, WEIGHT_GRAD=weight_grad, TAPS=padded_taps,
                **shape_args, **param_args)
    common.launch(_grad_input_kernel, _grad_input_tuned(padded_taps), chunk_grid, args,
                  common.fixed_meta(x, reduction=True, taps=padded_taps))
    if sums is None:
        sums = (common.sum_rows(part_du, acc_t), common.sum_rows(part_dux, acc_t))
    dw = common.sum_rows(part_dw, acc_t).view(c, 1, k, k).to(weight.dtype) if weight_grad else None
    if identity:
        return dx, None, sums[0], sums[1]
    args = dict(dz_ptr=dz, w_ptr=weight, dx_ptr=dx, **common.strides("sz", dz), **common.strides("sx", dx),
                **shape_args)
    common.launch(_dx_kernel, _dx_tuned,
                  lambda m: common.channel_grid(n * common.cdiv(h * w, m["BLOCK_P"]), c, m["BLOCK_C"]),
                  args, common.fixed_meta(x, reduction=False))
    return dx, dw, sums[0], sums[1]
