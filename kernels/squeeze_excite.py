"""Triton kernels: Squeeze-and-Excitation, forward and backward.

``y = post_act(x * gate(fc2(relu(fc1(mean_hw(x))))))`` with the FC weights in ``nn.Linear``
layout. Passes (all strided, so NCHW, channels_last and slices run without a copy):

=========  =====================================================================================
forward    ``_pool_mlp_kernel`` (per-chunk channel sums of x; the last program of each sample
           then runs that sample's MLP: pool, FC, ReLU, FC, gate) -> ``_scale_kernel``
           (y = post_act(x * gate)). Two launches, two passes over x.
backward   ``_pool_mlp_backward_kernel`` (per-chunk channel sums of dv * x, dv = dL/d(x * gate);
           the last program of each sample then runs the MLP backward: d gate, d hidden,
           d pooled) -> ``_weight_grad_kernel`` (both FC weight gradients and both bias
           gradients, samples added in order) -> ``_input_grad_kernel`` (dx = dv * gate +
           d pooled / HW). Three launches.
=========  =====================================================================================

The pooled means and gates (N x C, fp32) are the only saved activations besides x.

Why the MLP rides on the channel-sum launch: a separate MLP launch costs a launch (host time
and a GPU round trip) for a few microseconds of work, and SE sits on small feature maps where
launches dominate. Each program stores its partial sums, then takes a ticket from an int32
counter of its sample (``tl.atomic_add``, acq_rel, gpu scope). A sample's programs are all its
chunks times all channel blocks of the grid, so the program that draws the last ticket finds
every channel of the sample summed: it adds the partials chunk by chunk in the same order and
with the same blocks as the former separate MLP kernel did (bit-identical results in
deterministic mode, where both ran with 4 warps) and runs the MLP; the ticket put 0 back into
the counter (``common.took_last_ticket``). The counters (``common.ticket_counters``) are
therefore zero between launches and are zero-filled only when allocated (once per device,
grown when a larger batch comes; no zero-fill launch per call).
Only the order of arrival is racy, never the order of the adds, so results stay deterministic.

GPU memory ordering follows PyTorch inductor's cooperative reductions
(``triton_helpers.x_grid_barrier``): ``tl.debug_barrier()`` so every thread's partial stores
precede the ticket, the release half of the atomic publishes them, its acquire half (in the
last program) orders the reads after it, and the partials are read with ``.cg`` (L2, past the
SM's non-coherent L1). This is tested only in Triton's CPU interpreter, which runs programs one
after another: the ordering on a real GPU is unverified until a GPU run passes the tests.
The counters are fetched per call (one buffer per device and stream; see
``common.ticket_counters`` for what that makes safe and what not).

Host time: everything that depends only on the call's signature (shapes, strides, dtypes,
device, which biases exist, gate and post_act, deterministic mode, ``MOBILEOPS_AUTOTUNE``) --
grids, block sizes, integer and constexpr arguments, chunking, scratch shapes -- is computed
once into a plan, cached by a key tuple. A repeated call builds the key, allocates its outputs
and one scratch buffer and fills the tensors into the plan's arguments (the backward's partials
and MLP gradients live in that one buffer at offsets from the plan: one allocation, not five).
Scratch is allocated per call, not cached, so calls from several host threads stay safe. Plans
are a few dozen integers each, one per layer shape and batch size, kept up to
``common.PLAN_CACHE_LIMIT`` per cache (``common.remember``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mobileops.kernels import _common as common
from mobileops.kernels._common import (
    ACTIVATION_CODES,
    activation,
    activation_grad,
    aligned,
    aligned_strides,
    tile_coords,
)

# The per-sample MLP's channel block, and the weight-gradient tiles and bias-sum blocks: fixed
# (never tuned), so the MLP's and the weight gradients' reductions never change their blocking.
_MLP_BLOCK_C = 32
_OUTER_BLOCK = 32
_BIAS_BLOCK_ROWS = common.REDUCE_META["BLOCK_R"]  # the blocks of common.sum_rows, which these sums replaced
_BIAS_BLOCK_M = common.REDUCE_META["BLOCK_M"]


@triton.jit
def _store_channel_partials(x_ptr, dy_ptr, gate_ptr, part_ptr, pid, n, start, c, cmask, HW, W, CHUNK,
                            C, sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw, POST: tl.constexpr, GRAD: tl.constexpr,
                            ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's channel sums of x (forward), or of dv * x (backward, GRAD), over its chunk."""
    end = tl.minimum(start + CHUNK, HW)
    if GRAD:
        g = tl.load(gate_ptr + n * C + c, mask=cmask, other=0.0).to(ACC)
    # per-lane sums, reduced across the tile once after the loop (see dwconv_bn_act._grad_sums_kernel)
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
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
            acc += tl.where(m, dv * xv, 0.0)
        else:
            acc += xv
    tl.store(part_ptr + pid.to(tl.int64) * C + c, tl.sum(acc, axis=0), mask=cmask)


@triton.jit
def _last_of_sample(count_ptr, n, chunks_per_sample):
    """Whether this program is the last of sample ``n``'s (all its chunks and channel blocks) to
    store its partials: that one sees all of them (:func:`common.took_last_ticket`)."""
    return common.took_last_ticket(count_ptr + n, chunks_per_sample * tl.num_programs(1) * tl.num_programs(2))


@triton.jit
def _sample_channel_sums(part_ptr, n, c, cmask, C, chunks_per_sample, ACC: tl.constexpr,
                         BLOCK_C: tl.constexpr):
    """Sample ``n``'s sums over its chunks, added in chunk order. ``.cg``: other programs stored
    them during this launch, so they must come from L2, not from a stale L1 line."""
    s = tl.zeros([BLOCK_C], dtype=ACC)
    for k in range(0, chunks_per_sample):
        s += tl.load(part_ptr + (n * chunks_per_sample + k).to(tl.int64) * C + c, mask=cmask, other=0.0,
                     cache_modifier=".cg")
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
def _sample_mlp(part_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, pooled_ptr, gate_ptr, n, C, R, chunks_per_sample,
                inv_hw_hi, inv_hw_lo, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, GATE: tl.constexpr,
                ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """One sample: pooled mean, hidden = relu(fc1), gate = gate(fc2(hidden))."""
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
def _sample_mlp_backward(part_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, pooled_ptr, d_pre_gate_ptr, hidden_ptr,
                         d_pre_hidden_ptr, d_pooled_ptr, n, C, R, chunks_per_sample, inv_hw_hi, inv_hw_lo,
                         HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, GATE: tl.constexpr, ACC: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """One sample, recomputing the MLP from the saved pooled means: the gradients at the fc2
    output, at the fc1 output (after the ReLU mask) and at the pooled means (already / HW)."""
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
def _pool_mlp_kernel(x_ptr, part_ptr, count_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, pooled_ptr, gate_ptr,
                     C, R, HW, W, chunks_per_sample, CHUNK, inv_hw_hi, inv_hw_lo, sxn, sxc, sxh, sxw,
                     HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, GATE: tl.constexpr, INDEX64: tl.constexpr,
                     ACC: tl.constexpr, BLOCK_R: tl.constexpr, MLP_BLOCK_C: tl.constexpr,
                     ALIGN: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-chunk channel sums of x; each sample's last program runs the sample's MLP."""
    C = aligned(C, ALIGN)  # (the launcher checked ALIGN divides these; see _common.aligned)
    sxn, sxh, sxw = aligned_strides(sxn, sxh, sxw, ALIGN)
    pid = tl.program_id(0)
    n, start, c, cmask = tile_coords(pid, chunks_per_sample, C, CHUNK, BLOCK_C, INDEX64)
    _store_channel_partials(x_ptr, x_ptr, part_ptr, part_ptr, pid, n, start, c, cmask, HW, W, CHUNK, C,
                            sxn, sxc, sxh, sxw, sxn, sxc, sxh, sxw, 0, False, ACC, BLOCK_P, BLOCK_C)
    if _last_of_sample(count_ptr, n, chunks_per_sample):
        tl.debug_barrier()  # as inductor's grid barrier: every thread reads after the acquire
        _sample_mlp(part_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, pooled_ptr, gate_ptr, n, C, R, chunks_per_sample,
                    inv_hw_hi, inv_hw_lo, HAS_B1, HAS_B2, GATE, ACC, BLOCK_R, MLP_BLOCK_C)


@triton.jit
def _pool_mlp_backward_kernel(x_ptr, dy_ptr, gate_ptr, scratch_ptr, count_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
                              pooled_ptr, d_pre_gate_at, d_pooled_at, hidden_at, d_pre_hidden_at,
                              C, R, HW, W, chunks_per_sample, CHUNK, inv_hw_hi, inv_hw_lo,
                              sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw, POST: tl.constexpr,
                              HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, GATE: tl.constexpr,
                              INDEX64: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
                              MLP_BLOCK_C: tl.constexpr, ALIGN: tl.constexpr, BLOCK_P: tl.constexpr,
                              BLOCK_C: tl.constexpr):
    """Per-chunk channel sums of dv * x; each sample's last program runs the sample's MLP backward.
    The partials and the MLP's outputs share one scratch buffer: partials first, the others at
    the ``*_at`` offsets (see _scratch_layout)."""
    C = aligned(C, ALIGN)  # (the launcher checked ALIGN divides these; see _common.aligned)
    sxn, sxh, sxw = aligned_strides(sxn, sxh, sxw, ALIGN)
    sdn, sdh, sdw = aligned_strides(sdn, sdh, sdw, ALIGN)
    part_ptr = scratch_ptr
    pid = tl.program_id(0)
    n, start, c, cmask = tile_coords(pid, chunks_per_sample, C, CHUNK, BLOCK_C, INDEX64)
    _store_channel_partials(x_ptr, dy_ptr, gate_ptr, part_ptr, pid, n, start, c, cmask, HW, W, CHUNK, C,
                            sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw, POST, True, ACC, BLOCK_P, BLOCK_C)
    if _last_of_sample(count_ptr, n, chunks_per_sample):
        tl.debug_barrier()  # as inductor's grid barrier: every thread reads after the acquire
        _sample_mlp_backward(part_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, pooled_ptr, scratch_ptr + d_pre_gate_at,
                             scratch_ptr + hidden_at, scratch_ptr + d_pre_hidden_at, scratch_ptr + d_pooled_at, n,
                             C, R, chunks_per_sample, inv_hw_hi, inv_hw_lo, HAS_B1, HAS_B2, GATE, ACC, BLOCK_R,
                             MLP_BLOCK_C)


@triton.jit
def _outer_sum_tile(a_ptr, b_ptr, out_ptr, tile, N, M1, M2, ACC: tl.constexpr, BLOCK_1: tl.constexpr,
                    BLOCK_2: tl.constexpr):
    """Tile ``tile`` (row-major over the blocks) of out[i, j] = sum_n a[n, i] * b[n, j], samples
    added in order (a weight gradient)."""
    blocks_2 = tl.cdiv(M2, BLOCK_2)
    i = (tile // blocks_2) * BLOCK_1 + tl.arange(0, BLOCK_1)
    j = (tile % blocks_2) * BLOCK_2 + tl.arange(0, BLOCK_2)
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
def _weight_grad_kernel(scratch_ptr, pooled_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr, d_pre_gate_at, hidden_at,
                        d_pre_hidden_at, N, C, R, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, ACC: tl.constexpr,
                        BLOCK_1: tl.constexpr, BLOCK_2: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                        BLOCK_M: tl.constexpr):
    """All four parameter gradients in one launch, the programs split in consecutive ranges:
    dw2 tiles, dw1 tiles, then the db2 and db1 blocks of the biases that exist."""
    d_pre_gate_ptr = scratch_ptr + d_pre_gate_at
    hidden_ptr = scratch_ptr + hidden_at
    d_pre_hidden_ptr = scratch_ptr + d_pre_hidden_at
    pid = tl.program_id(0)
    dw2_tiles = tl.cdiv(C, BLOCK_1) * tl.cdiv(R, BLOCK_2)
    dw1_tiles = tl.cdiv(R, BLOCK_1) * tl.cdiv(C, BLOCK_2)
    db2_blocks = tl.cdiv(C, BLOCK_M) if HAS_B2 else 0
    if pid < dw2_tiles:
        _outer_sum_tile(d_pre_gate_ptr, hidden_ptr, dw2_ptr, pid, N, C, R, ACC, BLOCK_1, BLOCK_2)
    elif pid < dw2_tiles + dw1_tiles:
        _outer_sum_tile(d_pre_hidden_ptr, pooled_ptr, dw1_ptr, pid - dw2_tiles, N, R, C, ACC, BLOCK_1, BLOCK_2)
    elif pid < dw2_tiles + dw1_tiles + db2_blocks:
        m = (pid - dw2_tiles - dw1_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
        common.sum_rows_block(d_pre_gate_ptr, db2_ptr, m, m < C, N, C, ACC, BLOCK_ROWS, "")
    elif HAS_B1:
        m = (pid - dw2_tiles - dw1_tiles - db2_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
        common.sum_rows_block(d_pre_hidden_ptr, db1_ptr, m, m < R, N, R, ACC, BLOCK_ROWS, "")


@triton.jit
def _scale_kernel(x_ptr, gate_ptr, y_ptr, C, HW, W, sxn, sxc, sxh, sxw, syn, syc, syh, syw,
                  POST: tl.constexpr, INDEX64: tl.constexpr, ACC: tl.constexpr,
                  ALIGN: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    C = aligned(C, ALIGN)  # (the launcher checked ALIGN divides these; see _common.aligned)
    sxn, sxh, sxw = aligned_strides(sxn, sxh, sxw, ALIGN)
    syn, syh, syw = aligned_strides(syn, syh, syw, ALIGN)
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
def _input_grad_kernel(x_ptr, dy_ptr, gate_ptr, scratch_ptr, dx_ptr, d_pooled_at, C, HW, W,
                       sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw, son, soc, soh, sow,
                       POST: tl.constexpr, INDEX64: tl.constexpr, ACC: tl.constexpr,
                       ALIGN: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    C = aligned(C, ALIGN)  # (the launcher checked ALIGN divides these; see _common.aligned)
    sxn, sxh, sxw = aligned_strides(sxn, sxh, sxw, ALIGN)
    sdn, sdh, sdw = aligned_strides(sdn, sdh, sdw, ALIGN)
    son, soh, sow = aligned_strides(son, soh, sow, ALIGN)
    n, p0, c, cmask = tile_coords(tl.program_id(0), tl.cdiv(HW, BLOCK_P), C, BLOCK_P, BLOCK_C, INDEX64)
    p = p0 + tl.arange(0, BLOCK_P)
    m = (p < HW)[:, None] & cmask[None, :]
    h = p // W
    w = p % W
    g = tl.load(gate_ptr + n * C + c, mask=cmask, other=0.0).to(ACC)
    dp = tl.load(scratch_ptr + d_pooled_at + n * C + c, mask=cmask, other=0.0).to(ACC)
    xv = tl.load(x_ptr + n * sxn + (h * sxh + w * sxw)[:, None] + (c * sxc)[None, :], mask=m, other=0.0).to(ACC)
    dy = tl.load(dy_ptr + n * sdn + (h * sdh + w * sdw)[:, None] + (c * sdc)[None, :], mask=m, other=0.0).to(ACC)
    dx = activation_grad(xv * g[None, :], dy, POST) * g[None, :] + dp[None, :]
    tl.store(dx_ptr + n * son + (h * soh + w * sow)[:, None] + (c * soc)[None, :],
             dx.to(dx_ptr.dtype.element_ty), mask=m)


_KEY = ["C", "HW", "W", "sxc", "sxw"]
_pool_mlp_tuned = triton.autotune(common.configs(4096), key=_KEY + ["CHUNK", "R"])(_pool_mlp_kernel)
_pool_mlp_backward_tuned = triton.autotune(common.configs(4096), key=_KEY + ["CHUNK", "R", "POST"])(
    _pool_mlp_backward_kernel)
_scale_tuned = triton.autotune(common.configs(4096), key=_KEY + ["POST"])(_scale_kernel)
_input_grad_tuned = triton.autotune(common.configs(4096), key=_KEY + ["POST"])(_input_grad_kernel)

def _fixed_grid(grid_of, meta: dict | None):
    """``grid_of`` itself when autotuning picks the blocks, else a constant grid function."""
    if meta is None:
        return grid_of
    grid = grid_of(meta)
    return lambda _meta: grid


def _pool_plan(x: torch.Tensor, r: int, b1, b2, gate: str, index64: bool) -> dict:
    """The launch plumbing of a pool + MLP launch shared by the forward and the backward."""
    n, c, h, w = x.shape
    acc, acc_t = common.acc_dtype(x)
    chunk = common.chunk_size(x, h * w)
    per_sample = common.cdiv(h * w, chunk)
    inv_hi, inv_lo = common.split_float(1.0 / (h * w))
    meta = common.fixed_meta(x, reduction=True)
    return dict(
        parts_shape=(n * per_sample, c), acc_t=acc_t, meta=meta, counters=n,
        grid_of=_fixed_grid(lambda m: common.channel_grid(n * per_sample, c, m["BLOCK_C"]), meta),
        consts=dict(C=c, R=r, HW=h * w, W=w, chunks_per_sample=per_sample, CHUNK=chunk, inv_hw_hi=inv_hi,
                    inv_hw_lo=inv_lo, **common.strides("sx", x), HAS_B1=b1 is not None, HAS_B2=b2 is not None,
                    GATE=ACTIVATION_CODES[gate], INDEX64=index64, ACC=acc, BLOCK_R=common.next_power_of_2(r),
                    MLP_BLOCK_C=_MLP_BLOCK_C, ALIGN=common.alignment(c, x)))


def _elementwise_plan(x: torch.Tensor) -> tuple:
    """(meta, grid function) of the elementwise launches over x."""
    n, c, h, w = x.shape
    meta = common.fixed_meta(x, reduction=False)
    grid_of = _fixed_grid(lambda m: common.channel_grid(n * common.cdiv(h * w, m["BLOCK_P"]), c, m["BLOCK_C"]),
                          meta)
    return meta, grid_of


# The arguments the pool + MLP launches take per call (Prepared's varying ones), in the order passed.
_POOL_MLP_PER_CALL = ("x_ptr", "part_ptr", "w1_ptr", "count_ptr", "b1_ptr", "w2_ptr", "b2_ptr", "pooled_ptr",
                      "gate_ptr")
_POOL_MLP_BACKWARD_PER_CALL = ("x_ptr", "dy_ptr", "gate_ptr", "scratch_ptr", "count_ptr", "w1_ptr", "b1_ptr",
                               "w2_ptr", "b2_ptr", "pooled_ptr")

_forward_plans: dict[tuple, dict] = {}
_backward_plans: dict[tuple, dict] = {}


def _forward_plan(x, r, b1, b2, out, gate, post_act) -> dict:
    common.check_device(x)
    plan = _pool_plan(x, r, b1, b2, gate, common.index64(x))
    n, c, h, w = x.shape
    acc, _ = common.acc_dtype(x)
    plan["pool_mlp"] = common.Prepared(_pool_mlp_kernel, _pool_mlp_tuned, plan.pop("grid_of"), plan.pop("consts"),
                                       plan.pop("meta"), _POOL_MLP_PER_CALL)
    scale_meta, scale_grid_of = _elementwise_plan(x)
    plan["scale"] = common.Prepared(
        _scale_kernel, _scale_tuned, scale_grid_of,
        dict(C=c, HW=h * w, W=w, **common.strides("sx", x), **common.strides("sy", out),
             POST=ACTIVATION_CODES[post_act], INDEX64=common.index64(x, out), ACC=acc,
             ALIGN=common.alignment(c, x, out)), scale_meta, ("x_ptr", "gate_ptr", "y_ptr"))
    return plan


def forward(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
            b2: torch.Tensor | None, *, out: torch.Tensor, gate: str,
            post_act: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Write the SE output into ``out`` (any strides); returns ``(out, pooled, gate)``, the
    last two (N, C) in float32 (float64 for float64 x) for the backward."""
    key = (x.shape, x.stride(), x.dtype, x.device, out.stride(), w1.shape[0], b1 is None, b2 is None, gate,
           post_act, torch.are_deterministic_algorithms_enabled(), common.autotune_enabled())
    plan = _forward_plans.get(key)
    if plan is None:
        if x.numel() == 0:
            common.check_device(x)
            stats = x.new_zeros(x.shape[:2], dtype=common.acc_dtype(x)[1])
            return out, stats, torch.zeros_like(stats)
        plan = common.remember(_forward_plans, key, _forward_plan(x, w1.shape[0], b1, b2, out, gate, post_act))
    pooled = torch.empty(x.shape[:2], device=x.device, dtype=plan["acc_t"])
    gates = torch.empty_like(pooled)
    w1, w2 = w1.contiguous(), w2.contiguous()
    parts = torch.empty(plan["parts_shape"], device=x.device, dtype=plan["acc_t"])
    plan["pool_mlp"](x, parts, w1, common.ticket_counters(x.device, plan["counters"]), common.absent(b1, w1), w2,
                     common.absent(b2, w2), pooled, gates)
    plan["scale"](x, gates, out)
    return out, pooled, gates


def _scratch_layout(parts_shape: tuple[int, int], n: int, c: int, r: int) -> dict:
    """Element offsets of the backward's scratch regions in one buffer (one allocation per call
    instead of five): the partials, then d_pre_gate and d_pooled (N x C), then hidden and
    d_pre_hidden (N x R). Each region starts at a multiple of 16 elements, so the kernels keep
    Triton's 16-byte alignment on the offset pointers."""
    at, offsets = 0, {}
    for name, numel in (("parts", parts_shape[0] * parts_shape[1]), ("d_pre_gate_at", n * c), ("d_pooled_at", n * c),
                        ("hidden_at", n * r), ("d_pre_hidden_at", n * r), ("size", 0)):
        offsets[name] = at
        at += common.cdiv(numel, 16) * 16
    del offsets["parts"]  # always at 0: the kernel's partials pointer is the buffer itself
    return offsets


def _backward_plan(dy, x, r, b1, b2, gate, post_act, memory_format) -> dict:
    common.check_device(x)
    plan = _pool_plan(x, r, b1, b2, gate, common.index64(x, dy))
    n, c, h, w = x.shape
    acc, _ = common.acc_dtype(x)
    dx_like = torch.empty(x.shape, device="meta", dtype=x.dtype, memory_format=memory_format)
    post = ACTIVATION_CODES[post_act]
    scratch = _scratch_layout(plan.pop("parts_shape"), n, c, r)
    plan["scratch_size"] = scratch.pop("size")
    plan["consts"].update(**common.strides("sd", dy), POST=post, **scratch, ALIGN=common.alignment(c, x, dy))
    plan["pool_mlp"] = common.Prepared(_pool_mlp_backward_kernel, _pool_mlp_backward_tuned, plan.pop("grid_of"),
                                       plan.pop("consts"), plan.pop("meta"), _POOL_MLP_BACKWARD_PER_CALL)
    tiles = 2 * common.cdiv(c, _OUTER_BLOCK) * common.cdiv(r, _OUTER_BLOCK)  # dw2's and dw1's, each C x R
    bias_blocks = (common.cdiv(c, _BIAS_BLOCK_M) if b2 is not None else 0) + (
        common.cdiv(r, _BIAS_BLOCK_M) if b1 is not None else 0)
    weight_grid = (tiles + bias_blocks,)
    plan["weight_grad"] = common.Prepared(
        _weight_grad_kernel, None, lambda _meta: weight_grid,
        dict(d_pre_gate_at=scratch["d_pre_gate_at"], hidden_at=scratch["hidden_at"],
             d_pre_hidden_at=scratch["d_pre_hidden_at"], N=n, C=c, R=r, HAS_B1=b1 is not None, HAS_B2=b2 is not None,
             ACC=acc),
        dict(BLOCK_1=_OUTER_BLOCK, BLOCK_2=_OUTER_BLOCK, BLOCK_ROWS=_BIAS_BLOCK_ROWS, BLOCK_M=_BIAS_BLOCK_M),
        ("scratch_ptr", "pooled_ptr", "dw1_ptr", "db1_ptr", "dw2_ptr", "db2_ptr"))
    input_meta, input_grid_of = _elementwise_plan(x)
    plan["input_grad"] = common.Prepared(
        _input_grad_kernel, _input_grad_tuned, input_grid_of,
        dict(d_pooled_at=scratch["d_pooled_at"], C=c, HW=h * w, W=w, **common.strides("sx", x),
             **common.strides("sd", dy), **common.strides("so", dx_like), POST=post,
             INDEX64=common.index64(x, dy, dx_like), ACC=acc, ALIGN=common.alignment(c, x, dy, dx_like)),
        input_meta, ("x_ptr", "dy_ptr", "gate_ptr", "scratch_ptr", "dx_ptr"))
    return plan


def backward(dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
             b2: torch.Tensor | None, pooled: torch.Tensor, gates: torch.Tensor, *, gate: str, post_act: str,
             memory_format: torch.memory_format):
    """Gradients of :func:`forward`: ``(dx, dw1, db1 or None, dw2, db2 or None)``, the weight
    gradients in the weights' dtypes."""
    key = (x.shape, x.stride(), x.dtype, x.device, dy.stride(), w1.shape[0], b1 is None, b2 is None, gate,
           post_act, memory_format, torch.are_deterministic_algorithms_enabled(), common.autotune_enabled())
    plan = _backward_plans.get(key)
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype, memory_format=memory_format)
    if plan is None:
        if x.numel() == 0:
            common.check_device(x)
            return (dx, *(torch.zeros_like(t) if t is not None else None for t in (w1, b1, w2, b2)))
        plan = common.remember(_backward_plans, key, _backward_plan(dy, x, w1.shape[0], b1, b2, gate, post_act,
                                                                    memory_format))
    c = x.shape[1]
    r = w1.shape[0]
    w1, w2 = w1.contiguous(), w2.contiguous()
    scratch = torch.empty(plan["scratch_size"], device=x.device, dtype=plan["acc_t"])
    plan["pool_mlp"](x, dy, gates, scratch, common.ticket_counters(x.device, plan["counters"]), w1,
                     common.absent(b1, w1), w2, common.absent(b2, w2), pooled)
    dw1 = torch.empty((r, c), device=x.device, dtype=w1.dtype)
    dw2 = torch.empty((c, r), device=x.device, dtype=w2.dtype)
    db1 = torch.empty(r, device=x.device, dtype=b1.dtype) if b1 is not None else None
    db2 = torch.empty(c, device=x.device, dtype=b2.dtype) if b2 is not None else None
    plan["weight_grad"](scratch, pooled, dw1, common.absent(db1, dw1), dw2, common.absent(db2, dw2))
    plan["input_grad"](x, dy, gates, scratch, dx)
    return dx, dw1, db1, dw2, db2
