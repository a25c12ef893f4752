"""The ``triton`` and ``cuda`` backends of :func:`~mobileops.ops.squeeze_excite` (shared
wiring; the launchers are :mod:`mobileops.kernels.squeeze_excite` and
:mod:`mobileops.cuda.squeeze_excite`, imported on first use).

Per backend ``B`` one :class:`SqueezeExciteKernels` object (:data:`TRITON`, :data:`CUDA`) holds two
``torch.library`` custom ops with fake implementations
(``torch.compile(fullgraph=True)`` traces them): ``mobileops::squeeze_excite_B`` returns the
output plus the per-sample pooled means and gates, which its registered autograd saves, and
``mobileops::squeeze_excite_B_backward`` computes every gradient from x, those two small tensors
and the output gradient. Eager calls run the same code without the custom-op dispatch
(:mod:`mobileops.ops._dispatch`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from mobileops import backend
from mobileops.ops import _checks, _plan
from mobileops.ops._dispatch import KernelOp, eager, fast_apply


def _stats_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _like_x(x: Tensor) -> Tensor:
    return torch.empty(x.shape, device=x.device, dtype=x.dtype, memory_format=_checks.suggest_memory_format(x))


_FORWARD_SCHEMA = ("(Tensor x, Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias, str gate, "
                   "str post_act) -> (Tensor, Tensor, Tensor)")
_BACKWARD_SCHEMA = ("(Tensor dy, Tensor x, Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias, "
                    "Tensor pooled, Tensor gates, str gate, str post_act) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")


def _forward_body(launchers, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gate, post_act):
    return launchers().forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, out=_like_x(x), gate=gate,
                               post_act=post_act)


def _forward_fake(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gate, post_act):
    per_sample = x.new_empty(x.shape[:2], dtype=_stats_dtype(x))
    return _like_x(x), per_sample, torch.empty_like(per_sample)


def _backward_body(launchers, dy, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pooled, gates, gate, post_act):
    dx, dw1, db1, dw2, db2 = launchers().backward(
        dy, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pooled, gates, gate=gate, post_act=post_act,
        memory_format=_checks.suggest_memory_format(x))
    # an absent bias gets its own empty tensor: outputs of a custom op may not alias each other
    return dx, dw1, db1 if db1 is not None else x.new_empty(0), dw2, db2 if db2 is not None else x.new_empty(0)


def _backward_fake(dy, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pooled, gates, gate, post_act):
    def like(t):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None else x.new_empty(0)

    return _like_x(x), like(fc1_weight), like(fc1_bias), like(fc2_weight), like(fc2_bias)


def _setup_context(ctx, inputs, output):
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gate, post_act = inputs
    _, pooled, gates = output
    ctx.mark_non_differentiable(pooled, gates)
    # Their gradients are never read: without this autograd would zero-fill two (N, C) tensors
    # for every backward.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pooled, gates)
    ctx.config = (gate, post_act)


def _autograd_backward(backward_op, ctx, dy, _d_pooled, _d_gates):
    # pooled and gates are returned only to be saved here; nothing downstream uses them.
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pooled, gates = ctx.saved_tensors
    dx, dw1, db1, dw2, db2 = backward_op(dy, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pooled, gates,
                                         *ctx.config)
    needs = ctx.needs_input_grad
    grads = (dx, dw1, db1 if fc1_bias is not None else None, dw2, db2 if fc2_bias is not None else None)
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None, None)


class _SqueezeExciteStep:
    """What a call bound to its signature runs: the forward launches into an output of the
    signature's size and strides, and the backward kernel op."""

    __slots__ = ("size", "strides", "device", "dtype", "launch", "backward", "gate", "post_act")

    def __init__(self, x, launch, backward, gate, post_act):
        self.size, self.strides = x.shape, _checks.output_strides(x, x.shape)
        self.device, self.dtype = x.device, x.dtype
        self.launch, self.backward, self.gate, self.post_act = launch, backward, gate, post_act

    def __call__(self, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
        """(output, pooled, gates)"""
        out = torch.empty_strided(self.size, self.strides, device=self.device, dtype=self.dtype)
        return self.launch(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, out=out, gate=self.gate,
                           post_act=self.post_act)


class SqueezeExciteTraining(torch.autograd.Function):
    """A differentiated ``squeeze_excite`` call bound to its call signature (eager): one autograd
    node with one output, where the general implementation's node also returns the pooled
    values and gates (to save them) and marks them non-differentiable. Same launches, same saved
    tensors and the same backward, so results are bit-identical.
    ``apply(step, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)`` with a :class:`_SqueezeExciteStep`."""

    @staticmethod
    def forward(ctx, step, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
        out, pooled, gates = step(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
        ctx.save_for_backward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pooled, gates)
        ctx.step = step
        return out

    @staticmethod
    def backward(ctx, dy):
        x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pooled, gates = ctx.saved_tensors
        step, needs = ctx.step, ctx.needs_input_grad
        dx, dw1, db1, dw2, db2 = step.backward(dy, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pooled, gates,
                                               step.gate, step.post_act)
        grads = (dx, dw1, db1 if fc1_bias is not None else None, dw2, db2 if fc2_bias is not None else None)
        return (None,) + tuple(g if need else None for g, need in zip(grads, needs[1:]))


_SQUEEZE_EXCITE_TRAINING = fast_apply(SqueezeExciteTraining) or SqueezeExciteTraining.apply


class SqueezeExciteKernels:
    """One kernel backend's ``squeeze_excite``: its two custom ops and the implementation
    registered with :mod:`mobileops.backend`.

    Attributes:
        backend: the backend name (``"triton"`` or ``"cuda"``).
        forward: :class:`KernelOp` ``mobileops::squeeze_excite_<backend>`` (differentiable).
        backward: :class:`KernelOp` ``mobileops::squeeze_excite_<backend>_backward``.

    Args:
        backend: the backend name.
        launchers: returns the launcher module (``forward``, ``backward``; see
            :mod:`mobileops.kernels.squeeze_excite`), imported on first use.
    """

    def __init__(self, backend_name: str, launchers: Callable[[], Any]):
        self.backend = backend_name
        self._launchers = launchers
        self.backward = KernelOp(f"mobileops::squeeze_excite_{backend_name}_backward",
                                 functools.partial(_backward_body, launchers), schema=_BACKWARD_SCHEMA,
                                 fake=_backward_fake)
        self.forward = KernelOp(f"mobileops::squeeze_excite_{backend_name}",
                                functools.partial(_forward_body, launchers), schema=_FORWARD_SCHEMA,
                                fake=_forward_fake, setup_context=_setup_context,
                                backward=functools.partial(_autograd_backward, self.backward))
        backend.register_impl("squeeze_excite", backend_name)(_plan.Implementation(self.squeeze_excite,
                                                                                   self._bind_squeeze_excite))

    def squeeze_excite(self, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, gate, post_act):
        """This backend's :func:`mobileops.ops.squeeze_excite` (arguments already validated)."""
        return self.forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gate, post_act)[0]

    def _bind_squeeze_excite(self, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, gate, post_act):
        """An eager call (:func:`mobileops.ops._plan.bind`): the forward launches with the
        output's strides decided once, differentiated as one :class:`SqueezeExciteTraining`
        node where the call is (the general path under torch.func transforms)."""
        if not eager(x):
            return None
        step = _SqueezeExciteStep(x, self._launchers().forward, self.backward, gate, post_act)
        if not _checks.needs_grad(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
            def squeeze_excite(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
                return step(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)[0]

            return squeeze_excite

        def squeeze_excite_training(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
            if torch._C._are_functorch_transforms_active():
                return self.squeeze_excite(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gate=gate, post_act=post_act)
            return _SQUEEZE_EXCITE_TRAINING(step, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)

        return squeeze_excite_training


#: The Triton backend's kernels (:mod:`mobileops.kernels.squeeze_excite`).
TRITON = SqueezeExciteKernels("triton", backend.launcher_loader("triton", "squeeze_excite"))
#: The CUDA extension's kernels (:mod:`mobileops.cuda.squeeze_excite`).
CUDA = SqueezeExciteKernels("cuda", backend.launcher_loader("cuda", "squeeze_excite"))
