"""Plumbing shared by the Triton kernels: activations, tile coordinates, the deterministic
row-sum reduction, block-size configuration and launching (autotuned, or one fixed
configuration under the interpreter, in deterministic mode and with ``MOBILEOPS_AUTOTUNE=0``).
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch
import triton
import triton.language as tl

from mobileops import backend
from mobileops.codes import ACTIVATION_CODES as ACTIVATION_CODES  # re-exported for the launchers
from mobileops.kernels import _launch

# The codes as constexpr globals, the only kind of global a @triton.jit function may read.
RELU = tl.constexpr(ACTIVATION_CODES["relu"])
RELU6 = tl.constexpr(ACTIVATION_CODES["relu6"])
HSWISH = tl.constexpr(ACTIVATION_CODES["hswish"])
SILU = tl.constexpr(ACTIVATION_CODES["silu"])
HSIGMOID = tl.constexpr(ACTIVATION_CODES["hsigmoid"])
SIGMOID = tl.constexpr(ACTIVATION_CODES["sigmoid"])


@triton.jit
def activation(u, ACT: tl.constexpr):
    if ACT == RELU:
        u = tl.maximum(u, 0.0, propagate_nan=tl.PropagateNan.ALL)
    elif ACT == RELU6:
        u = tl.clamp(u, 0.0, 6.0, propagate_nan=tl.PropagateNan.ALL)
    elif ACT == HSWISH:
        u = u * (tl.clamp(u + 3.0, 0.0, 6.0, propagate_nan=tl.PropagateNan.ALL) / 6.0)
    elif ACT == SILU:
        u = u / (1.0 + tl.exp(-u))
    elif ACT == HSIGMOID:
        u = tl.clamp(u + 3.0, 0.0, 6.0, propagate_nan=tl.PropagateNan.ALL) / 6.0
    elif ACT == SIGMOID:
        u = 1.0 / (1.0 + tl.exp(-u))
    return u


@triton.jit
def activation_grad(u, g, ACT: tl.constexpr):
    """``g * act'(u)`` with PyTorch's conventions at the kinks (derivative 0 there)."""
    if ACT == RELU:
        g = tl.where(u > 0.0, g, 0.0)
    elif ACT == RELU6:
        g = tl.where((u > 0.0) & (u < 6.0), g, 0.0)
    elif ACT == HSWISH:
        g = g * (tl.clamp(u + 3.0, 0.0, 6.0) / 6.0) + tl.where((u > -3.0) & (u < 3.0), g * u / 6.0, 0.0)
    elif ACT == SILU:
        s = 1.0 / (1.0 + tl.exp(-u))
        g = g * s * (1.0 + u * (1.0 - s))
    elif ACT == HSIGMOID:
        g = tl.where((u > -3.0) & (u < 3.0), g / 6.0, 0.0)
    elif ACT == SIGMOID:
        s = 1.0 / (1.0 + tl.exp(-u))
        g = g * (1.0 - s) * s
    return g



@triton.jit
def channel_block():
    """This program's channel block in a :func:`channel_grid` launch (grid y, continued on z)."""
    return tl.program_id(1) + tl.program_id(2) * tl.num_programs(1)


@triton.jit
def tile_coords(pid, tiles_per_sample, C, BLOCK, BLOCK_C: tl.constexpr, INDEX64: tl.constexpr):
    """(sample, first position of this program's tile/chunk, channel offsets, channel mask)."""
    n = pid // tiles_per_sample
    tile = pid % tiles_per_sample
    c = channel_block() * BLOCK_C + tl.arange(0, BLOCK_C)
    if INDEX64:
        n = n.to(tl.int64)
        tile = tile.to(tl.int64)
        c = c.to(tl.int64)
    return n, tile * BLOCK, c, c < C



@triton.jit
def aligned(v, ALIGN: tl.constexpr):
    """``v``, which the launcher checked is a multiple of ALIGN, in a form whose divisibility
    Triton's alignment analysis sees (``v // ALIGN * ALIGN`` is ``v`` itself). Triton marks an
    integer argument divisible only by 16, so a channels_last tensor with 72 or 120 channels
    (multiples of 8, not 16) got scalar 2-byte accesses: its position strides and channel mask
    (``c < C``) were not known to step in whole 16-byte vectors."""
    if ALIGN > 1:
        v = v // ALIGN * ALIGN
    return v


@triton.jit
def aligned_strides(sn, sh, sw, ALIGN: tl.constexpr):
    """:func:`aligned` of a tensor's position strides (sample, row, column)."""
    return aligned(sn, ALIGN), aligned(sh, ALIGN), aligned(sw, ALIGN)


@triton.jit
def sum_rows_block(in_ptr, out_ptr, m, mmask, ROWS, M, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
                   CACHE: tl.constexpr):
    """out[m] = sum_r in[r, m] for the columns ``m`` (where ``mmask``) of the row-major
    (ROWS, M) ``in``: BLOCK_R rows at a time, in row order, so every caller that passes the
    same blocks adds in the same order. ``CACHE`` is the loads' cache modifier (``".cg"`` when
    other programs of the same launch wrote ``in``)."""
    acc = tl.zeros(m.shape, dtype=ACC)
    for r0 in range(0, ROWS, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        v = tl.load(in_ptr + r.to(tl.int64)[:, None] * M + m[None, :],
                    mask=(r < ROWS)[:, None] & mmask[None, :], other=0.0, cache_modifier=CACHE)
        acc += tl.sum(v.to(ACC), axis=0)
    tl.store(out_ptr + m, acc.to(out_ptr.dtype.element_ty), mask=mmask)


@triton.jit
def sum_rows_kernel(in_ptr, out_ptr, ROWS, M, ACC: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr):
    """out[m] = sum_r in[r, m], rows added in a fixed order (deterministic)."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    sum_rows_block(in_ptr, out_ptr, m, m < M, ROWS, M, ACC, BLOCK_R, "")


@triton.jit
def took_last_ticket(counter, programs):
    """Whether this program is the last of ``programs`` sharing the int32 ``counter`` to get
    here; each of them must call it exactly once.

    Each program draws a ticket; the one that draws the last returns True, and has already put
    the counter back to 0 for the next launch (so the buffer from :func:`ticket_counters` never
    needs zeroing). Memory ordering as in CUDA's threadFenceReduction sample and inductor's grid
    barrier: the barrier makes every thread's earlier stores happen before the ticket, which one
    thread takes with a GPU-scope acq_rel atomic (release: this program's stores are visible
    before its ticket; acquire: the last program sees every other program's stores), and Triton
    hands the ticket to the other threads through shared memory behind another barrier. The
    last program must read the other programs' data with ``cache_modifier=".cg"`` (L2, not a
    possibly stale L1)."""
    tl.debug_barrier()
    last = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == programs - 1
    if last:
        tl.store(counter, 0)
    return last


@triton.jit
def last_of_channel_block(counter_ptr):
    """Whether this program is the last of its channel block (the programs along grid x with
    this :func:`channel_block`) to get here (:func:`took_last_ticket`, one counter per block)."""
    return took_last_ticket(counter_ptr + channel_block(), tl.num_programs(0))



def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Kernels compiled for the GPU cannot run on CPU tensors: jit decides at decoration time.
COMPILED_FOR_INTERPRETER = interpreter_on()

# Under the interpreter: small blocks so tests cover several channel blocks, several tiles per
# chunk and several chunks per sample even on tiny shapes.
INTERPRETER_META = dict(BLOCK_P=64, BLOCK_C=16)
INTERPRETER_CHUNK = 64

REDUCE_META = dict(BLOCK_R=32, BLOCK_M=64)

def configs(tile_limit: int):
    """Candidate (BLOCK_P, BLOCK_C, num_warps) covering NCHW (long runs of positions, few
    channels) and channels_last (many channels). Each shape is shrunk (positions first) until
    BLOCK_P * BLOCK_C is at most ``tile_limit``, so a small limit still gets candidates: an
    empty list would make triton.autotune launch with no block sizes at all."""
    shapes = []
    for block_p, block_c in ((256, 4), (128, 8), (256, 8), (64, 16), (32, 32), (16, 64), (32, 64),
                             (8, 128), (64, 64), (16, 128)):
        while block_p * block_c > tile_limit:
            if block_p > 4 and block_p >= block_c // 4:
                block_p //= 2
            else:
                block_c //= 2
        if (block_p, block_c) not in shapes:
            shapes.append((block_p, block_c))
    return [triton.Config(dict(BLOCK_P=block_p, BLOCK_C=block_c), num_warps=warps)
            for block_p, block_c in shapes for warps in ((4, 8) if block_p * block_c >= 2048 else (2, 4))]


# Host-side integer helpers. triton.cdiv and triton.next_power_of_2 are constexpr functions
# whose call from Python costs about 6 us each (triton 3.9, measured here), several per launch.
def cdiv(a: int, b: int) -> int:
    """Ceiling of ``a / b`` for integers, ``b > 0``."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (``n >= 1``)."""
    return 1 << (n - 1).bit_length()


@functools.cache
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def channel_block_size(channels: int) -> int:
    """BLOCK_C of the fixed channels_last configuration: the largest of 64, 32, 16 and 8 whose
    channel blocks leave at most an eighth of their lanes masked off (72 channels in blocks of
    64 ran 144 lanes, 16 runs 80), or 8."""
    for block_c in (64, 32, 16):
        if (cdiv(channels, block_c) * block_c - channels) * 8 <= channels:
            return block_c
    return 8


#: Largest BLOCK_P x BLOCK_C of the fixed configuration for a KxK conv with K > 3, compiled for
#: sm_90 with 4 warps: at K=5 a 32 x 64 tile needed 220-255 registers and spilled up to 1.8 KB
#: (the static report), 16 x 64 compiles to 114-140 registers in the single-tile kernels and the
#: looping reductions fit without spills only at 8 x 64.
LARGE_KERNEL_TILE = dict(single=1024, looping=512)


def default_meta(x: torch.Tensor, taps: int = 1, kernel_size: int = 1, looping: bool = False) -> dict:
    """The fixed configuration: used by the interpreter, in deterministic mode and with
    ``MOBILEOPS_AUTOTUNE=0``. ``taps``: the padded tap count of a weight-gradient gather (its
    [BLOCK_P, taps, BLOCK_C] tile is kept to 8192 elements); ``kernel_size``: the conv's K,
    ``looping``: the kernel loops over tiles (the reductions), both bounding the tile where K > 3."""
    if COMPILED_FOR_INTERPRETER:
        return dict(INTERPRETER_META)
    c = x.shape[1]
    if x.stride(1) == 1:  # channels innermost: vectorise over channels
        block_c = channel_block_size(c) if c > 8 else min(64, next_power_of_2(c))
        block_p = max(8, 2048 // block_c)
    else:
        block_c, block_p = 4, 256
    limit = 8192 // taps
    if kernel_size > 3:
        limit = min(limit, LARGE_KERNEL_TILE["looping" if looping else "single"])
    while block_p > 8 and block_p * block_c > limit:
        block_p //= 2
    return dict(BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4)


#: Programs per SM that the chunked (reducing) launches aim for: their programs run long loops
#: at 11-25% occupancy, so fewer than a few per SM leave SMs idle and latency unhidden. More
#: chunks mean more partial rows for the block's last program to add up (the weight gradient:
#: rows x BLOCK_C x K*K values), which bounds it from above.
CHUNK_PROGRAMS_PER_SM = 4
MAX_CHUNK = 8192


def chunk_size(x: torch.Tensor, positions: int) -> int:
    """Output positions per program in the chunked (reducing) kernels, sized from the channel
    block of the fixed configuration (:func:`default_meta`) so that a launch has at least
    :data:`CHUNK_PROGRAMS_PER_SM` programs per SM where the shape has the positions; a multiple
    of that configuration's BLOCK_P (no partly masked tile inside a chunk). Depends only on the
    shape and the device, so it never changes the summation order between runs."""
    if COMPILED_FOR_INTERPRETER:
        return INTERPRETER_CHUNK
    n, c = x.shape[0], x.shape[1]
    meta = default_meta(x)
    block_p = meta["BLOCK_P"]
    programs_wanted = CHUNK_PROGRAMS_PER_SM * sm_count(x.device)
    per_sample = max(1, cdiv(programs_wanted, max(1, n * cdiv(c, meta["BLOCK_C"]))))
    chunk = cdiv(cdiv(positions, per_sample), block_p) * block_p
    return int(min(max(chunk, block_p), MAX_CHUNK))


#: CUDA's largest grid extent in y and z (x goes to 2**31 - 1).
GRID_YZ_LIMIT = 65535


def channel_grid(programs: int, channels: int, block_c: int) -> tuple[int, int, int]:
    """A launch grid of ``programs`` (position tiles or chunks, on x) by the channel blocks of
    ``channels``. The channel blocks fill y up to :data:`GRID_YZ_LIMIT` and go on along z
    (:func:`channel_block` reads both), so a launch never fails for its channel count; the
    programs of the last z slice past the last block see an all-false channel mask."""
    blocks = cdiv(channels, block_c)
    y = max(1, min(blocks, GRID_YZ_LIMIT))
    return programs, y, cdiv(blocks, y)


def launch(kernel, tuned, grid_of, args: dict, meta: dict | None) -> None:
    """Run ``kernel`` with the fixed ``meta`` (interpreter, deterministic mode) or autotuned.

    ``grid_of(meta)`` maps the block sizes to the launch grid. Repeated launches of a shape call
    the compiled kernel's launcher directly (:mod:`mobileops.kernels._launch`)."""
    _launch.launch(kernel, tuned, grid_of, args, meta)


class Prepared:
    """One launch site's launch with every argument but ``varying`` fixed (a launch plan's
    shapes, strides and constexprs): called with the varying values (tensors, runtime floats) in
    that order, per call.

    The first call, and any call the compiled kernel no longer fits, goes through :func:`launch`
    with the whole argument dict; after a launch that compiled (or found) a kernel, later calls
    hand the compiled kernel's launcher its argument tuple directly
    (:class:`mobileops.kernels._launch.Direct`): no dict, no cache key over every argument.
    Under the interpreter every call takes :func:`launch` (after which asking for a direct
    relaunch costs a type check). A hook on :func:`launch` sees the calls that take it: count
    prepared launches on this class's ``__call__``.

    Args:
        kernel, tuned, grid_of, meta: as for :func:`launch`; ``grid_of`` must depend on the
            meta-parameters only.
        fixed: every argument but the varying ones.
        varying: the names of the arguments passed per call.
    """

    __slots__ = ("kernel", "tuned", "grid_of", "fixed", "meta", "varying", "direct")

    def __init__(self, kernel, tuned, grid_of, fixed: dict, meta: dict | None, varying: tuple[str, ...]):
        self.kernel, self.tuned, self.grid_of, self.meta = kernel, tuned, grid_of, meta
        self.fixed = fixed
        self.varying = varying
        self.direct = None

    def __call__(self, *values) -> None:
        direct = self.direct
        if direct is not None and direct(values):
            return
        args = dict(self.fixed)
        args.update(zip(self.varying, values))
        launch(self.kernel, self.tuned, self.grid_of, args, self.meta)
        self.direct = _launch.direct(self.kernel, self.tuned, self.grid_of, args, self.meta, self.varying)


def autotune_enabled() -> bool:
    """False when the environment variable ``MOBILEOPS_AUTOTUNE=0`` turns autotuning off. Read
    once per process (each launch asks, and reading the environment costs microseconds);
    :func:`mobileops.backend.forget_choices` makes the next call read it again."""
    enabled = _AUTOTUNE.get("enabled")
    if enabled is None:
        enabled = _AUTOTUNE["enabled"] = os.environ.get("MOBILEOPS_AUTOTUNE", "1") != "0"
    return enabled


_AUTOTUNE = backend.plan_cache()


def fixed_meta(x: torch.Tensor, reduction: bool, taps: int = 1, kernel_size: int = 1) -> dict | None:
    """:func:`default_meta` where the configuration is fixed (interpreter, ``MOBILEOPS_AUTOTUNE=0``,
    a reduction in deterministic mode), None where the autotuner chooses."""
    deterministic = reduction and torch.are_deterministic_algorithms_enabled()
    if COMPILED_FOR_INTERPRETER or not autotune_enabled() or deterministic:
        return default_meta(x, taps, kernel_size, looping=reduction)
    return None


def alignment(channels: int, *tensors: torch.Tensor) -> int:
    """The ``ALIGN`` constexpr of a launch (:func:`aligned`): the largest power of two, up to
    one 16-byte vector of ``tensors[0]``'s elements, that divides ``channels`` and every stride
    of ``tensors`` but the channel stride (1 in channels_last: the vectorised dimension). 1
    (no hint) where a position stride is 1 (NCHW) or odd."""
    align = max(1, 16 // tensors[0].element_size())
    for value in (channels, *(s for t in tensors for d, s in enumerate(t.stride()) if d != 1)):
        while align > 1 and value % align:
            align //= 2
    return align


def check_device(x: torch.Tensor) -> None:
    on_cpu = x.device.type == "cpu"
    if on_cpu and not COMPILED_FOR_INTERPRETER:
        raise RuntimeError("mobileops' Triton kernels were loaded without TRITON_INTERPRET=1 and "
                           "cannot run on CPU tensors; set TRITON_INTERPRET=1 before the first "
                           "Triton op of the process")
    if not on_cpu and COMPILED_FOR_INTERPRETER:
        raise RuntimeError("mobileops' Triton kernels were loaded with TRITON_INTERPRET=1 and only "
                           "run on CPU tensors; unset TRITON_INTERPRET to run them on the GPU")


def acc_dtype(x: torch.Tensor):
    return (tl.float64, torch.float64) if x.dtype == torch.float64 else (tl.float32, torch.float32)


@functools.lru_cache(maxsize=256)  # eps and momentum repeat call after call
def split_float(value: float) -> tuple[float, float]:
    """``value`` as an fp32 pair hi + lo (Triton passes Python floats as fp32): float64
    kernels add them back exactly enough for 1e-15 relative precision."""
    hi = float(np.float32(value))
    return hi, float(value - hi)


def index64(*tensors: torch.Tensor) -> bool:
    """Whether offsets may pass 2**31 and need 64-bit arithmetic. Always under the interpreter:
    it checks every 32-bit integer op for overflow, which makes it several times slower, and
    the CPU tests then cover the 64-bit path."""
    if COMPILED_FOR_INTERPRETER:
        return True
    limit = 2 ** 31 - 1
    return any(t.numel() > 0 and sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride())) >= limit
               for t in tensors)



_TICKET_COUNTERS: dict = {}
# Buffers replaced by larger ones stay allocated: a captured CUDA graph may still use one.
_OUTGROWN_COUNTERS: list = []


def _stream_of(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return torch._C._cuda_getCurrentRawStream(device.index if device.index is not None else torch.cuda.current_device())


def ticket_counters(device: torch.device, size: int) -> torch.Tensor:
    """An int32 buffer of at least ``size`` zeros for :func:`took_last_ticket`, one per (device,
    current stream): allocated (one fill) the first time and when a launch needs more, then
    reused. Safe to share because every kernel that uses it leaves it all zeros, and launches on
    one stream run one after another. A buffer allocated while a CUDA graph is being captured
    is zeroed by the graph, not now, so it serves that launch only (each graph then has its own).
    Not safe: replaying, at the same time on two streams, graphs captured on one stream after
    eager calls there (they share that stream's buffer). A buffer outgrown stays allocated, as
    a captured graph may hold its address."""
    key = (device, _stream_of(device))
    counters = _TICKET_COUNTERS.get(key)
    if counters is None or counters.numel() < size:
        if counters is not None:
            _OUTGROWN_COUNTERS.append(counters)
        counters = torch.zeros(next_power_of_2(max(size, 1024)), dtype=torch.int32, device=device)
        if device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
            _TICKET_COUNTERS[key] = counters
    return counters


#: Cached launch plans per cache (see :func:`remember`); past this many the cache starts over,
#: so call signatures that never repeat (every image size different) cannot grow it without bound.
PLAN_CACHE_LIMIT = 1024


def remember(cache: dict, key, plan):
    """Store ``plan`` under ``key`` in ``cache`` (emptied first when full) and return it."""
    if len(cache) >= PLAN_CACHE_LIMIT:
        cache.clear()
    cache[key] = plan
    return plan


def sum_rows(parts: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    rows, m = parts.shape
    out = torch.empty(m, device=parts.device, dtype=out_dtype)
    acc = tl.float64 if parts.dtype == torch.float64 else tl.float32
    launch(sum_rows_kernel, None, lambda meta: (cdiv(m, meta["BLOCK_M"]),),
            dict(in_ptr=parts, out_ptr=out, ROWS=rows, M=m, ACC=acc), REDUCE_META)
    return out



def absent(t: torch.Tensor | None, stand_in: torch.Tensor) -> torch.Tensor:
    # Triton needs a pointer for every argument; a HAS_*/NORM flag keeps the stand-in unread.
    return t if t is not None else stand_in


@functools.cache
def _stride_names(prefix: str) -> tuple[str, ...]:
    return tuple(f"{prefix}{d}" for d in "nchw")


def strides(prefix: str, t: torch.Tensor) -> dict:
    """``{prefix}n``, ``{prefix}c``, ``{prefix}h``, ``{prefix}w``: the element strides of ``t``."""
    return dict(zip(_stride_names(prefix), t.stride()))


