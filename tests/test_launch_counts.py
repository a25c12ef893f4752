"""Kernel launches per fused-op call on the triton backend, counted through the public ops (the
design's limits: every inference call 1, SE 2; training forward + backward ``dwconv_bn_act`` <= 5,
``bn_act`` <= 4, ``squeeze_excite`` <= 5). Counted, not timed (helpers.count_launches: every
prepared launch and every call of ``mobileops.kernels._common.launch``)."""

import pytest
import torch
from helpers import count_launches

import mobileops
from mobileops import ops

pytest.importorskip("triton")


@pytest.fixture
def launches(monkeypatch):
    return count_launches(monkeypatch)


def _inputs(grad: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 6, 6, generator=g).contiguous(memory_format=torch.channels_last)
    tensors = dict(x=x, w=torch.randn(8, 1, 3, 3, generator=g), gamma=1 + 0.1 * torch.randn(8, generator=g),
                   beta=torch.randn(8, generator=g), fc1=0.3 * torch.randn(4, 8, generator=g),
                   fc2=0.3 * torch.randn(8, 4, generator=g))
    if grad:
        tensors = {k: v.requires_grad_(True) for k, v in tensors.items()}
    return tensors, torch.zeros(8), torch.ones(8)


CALLS = {
    "dwconv_bn_act": lambda t, rm, rv, training: ops.dwconv_bn_act(t["x"], t["w"], t["gamma"], t["beta"], rm, rv,
                                                                   activation="hswish", training=training),
    "dwconv_act": lambda t, rm, rv, training: ops.dwconv_act(t["x"], t["w"], t["beta"], activation="relu"),
    "bn_act": lambda t, rm, rv, training: ops.bn_act(t["x"], t["gamma"], t["beta"], rm, rv, activation="relu6",
                                                     training=training),
    "squeeze_excite": lambda t, rm, rv, training: ops.squeeze_excite(t["x"], t["fc1"], None, t["fc2"], t["beta"]),
}


DIFFERENTIABLE = {"dwconv_bn_act": ("x", "w", "gamma", "beta"), "dwconv_act": ("x", "w", "beta"),
                  "bn_act": ("x", "gamma", "beta"), "squeeze_excite": ("x", "fc1", "fc2", "beta")}


@pytest.mark.parametrize("op, expected", [("dwconv_bn_act", 1), ("dwconv_act", 1), ("bn_act", 1),
                                          ("squeeze_excite", 2)])
def test_inference_launches(launches, op, expected):
    t, rm, rv = _inputs(grad=False)
    with mobileops.use_backend("triton"), torch.no_grad():
        CALLS[op](t, rm, rv, False)
    assert len(launches) == expected, launches


@pytest.mark.parametrize("op, training, forward, total", [
    ("dwconv_bn_act", True, 2, 5), ("dwconv_bn_act", False, 1, 3), ("dwconv_act", False, 1, 3),
    ("bn_act", True, 2, 4), ("bn_act", False, 1, 2), ("squeeze_excite", False, 2, 5)])
def test_training_launches(launches, op, training, forward, total):
    """Forward, then forward + backward through ``autograd.grad`` of every differentiable input."""
    t, rm, rv = _inputs(grad=True)
    with mobileops.use_backend("triton"):
        y = CALLS[op](t, rm, rv, training)
        assert len(launches) == forward, launches
        torch.autograd.grad(y, [t[name] for name in DIFFERENTIABLE[op]], torch.ones_like(y))
    assert len(launches) == total, launches


def test_ticket_counters_grow_without_freeing_the_old_buffer():
    """A captured CUDA graph may hold an outgrown buffer's address: it must stay allocated."""
    from mobileops.kernels import _common

    small = _common.ticket_counters(torch.device("cpu"), 8)
    assert not small.any() and small.dtype == torch.int32
    assert _common.ticket_counters(torch.device("cpu"), 8) is small  # reused, no new fill
    large = _common.ticket_counters(torch.device("cpu"), small.numel() + 1)
    assert large.numel() > small.numel() and not large.any()
    assert any(t is small for t in _common._OUTGROWN_COUNTERS)
    assert _common.ticket_counters(torch.device("cpu"), 8) is large


def test_the_counter_counts_each_launch_once_direct_relaunches_included(launches):
    """On a GPU a prepared launch relaunches directly after its first call, without
    _common.launch; its first call goes through _common.launch inside the prepared call."""
    import triton.language as tl

    from mobileops.kernels import _common

    parts = torch.randn(8, 4, dtype=torch.float64)
    out = torch.empty(4, dtype=torch.float64)
    prepared = _common.Prepared(_common.sum_rows_kernel, None, lambda meta: (1,), dict(ROWS=8, M=4, ACC=tl.float64),
                                dict(_common.REDUCE_META), ("in_ptr", "out_ptr"))
    prepared(parts, out)  # through _common.launch
    torch.testing.assert_close(out, parts.sum(0))
    prepared.direct = lambda values: True  # what a direct relaunch looks like from outside
    prepared(parts, out)
    assert launches == ["sum_rows_kernel", "sum_rows_kernel"]

