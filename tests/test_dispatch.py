"""Eager calls skip the custom-op dispatch (mobileops.ops._dispatch): that path must give the
same bits as the custom ops, for outputs, every gradient and the running statistics, and
tracing (meta tensors here) must still go through the custom ops."""

import pytest
import torch
from helpers import DEVICES, runnable_backends

import mobileops
from mobileops import backend, ops
from mobileops.ops import _dispatch, _plan

KERNEL_BACKENDS = [pytest.param(d, b, id=f"{d}-{b}") for d in DEVICES
                   for b in runnable_backends("dwconv_bn_act", d) if b != "torch"]


def _run_block(device, backend_name, seed=0):
    """A depthwise BN layer (train, with running stats), a bn_act and an SE, forward + backward."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(device)

    x = rand(2, 6, 9, 7).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    w = rand(6, 1, 3, 3).requires_grad_(True)
    gamma, beta = (1 + 0.2 * rand(6)).requires_grad_(True), (0.1 * rand(6)).requires_grad_(True)
    running = [0.1 * rand(6), 1 + rand(6).abs()]
    se = [rand(3, 6, scale=0.4).requires_grad_(True), rand(3).requires_grad_(True),
          rand(6, 3, scale=0.5).requires_grad_(True), rand(6).requires_grad_(True)]
    with mobileops.use_backend(backend_name):
        y = ops.dwconv_bn_act(x, w, gamma, beta, *running, stride=2, activation="hswish", training=True)
        y = ops.bn_act(y, gamma, beta, None, None, activation="relu6", training=True)
        y = ops.squeeze_excite(y, *se, gate="hsigmoid", post_act="silu")
    y.backward(rand(*y.shape))
    return [y.detach(), *running] + [t.grad for t in (x, w, gamma, beta, *se)]


@pytest.mark.parametrize("device, backend_name", KERNEL_BACKENDS)
def test_eager_path_matches_the_custom_ops_bit_for_bit(monkeypatch, device, backend_name):
    """The eager path (calls bound to their plans included) against every kernel op called
    through its custom op (plans unbound, so the forward ops are reached too)."""
    backend.forget_choices()
    direct = _run_block(device, backend_name)
    calls = []
    original = _dispatch.KernelOp.__call__

    def through_custom_op(self, *args):
        calls.append(self.custom_op)
        return self.custom_op(*args)

    with monkeypatch.context() as m:
        m.setattr(_dispatch.KernelOp, "__call__", through_custom_op)
        m.setattr(_plan, "bind", lambda impl, args, options, in_place=None: _plan.Plan(impl.call, options, in_place))
        backend.forget_choices()
        dispatched = _run_block(device, backend_name)
    backend.forget_choices()
    assert _dispatch.KernelOp.__call__ is original
    # the forward and backward ops of dwconv_bn_act, bn_act (each with its statistics op) and SE
    assert len(calls) == 8, f"the block should have gone through every custom op ({len(calls)} calls)"
    for index, (a, b) in enumerate(zip(direct, dispatched)):
        assert torch.equal(a, b), f"tensor {index} differs between the eager path and the custom ops"


@pytest.mark.parametrize("device, backend_name", KERNEL_BACKENDS)
def test_eager_path_is_taken_and_meta_tensors_use_the_custom_op(monkeypatch, device, backend_name):
    bodies = []
    original = _dispatch.KernelOp.__call__

    def spy(self, *args):
        bodies.append(_dispatch.eager(args[0]))
        return original(self, *args)

    monkeypatch.setattr(_dispatch.KernelOp, "__call__", spy)
    x = torch.randn(2, 4, 5, 5, device=device, dtype=torch.float64)
    w = torch.randn(4, 1, 3, 3, device=device, dtype=torch.float64)
    with mobileops.use_backend(backend_name):
        # (a call needing no gradient is bound to its plan and skips the kernel op altogether)
        ops.dwconv_act(x.requires_grad_(True), w, None, activation="relu")
        assert bodies == [True]
        x = x.detach()
        if backend._backend_problem(backend_name, torch.device("meta")) is not None:
            return  # this backend does not accept meta tensors here (the GPU build of triton)
        meta = ops.dwconv_act(x.to("meta"), w.to("meta"), None, activation="relu")
    assert bodies == [True, False] and meta.device.type == "meta" and meta.shape == x.shape
