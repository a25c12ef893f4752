"""Triton kernels: depthwise KxK conv + BatchNorm + activation, forward and backward.

Every kernel takes the element strides of its tensors, so NCHW, channels_last and strided
slices all run without a copy. A program owns BLOCK_P output positions of one sample
(flattened over H_out * W_out) by BLOCK_C channels.

Passes (x: input, dy: output grad; "partials" are small per-program rows that the last program
of each channel block adds up in a fixed order, so every reduction is deterministic):

=====================  =====================================================================
inference              ``_forward_kernel``: conv, BN from running stats, activation. 1 launch.
training forward       ``_stats_kernel`` (conv in registers -> per-chunk mean/M2 partials;
                       the block's last program: Chan merge -> mean, rstd, running-stat
                       update), ``_forward_kernel`` (recomputes the conv, normalises). 2.
backward               ``_grad_sums_kernel`` (training only: partial sums of du, du * xhat;
                       last program: the sums), ``_grad_input_kernel`` (recomputes the conv;
                       dz, weight-grad partials, eval-mode du sums; last program: dw and the
                       eval-mode sums), ``_dx_kernel`` (transposed depthwise conv of dz; with
                       a conv only). Training 3 (bn_act 2), eval 2 (bn_act 1).
=====================  =====================================================================

The conv output z is never stored: backward recomputes it from x and the saved per-channel
mean / rstd. Only dz round-trips through memory (in x's dtype), because the transposed conv
needs dz at neighbouring positions owned by other programs.

Why the last program reduces (instead of a finalize launch per partial buffer, as before: 3
launches for training forward, 6 for the backward): each reducing launch and its host path
cost more than the reduction. Every program writes its partial row, then draws a ticket from
its channel block's counter (:func:`~mobileops.kernels._common.last_of_channel_block`: barrier,
GPU-scope acq_rel atomic, the pattern of CUDA's threadFenceReduction sample and inductor's
cooperative reductions); the program that draws the last ticket reads the block's rows with
``.cg`` loads (L2, never a stale L1), writes the results and resets the counter to 0. The
counters live in one int32 buffer per device (:func:`~mobileops.kernels._common.ticket_counters`,
zeroed once when allocated): no zero-fill launch per call, but launches that use it must not
run concurrently on two streams. The merge keeps the blocking of the launches it replaced
(statistics: MERGE_R rows x MERGE_C channels as the finalize kernel; sums: ``common.sum_rows``'
SUM_R x SUM_M blocks and column offsets) and, in deterministic mode, their num_warps (4), so
the sums come out bit-identical: checked against the previous kernels in the interpreter, and
compiled for sm_90 every reduction, the main passes' included, gets the layout it had (so the
same order on the GPU; the merges are noinline functions for that, see ``_merge_stats``). In the
interpreter only a bfloat16 dw differs: the kernel now rounds it (fp32 -> bf16, on the GPU
``cvt.rn``, as torch's cast that it replaces) and the interpreter's conversion does not round
to nearest even. Not run on a GPU with this change: the memory ordering of the ticket, and
the timings.

Launch helpers at the bottom pick block sizes: a fixed small configuration under
``TRITON_INTERPRET=1`` (no autotuning there), otherwise ``triton.autotune`` keyed on the shape
(the first call per shape benchmarks the candidates: warm up before capturing a CUDA graph;
``restore_value`` puts the running statistics back after each benchmarked run), except that
reductions use one fixed configuration when ``torch.are_deterministic_algorithms_enabled()``
so results cannot depend on which configuration won the tuning, and everything does when
``MOBILEOPS_AUTOTUNE=0``. What depends only on the call signature (shapes, strides, dtypes,
device, which optional tensors are given, the options, deterministic mode, autotuning) - block
sizes, grids, integer and constexpr arguments, chunking, scratch sizes - is computed once per
signature and cached (``_FORWARD_PLANS`` etc.); a call only looks its plan up, allocates its
outputs and one scratch buffer, and fills in tensors and float scalars.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from mobileops.codes import NORM_CODES
from mobileops.kernels import _common as common
from mobileops.kernels._common import (
    ACTIVATION_CODES,
    activation,
    activation_grad,
    aligned,
    aligned_strides,
    channel_block,
    last_of_channel_block,
    sum_rows_block,
    tile_coords,
)

# How the kernel normalises: no BN (``dwconv_act``: beta is the conv bias), BN from the given
# running mean/var, or BN from batch statistics (mean and rstd given, and the backward
# includes their dependence on x).
# (constexpr globals: the kernels compare NORM against them)
NORM_NONE = tl.constexpr(NORM_CODES["none"])
NORM_RUNNING = tl.constexpr(NORM_CODES["running"])
NORM_BATCH = tl.constexpr(NORM_CODES["batch"])

# The blocks of the in-kernel reductions, which keep the blocking of the launches they replaced
# (bit-identical sums): the statistics merge of the former finalize kernel (MERGE_R partial rows
# at a time, MERGE_C channels per step) and the column sums of common.sum_rows (SUM_R x SUM_M).
MERGE_R = tl.constexpr(16)
MERGE_C = tl.constexpr(32)
SUM_R = tl.constexpr(common.REDUCE_META["BLOCK_R"])
SUM_M = tl.constexpr(common.REDUCE_META["BLOCK_M"])


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
                    ALIGN: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    C = aligned(C, ALIGN)  # (the launcher checked ALIGN divides these; see _common.aligned)
    sxn, sxh, sxw = aligned_strides(sxn, sxh, sxw, ALIGN)
    syn, syh, syw = aligned_strides(syn, syh, syw, ALIGN)
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


# The merges run in the last program of a channel block after the main pass. They are separate
# (noinline) functions so that the compiler picks their tile layouts apart from the main pass's:
# inlined, a merge tile of the main tile's shape shares its vector width (Triton's coalescing
# looks at every access of that shape connected by any value) and one of the two reductions
# would change its order. Seen compiling for sm_90: _grad_sums_kernel's [32, 64] main tile.
@triton.jit(noinline=True)
def _merge_stats(part_mean_ptr, part_m2_ptr, mean_ptr, rstd_ptr, run_mean_ptr, run_var_ptr, first,
                 C, ROWS, chunks_per_sample, CHUNK, P, eps, momentum,
                 UPDATE_RUNNING: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """The statistics of channels first .. first + BLOCK_C - 1 from their partial rows, MERGE_C
    channels at a time as the finalize kernel this replaced took them."""
    for j in tl.static_range((BLOCK_C + MERGE_C - 1) // MERGE_C):
        c = first + j * MERGE_C + tl.arange(0, MERGE_C)
        _merge_stats_block(part_mean_ptr, part_m2_ptr, mean_ptr, rstd_ptr, run_mean_ptr, run_var_ptr, c,
                           (c < first + BLOCK_C) & (c < C), C, ROWS, chunks_per_sample, CHUNK, P, eps, momentum,
                           UPDATE_RUNNING, ACC, MERGE_R)


@triton.jit
def _merge_stats_block(part_mean_ptr, part_m2_ptr, mean_ptr, rstd_ptr, run_mean_ptr, run_var_ptr, c, cmask,
                       C, ROWS, chunks_per_sample, CHUNK, P, eps, momentum,
                       UPDATE_RUNNING: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr):
    """Merge the chunk partials of channels ``c`` in a fixed order (BLOCK_R rows at a time);
    write mean and rstd; update the running statistics the way nn.BatchNorm2d does (unbiased
    variance, ``momentum`` as the averaging factor)."""
    count = tl.zeros(c.shape, dtype=ACC)
    mean = tl.zeros(c.shape, dtype=ACC)
    m2 = tl.zeros(c.shape, dtype=ACC)
    for r0 in range(0, ROWS, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        rmask = r < ROWS
        chunk_start = (r % chunks_per_sample) * CHUNK
        r_count = tl.where(rmask, tl.minimum(P - chunk_start, CHUNK), 0).to(ACC)
        m = rmask[:, None] & cmask[None, :]
        offs = r.to(tl.int64)[:, None] * C + c[None, :]
        p_mean = tl.load(part_mean_ptr + offs, mask=m, other=0.0, cache_modifier=".cg").to(ACC)
        p_m2 = tl.load(part_m2_ptr + offs, mask=m, other=0.0, cache_modifier=".cg").to(ACC)
        b_count = tl.sum(r_count, axis=0)
        b_mean = tl.sum(r_count[:, None] * p_mean, axis=0) / b_count
        dev = tl.where(m, p_mean - b_mean[None, :], 0.0)
        b_m2 = tl.sum(p_m2 + r_count[:, None] * dev * dev, axis=0)
        total = count + b_count
        delta = b_mean - mean
        mean += delta * (b_count / total)
        m2 += b_m2 + delta * delta * (count * b_count / total)
        count = total
    tl.store(mean_ptr + c, mean, mask=cmask)
    tl.store(rstd_ptr + c, 1.0 / tl.sqrt(m2 / count + eps), mask=cmask)
    if UPDATE_RUNNING:
        old_mean = tl.load(run_mean_ptr + c, mask=cmask, other=0.0).to(ACC)
        old_var = tl.load(run_var_ptr + c, mask=cmask, other=0.0).to(ACC)
        new_mean = (1.0 - momentum) * old_mean + momentum * mean
        new_var = (1.0 - momentum) * old_var + momentum * (m2 / (count - 1.0))
        tl.store(run_mean_ptr + c, new_mean.to(run_mean_ptr.dtype.element_ty), mask=cmask)
        tl.store(run_var_ptr + c, new_var.to(run_var_ptr.dtype.element_ty), mask=cmask)


@triton.jit(noinline=True)
def _sum_block_columns(part_ptr, out_ptr, first, ROWS, M, ACC: tl.constexpr, WIDTH: tl.constexpr):
    """out[m] = sum_r part[r, m] for the columns first <= m < first + WIDTH of the (ROWS, M)
    partials, in the blocks ``common.sum_rows`` used: SUM_M columns at a time (from ``first``,
    a multiple of the channel block), SUM_R rows at a time in row order."""
    block_end = first + WIDTH
    for j in range(0, tl.cdiv(tl.minimum(block_end, M) - first, SUM_M)):
        m = first + j * SUM_M + tl.arange(0, SUM_M)
        sum_rows_block(part_ptr, out_ptr, m, (m < block_end) & (m < M), ROWS, M, ACC, SUM_R, ".cg")


@triton.jit
def _stats_kernel(x_ptr, w_ptr, part_ptr, mean_ptr, rstd_ptr, run_mean_ptr, run_var_ptr, counter_ptr,
                  C, H, W, HO, WO, chunks_per_sample, CHUNK, m2_offset,
                  sxn, sxc, sxh, sxw, eps_hi, eps_lo, mom_hi, mom_lo,
                  K: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
                  INDEX64: tl.constexpr, ACC: tl.constexpr,
                  ALIGN: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-chunk mean and M2 (sum of squared deviations) of the conv output, per channel, into
    the partial rows (M2 rows at ``part + m2_offset``); the last program of each channel block
    merges its block's rows into mean and rstd and updates the running statistics.

    Each lane (a tile position row) keeps a Welford (count, mean, M2) over the tiles, and the
    lanes are merged with Chan's formula after the loop: deviations from means throughout, so
    no sum-of-squares cancellation, and no cross-warp reduction inside the loop.
    """
    C = aligned(C, ALIGN)  # (the launcher checked ALIGN divides these; see _common.aligned)
    sxn, sxh, sxw = aligned_strides(sxn, sxh, sxw, ALIGN)
    pid = tl.program_id(0)
    n, start, c, cmask = tile_coords(pid, chunks_per_sample, C, CHUNK, BLOCK_C, INDEX64)
    end = tl.minimum(start + CHUNK, HO * WO)
    # Welford per lane (each tile position row sees one value per tile), merged across the rows
    # once after the loop: a reduction over positions spans warps (shared memory, barriers),
    # too dear to pay every tile.
    lane_count = tl.zeros([BLOCK_P], dtype=ACC)
    lane_mean = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    lane_m2 = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    for t in range(start, end, BLOCK_P):
        p = t + tl.arange(0, BLOCK_P)
        pmask = p < end
        z = _conv_tile(x_ptr + n * sxn, w_ptr, c, cmask, p // WO, p % WO, pmask, H, W,
                       sxc, sxh, sxw, K, STRIDE, PAD, ACC, BLOCK_P, BLOCK_C)
        lane_count += pmask.to(ACC)
        step = tl.where(pmask, 1.0 / tl.maximum(lane_count, 1.0), 0.0)
        delta = z - lane_mean
        lane_mean += delta * step[:, None]
        lane_m2 += delta * (z - lane_mean) * pmask.to(ACC)[:, None]
    # The lanes' summaries merged at once (the parallel form of Chan et al.'s formula): the
    # weighted mean, then M2 = sum of the lanes' M2 + n_i * (mean_i - mean)^2.
    counts = lane_count[:, None]
    mean = tl.sum(counts * lane_mean, axis=0) / tl.maximum(tl.sum(lane_count, axis=0), 1.0)
    dev = tl.where(counts > 0, lane_mean - mean[None, :], 0.0)
    m2 = tl.sum(lane_m2 + counts * dev * dev, axis=0)
    row = pid.to(tl.int64) * C
    tl.store(part_ptr + row + c, mean, mask=cmask)
    tl.store(part_ptr + m2_offset + row + c, m2, mask=cmask)
    if last_of_channel_block(counter_ptr):
        eps = tl.cast(eps_hi, ACC) + tl.cast(eps_lo, ACC)
        momentum = tl.cast(mom_hi, ACC) + tl.cast(mom_lo, ACC)
        _merge_stats(part_ptr, part_ptr + m2_offset, mean_ptr, rstd_ptr, run_mean_ptr, run_var_ptr,
                     channel_block() * BLOCK_C, C, tl.num_programs(0), chunks_per_sample, CHUNK, HO * WO, eps,
                     momentum, UPDATE_RUNNING, ACC, BLOCK_C)


@triton.jit
def _grad_sums_kernel(x_ptr, w_ptr, dy_ptr, gamma_ptr, beta_ptr, mean_ptr, rstd_ptr,
                      part_ptr, sum_du_ptr, sum_dux_ptr, counter_ptr,
                      C, H, W, HO, WO, chunks_per_sample, CHUNK, dux_offset,
                      sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw,
                      K: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, ACT: tl.constexpr,
                      HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
                      INDEX64: tl.constexpr, ACC: tl.constexpr,
                      ALIGN: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Training backward, first pass: per-chunk sums of du and du * xhat (du = dL/du, the
    gradient at the BN output), recomputing the conv; the last program of each channel block
    adds its block's partial rows into sum_du and sum_dux."""
    C = aligned(C, ALIGN)  # (the launcher checked ALIGN divides these; see _common.aligned)
    sxn, sxh, sxw = aligned_strides(sxn, sxh, sxw, ALIGN)
    sdn, sdh, sdw = aligned_strides(sdn, sdh, sdw, ALIGN)
    pid = tl.program_id(0)
    n, start, c, cmask = tile_coords(pid, chunks_per_sample, C, CHUNK, BLOCK_C, INDEX64)
    end = tl.minimum(start + CHUNK, HO * WO)
    mean, rstd, gamma, beta = _channel_params(gamma_ptr, beta_ptr, mean_ptr, rstd_ptr, c, cmask, 0.0,
                                              2, HAS_GAMMA, HAS_BETA, ACC, BLOCK_C)
    # Per-lane sums, reduced across the tile once after the loop: a reduction over positions
    # spans warps (shared memory and barriers), too dear to pay every tile.
    lane_du = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    lane_dux = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
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
        lane_du += du
        lane_dux += du * xhat
    sum_du = tl.sum(lane_du, axis=0)
    sum_dux = tl.sum(lane_dux, axis=0)
    row = pid.to(tl.int64) * C
    tl.store(part_ptr + row + c, sum_du, mask=cmask)
    tl.store(part_ptr + dux_offset + row + c, sum_dux, mask=cmask)
    if last_of_channel_block(counter_ptr):
        first = channel_block() * BLOCK_C
        _sum_block_columns(part_ptr, sum_du_ptr, first, tl.num_programs(0), C, ACC, BLOCK_C)
        _sum_block_columns(part_ptr + dux_offset, sum_dux_ptr, first, tl.num_programs(0), C, ACC, BLOCK_C)


@triton.jit
def _grad_input_kernel(x_ptr, w_ptr, dy_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr,
                       sum_du_ptr, sum_dux_ptr, dz_ptr, dw_ptr, part_ptr, counter_ptr,
                       C, H, W, HO, WO, chunks_per_sample, CHUNK, dux_offset, dw_offset,
                       inv_count_hi, inv_count_lo, eps_hi, eps_lo,
                       sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw, szn, szc, szh, szw,
                       K: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, ACT: tl.constexpr,
                       NORM: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
                       WEIGHT_GRAD: tl.constexpr, INDEX64: tl.constexpr, ACC: tl.constexpr,
                       ALIGN: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, TAPS: tl.constexpr):
    """Backward, main pass: recompute z, form dz = dL/dz, store it, and accumulate the
    weight-gradient partials sum_p dz[p] * x[p + tap] for all K*K taps at once (a
    [BLOCK_P, TAPS, BLOCK_C] gather), at ``part + dw_offset``. Outside batch-stats mode also
    the partial sums of du, du * xhat (at ``part`` and ``part + dux_offset``), which there are
    outputs (``sum_du``, ``sum_dux``); in batch-stats mode those are inputs. The last program
    of each channel block adds its block's partial rows into dw (and the du sums)."""
    C = aligned(C, ALIGN)  # (the launcher checked ALIGN divides these; see _common.aligned)
    sxn, sxh, sxw = aligned_strides(sxn, sxh, sxw, ALIGN)
    sdn, sdh, sdw = aligned_strides(sdn, sdh, sdw, ALIGN)
    szn, szh, szw = aligned_strides(szn, szh, szw, ALIGN)
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
    lane_du = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)  # per-lane sums (as in _grad_sums_kernel)
    lane_dux = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
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
            lane_du += du
            lane_dux += du * xhat
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
        tl.store(part_ptr + dw_offset + row * C * (K * K) + c[None, :] * (K * K) + tap[:, None], acc_w,
                 mask=tap_ok[:, None] & cmask[None, :])
    if NORM != NORM_BATCH:
        tl.store(part_ptr + row * C + c, tl.sum(lane_du, axis=0), mask=cmask)
        tl.store(part_ptr + dux_offset + row * C + c, tl.sum(lane_dux, axis=0), mask=cmask)
    if WEIGHT_GRAD or NORM != NORM_BATCH:
        if last_of_channel_block(counter_ptr):
            first = channel_block() * BLOCK_C
            rows = tl.num_programs(0)
            if WEIGHT_GRAD:
                _sum_block_columns(part_ptr + dw_offset, dw_ptr, first * (K * K), rows, C * (K * K), ACC,
                                   BLOCK_C * (K * K))
            if NORM != NORM_BATCH:
                _sum_block_columns(part_ptr, sum_du_ptr, first, rows, C, ACC, BLOCK_C)
                _sum_block_columns(part_ptr + dux_offset, sum_dux_ptr, first, rows, C, ACC, BLOCK_C)


@triton.jit
def _dx_kernel(dz_ptr, w_ptr, dx_ptr, C, H, W, HO, WO,
               szn, szc, szh, szw, sxn, sxc, sxh, sxw,
               K: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
               INDEX64: tl.constexpr, ACC: tl.constexpr,
               ALIGN: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx = the transposed depthwise conv of dz, over input positions (gather, no atomics); at
    stride > 1 each program takes the positions of one output phase (the grid's tiles per sample
    times stride**2)."""
    C = aligned(C, ALIGN)  # (the launcher checked ALIGN divides these; see _common.aligned)
    szn, szh, szw = aligned_strides(szn, szh, szw, ALIGN)
    sxn, sxh, sxw = aligned_strides(sxn, sxh, sxw, ALIGN)
    if STRIDE == 1:
        n, p0, c, cmask = tile_coords(tl.program_id(0), tl.cdiv(H * W, BLOCK_P), C, BLOCK_P, BLOCK_C, INDEX64)
        p = p0 + tl.arange(0, BLOCK_P)
        pmask = p < H * W
        ih = p // W
        iw = p % W
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
        w_c = w_ptr + c * (K * K)
        for kh in tl.static_range(K):
            oh = ih + PAD - kh
            row_ptr = dz_ptr + n * szn + (oh * szh)[:, None] + (c * szc)[None, :]
            row_ok = (pmask & (oh >= 0) & (oh < HO))[:, None] & cmask[None, :]
            for kw in tl.static_range(K):
                ow = iw + PAD - kw
                g = tl.load(row_ptr + (ow * szw)[:, None], mask=row_ok & ((ow >= 0) & (ow < WO))[:, None], other=0.0)
                wv = tl.load(w_c + (kh * K + kw), mask=cmask, other=0.0)
                acc += g.to(ACC) * wv.to(ACC)[None, :]
    else:
        # By output phase: the program's input positions share (ih % STRIDE, iw % STRIDE), so the
        # taps that reach an output position are the same for all of them (kh = kh0, kh0 +
        # STRIDE, ...), about K*K / STRIDE**2 of the K*K; the taps are added in the same order
        # as at stride 1, without the exact zeros of the others.
        hp = tl.cdiv(H, STRIDE)
        wp = tl.cdiv(W, STRIDE)
        tiles_per_phase = tl.cdiv(hp * wp, BLOCK_P)
        n, r0, c, cmask = tile_coords(tl.program_id(0), STRIDE * STRIDE * tiles_per_phase, C, 1, BLOCK_C, INDEX64)
        phase = r0 // tiles_per_phase
        ph = phase // STRIDE
        pw = phase % STRIDE
        q = (r0 % tiles_per_phase) * BLOCK_P + tl.arange(0, BLOCK_P)
        ih = ph + STRIDE * (q // wp)
        iw = pw + STRIDE * (q % wp)
        pmask = (q < hp * wp) & (ih < H) & (iw < W)
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
        w_c = w_ptr + c * (K * K)
        kh0 = (ph + PAD) % STRIDE
        kw0 = (pw + PAD) % STRIDE
        for kh in range(kh0, K, STRIDE):
            oh = (ih + PAD - kh) // STRIDE  # exact: ih + PAD - kh is a multiple of STRIDE
            row_ptr = dz_ptr + n * szn + (oh * szh)[:, None] + (c * szc)[None, :]
            row_ok = (pmask & (ih + PAD >= kh) & (oh < HO))[:, None] & cmask[None, :]
            for kw in range(kw0, K, STRIDE):
                ow = (iw + PAD - kw) // STRIDE
                ok = (iw + PAD >= kw) & (ow < WO)
                g = tl.load(row_ptr + (ow * szw)[:, None], mask=row_ok & ok[:, None], other=0.0)
                wv = tl.load(w_c + (kh * K + kw), mask=cmask, other=0.0)
                acc += g.to(ACC) * wv.to(ACC)[None, :]
    offs = n * sxn + (ih * sxh + iw * sxw)[:, None] + (c * sxc)[None, :]
    tl.store(dx_ptr + offs, acc.to(dx_ptr.dtype.element_ty), mask=pmask[:, None] & cmask[None, :])


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------


_TUNE_KEY = ["C", "H", "W", "HO", "WO", "sxc", "sxw", "K", "STRIDE", "ACT"]
_forward_tuned = triton.autotune(common.configs(4096), key=_TUNE_KEY + ["NORM"])(_forward_kernel)
# The statistics kernel updates the running statistics in place: the tuner puts them back after
# every benchmarked run, so only the launch that follows the tuning updates them.
_stats_tuned = triton.autotune(common.configs(4096), key=_TUNE_KEY[:-1] + ["CHUNK"],
                               restore_value=["run_mean_ptr", "run_var_ptr"])(_stats_kernel)
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


def _tile_grid(n: int, positions: int, channels: int):
    """``grid_of`` for a launch over BLOCK_P-position tiles of every sample, memoised per block sizes."""
    grids = {}

    def grid_of(meta):
        blocks = meta["BLOCK_P"], meta["BLOCK_C"]
        grid = grids.get(blocks)
        if grid is None:
            grid = grids[blocks] = common.channel_grid(n * common.cdiv(positions, blocks[0]), channels, blocks[1])
        return grid

    return grid_of


def _chunk_grid(rows: int, channels: int):
    """``grid_of`` for a launch of one program per partial row (chunk), memoised per BLOCK_C."""
    grids = {}

    def grid_of(meta):
        grid = grids.get(meta["BLOCK_C"])
        if grid is None:
            grid = grids[meta["BLOCK_C"]] = common.channel_grid(rows, channels, meta["BLOCK_C"])
        return grid

    return grid_of


def _counters_needed(channels: int, tuned, meta: dict | None) -> int:
    """Ticket counters a chunk-grid launch may index: its channel blocks (y * z of the grid) for
    the fixed BLOCK_C, or for the smallest BLOCK_C the tuner may pick."""
    block_cs = [meta["BLOCK_C"]] if meta is not None else [cfg.kwargs["BLOCK_C"] for cfg in tuned.configs]
    return max(y * z for _, y, z in (common.channel_grid(1, channels, b) for b in block_cs))


def _padded(elements: int) -> int:
    """``elements`` rounded up to a multiple of 16, the offsets of partial buffers that share one
    allocation: Triton specialises on an integer being a multiple of 16, so it knows each buffer
    starts as aligned as a separate allocation and vectorises the in-kernel sums as it did
    ``common.sum_rows`` on separate buffers."""
    return common.cdiv(elements, 16) * 16


class _ForwardPlan(NamedTuple):
    launch: common.Prepared  # takes the tensors and eps
    identity: torch.Tensor | None  # the ones weight of bn_act


class _StatsPlan(NamedTuple):
    launch: common.Prepared  # takes the tensors, eps and momentum
    identity: torch.Tensor | None
    acc_t: torch.dtype
    scratch: int  # elements of the partial (mean, M2) rows
    counters: int


class _BackwardPlan(NamedTuple):
    degenerate: bool  # no output or no input positions: the gradients are zeros, nothing to launch
    identity: torch.Tensor | None
    acc_t: torch.dtype
    dz_shape: tuple
    scratch: int  # elements of the partial rows: du, du * xhat, weight gradient
    counters: int
    weight_grad: bool
    sums: common.Prepared | None  # _grad_sums_kernel (batch statistics only), takes the tensors
    grad_input: common.Prepared | None  # _grad_input_kernel, takes the tensors and eps
    dx: common.Prepared | None  # _dx_kernel (with a conv only), takes the tensors


# The arguments each launch takes per call (Prepared's varying ones), in the order passed.
_FORWARD_PER_CALL = ("x_ptr", "w_ptr", "gamma_ptr", "beta_ptr", "mean_ptr", "var_ptr", "y_ptr", "eps_hi", "eps_lo")
_STATS_PER_CALL = ("x_ptr", "w_ptr", "part_ptr", "mean_ptr", "rstd_ptr", "run_mean_ptr", "run_var_ptr", "counter_ptr",
                  "eps_hi", "eps_lo", "mom_hi", "mom_lo")
_BACKWARD_PER_CALL = ("x_ptr", "w_ptr", "dy_ptr", "gamma_ptr", "beta_ptr", "part_ptr", "sum_du_ptr", "sum_dux_ptr",
                     "counter_ptr")
_GRAD_SUMS_PER_CALL = _BACKWARD_PER_CALL + ("mean_ptr", "rstd_ptr")
_GRAD_INPUT_PER_CALL = _BACKWARD_PER_CALL + ("mean_ptr", "var_ptr", "dz_ptr", "dw_ptr", "eps_hi", "eps_lo")

_FORWARD_PLANS: dict = {}
_STATS_PLANS: dict = {}
_BACKWARD_PLANS: dict = {}


def clear_plans() -> None:
    """Forget every cached launch plan (for tests that change the block configuration)."""
    for plans in (_FORWARD_PLANS, _STATS_PLANS, _BACKWARD_PLANS):
        plans.clear()


def _forward_plan(x, weight, y, stride, padding, activation, norm, has_gamma, has_beta) -> _ForwardPlan:
    identity = _identity_weight(x) if weight is None else None
    n, c, h, w, k, ho, wo = _common(x, identity if weight is None else weight, stride, padding)
    args = dict(C=c, H=h, W=w, HO=ho, WO=wo, **common.strides("sx", x), **common.strides("sy", y),
                K=k, STRIDE=stride, PAD=padding, ACT=ACTIVATION_CODES[activation], NORM=NORM_CODES[norm],
                HAS_GAMMA=has_gamma, HAS_BETA=has_beta, INDEX64=common.index64(x, y), ACC=common.acc_dtype(x)[0],
                ALIGN=common.alignment(c, x, y))
    return _ForwardPlan(common.Prepared(_forward_kernel, _forward_tuned, _tile_grid(n, ho * wo, c), args,
                                        common.fixed_meta(x, reduction=False, kernel_size=k), _FORWARD_PER_CALL),
                        identity)


def _stats_plan(x, weight, stride, padding, update_running) -> _StatsPlan:
    identity = _identity_weight(x) if weight is None else None
    n, c, h, w, k, ho, wo = _common(x, identity if weight is None else weight, stride, padding)
    acc, acc_t = common.acc_dtype(x)
    positions = ho * wo
    chunk = common.chunk_size(x, positions)
    per_sample = common.cdiv(positions, chunk)
    rows = n * per_sample
    m2_offset = _padded(rows * c)
    meta = common.fixed_meta(x, reduction=True, kernel_size=k)
    args = dict(C=c, H=h, W=w, HO=ho, WO=wo, chunks_per_sample=per_sample, CHUNK=chunk, m2_offset=m2_offset,
                **common.strides("sx", x), K=k, STRIDE=stride, PAD=padding, UPDATE_RUNNING=update_running,
                INDEX64=common.index64(x), ACC=acc, ALIGN=common.alignment(c, x))
    return _StatsPlan(common.Prepared(_stats_kernel, _stats_tuned, _chunk_grid(rows, c), args, meta, _STATS_PER_CALL),
                      identity, acc_t, m2_offset + rows * c, _counters_needed(c, _stats_tuned, meta))


def _backward_plan(dy, x, weight, stride, padding, activation, norm, weight_grad, fmt, has_gamma,
                   has_beta) -> _BackwardPlan:
    identity = _identity_weight(x) if weight is None else None
    weight_grad = weight_grad and identity is None
    n, c, h, w, k, ho, wo = _common(x, identity if weight is None else weight, stride, padding)
    acc, acc_t = common.acc_dtype(x)
    norm = NORM_CODES[norm]
    positions, taps = ho * wo, k * k
    dz_shape = (n, c, ho, wo)
    if x.numel() == 0 or positions == 0:
        return _BackwardPlan(True, identity, acc_t, dz_shape, 0, 0, weight_grad, None, None, None)
    # dx and dz as backward allocates them (without a conv dz is dx): only their strides matter here
    dx_like = torch.empty(x.shape, device="meta", dtype=x.dtype, memory_format=fmt)
    dz_like = dx_like if identity is not None else torch.empty(dz_shape, device="meta", dtype=x.dtype,
                                                               memory_format=fmt)
    dx_strides = common.strides("sx", dx_like)
    dz_strides = common.strides("sz", dz_like)
    chunk = common.chunk_size(x, positions)
    per_sample = common.cdiv(positions, chunk)
    rows = n * per_sample
    dux_offset = _padded(rows * c)
    dw_offset = 2 * dux_offset
    scratch = dw_offset + (rows * c * taps if weight_grad else 0)
    shape_args = dict(C=c, H=h, W=w, HO=ho, WO=wo, K=k, STRIDE=stride, PAD=padding,
                      INDEX64=common.index64(x, dy), ACC=acc, ALIGN=common.alignment(c, x, dy, dx_like, dz_like))
    chunk_args = dict(chunks_per_sample=per_sample, CHUNK=chunk, dux_offset=dux_offset,
                      **common.strides("sx", x), **common.strides("sd", dy), ACT=ACTIVATION_CODES[activation],
                      HAS_GAMMA=has_gamma, HAS_BETA=has_beta, **shape_args)
    chunk_grid = _chunk_grid(rows, c)
    counters = 0
    sums = None
    if norm == NORM_CODES["batch"]:
        sums_meta = common.fixed_meta(x, reduction=True, kernel_size=k)
        sums = common.Prepared(_grad_sums_kernel, _grad_sums_tuned, chunk_grid, chunk_args, sums_meta,
                               _GRAD_SUMS_PER_CALL)
        counters = _counters_needed(c, _grad_sums_tuned, sums_meta)
    # The weight gradient's [BLOCK_P, TAPS, BLOCK_C] gather bounds the tile; without it the
    # pass is a plain tile like the forward's.
    padded_taps = common.next_power_of_2(taps) if weight_grad else 1
    input_tuned = _grad_input_tuned(padded_taps)
    input_meta = common.fixed_meta(x, reduction=True, taps=padded_taps, kernel_size=k)
    inv_hi, inv_lo = common.split_float(1.0 / (n * positions))
    input_args = dict(chunk_args, dw_offset=dw_offset, inv_count_hi=inv_hi, inv_count_lo=inv_lo, **dz_strides,
                      NORM=norm, WEIGHT_GRAD=weight_grad, TAPS=padded_taps)
    if weight_grad or norm != NORM_CODES["batch"]:
        counters = max(counters, _counters_needed(c, input_tuned, input_meta))
    grad_input = common.Prepared(_grad_input_kernel, input_tuned, chunk_grid, input_args, input_meta,
                                 _GRAD_INPUT_PER_CALL)
    dx = None
    if identity is None:
        # at stride > 1 each of the stride**2 output phases is a sample's tiles
        dx_grid = _tile_grid(n * stride * stride, common.cdiv(h, stride) * common.cdiv(w, stride), c)
        dx = common.Prepared(_dx_kernel, _dx_tuned, dx_grid, dict(**dz_strides, **dx_strides, **shape_args),
                             common.fixed_meta(x, reduction=False, kernel_size=k), ("dz_ptr", "w_ptr", "dx_ptr"))
    return _BackwardPlan(False, identity, acc_t, dz_shape, scratch, counters, weight_grad, sums, grad_input, dx)


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
    if out.numel() == 0:
        return out
    key = (x.shape, x.stride(), x.dtype, x.device, out.stride(), None if weight is None else weight.shape[-1],
           gamma is None, beta is None, mean is None, var is None, stride, padding, activation, norm,
           common.autotune_enabled())
    plan = _FORWARD_PLANS.get(key)
    if plan is None:
        plan = common.remember(_FORWARD_PLANS, key, _forward_plan(
            x, weight, out, stride, padding, activation, norm, gamma is not None, beta is not None))
    weight = plan.identity if weight is None else weight.contiguous()
    plan.launch(x, weight, weight if gamma is None else gamma, weight if beta is None else beta,
                weight if mean is None else mean, weight if var is None else var, out, *common.split_float(eps))
    return out


def batch_stats(x: torch.Tensor, weight: torch.Tensor | None, running_mean: torch.Tensor | None,
                running_var: torch.Tensor | None, *, stride: int, padding: int, momentum: float,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and rstd = 1/sqrt(biased var + eps) of conv(x), in float32
    (float64 for float64 input). Updates ``running_mean``/``running_var`` in place when given.
    Needs at least two values per channel (the caller checks). One launch."""
    common.check_device(x)
    key = (x.shape, x.stride(), x.dtype, x.device, None if weight is None else weight.shape[-1], stride, padding,
           running_mean is None, torch.are_deterministic_algorithms_enabled(), common.autotune_enabled())
    plan = _STATS_PLANS.get(key)
    if plan is None:
        plan = common.remember(_STATS_PLANS, key, _stats_plan(x, weight, stride, padding, running_mean is not None))
    device, c = x.device, x.shape[1]
    part = torch.empty(plan.scratch, device=device, dtype=plan.acc_t)
    mean = torch.empty(c, device=device, dtype=plan.acc_t)
    rstd = torch.empty(c, device=device, dtype=plan.acc_t)
    weight = plan.identity if weight is None else weight.contiguous()
    plan.launch(x, weight, part, mean, rstd, mean if running_mean is None else running_mean,
                rstd if running_var is None else running_var, common.ticket_counters(device, plan.counters),
                *common.split_float(eps), *common.split_float(momentum))
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
    the main pass writes it there and the transposed-conv pass is skipped. Launches: the
    du sums (batch statistics only), the main pass, the transposed conv (with a conv only).
    """
    common.check_device(x)
    key = (x.shape, x.stride(), x.dtype, x.device, dy.stride(), None if weight is None else weight.shape[-1],
           gamma is None, beta is None, mean is None, var is None, stride, padding, activation, norm, weight_grad,
           memory_format, torch.are_deterministic_algorithms_enabled(), common.autotune_enabled())
    plan = _BACKWARD_PLANS.get(key)
    if plan is None:
        plan = common.remember(_BACKWARD_PLANS, key, _backward_plan(
            dy, x, weight, stride, padding, activation, norm, weight_grad, memory_format, gamma is not None,
            beta is not None))
    device, c, acc_t = x.device, x.shape[1], plan.acc_t
    dx = torch.empty(x.shape, device=device, dtype=x.dtype, memory_format=memory_format)
    weight_grad = plan.weight_grad
    if plan.degenerate:
        zeros = torch.zeros(c, device=device, dtype=acc_t)
        dw = torch.zeros_like(weight) if weight_grad else None
        return dx.zero_(), dw, zeros, zeros.clone()
    weight = plan.identity if weight is None else weight.contiguous()
    part = torch.empty(plan.scratch, device=device, dtype=acc_t)
    sum_du = torch.empty(c, device=device, dtype=acc_t)
    sum_dux = torch.empty(c, device=device, dtype=acc_t)
    counters = common.ticket_counters(device, plan.counters)
    gamma = weight if gamma is None else gamma
    beta = weight if beta is None else beta
    if plan.sums is not None:
        plan.sums(x, weight, dy, gamma, beta, part, sum_du, sum_dux, counters, mean, var)
    dz = dx if plan.identity is not None else torch.empty(plan.dz_shape, device=device, dtype=x.dtype,
                                                           memory_format=memory_format)
    dw = torch.empty(weight.shape, device=device, dtype=weight.dtype) if weight_grad else None
    plan.grad_input(x, weight, dy, gamma, beta, part, sum_du, sum_dux, counters, weight if mean is None else mean,
                    weight if var is None else var, dz, sum_du if dw is None else dw, *common.split_float(eps))
    if plan.dx is None:
        return dx, None, sum_du, sum_dux
    plan.dx(dz, weight, dx)
    return dx, dw, sum_du, sum_dux
