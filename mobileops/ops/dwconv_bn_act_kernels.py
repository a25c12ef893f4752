"""The ``triton`` and ``cuda`` backends of :func:`~mobileops.ops.dwconv_bn_act`,
:func:`~mobileops.ops.dwconv_act` and :func:`~mobileops.ops.bn_act` (the same kernels without
the convolution: ``weight=None``). Both backends share this wiring; only the launcher module
differs (:mod:`mobileops.kernels.dwconv_bn_act` for Triton, :mod:`mobileops.cuda.dwconv_bn_act`
for the CUDA extension).

Per backend ``B`` one :class:`DwconvBnActKernels` object (:data:`TRITON`, :data:`CUDA`) holds three
``torch.library`` custom ops, each with a fake (meta) implementation so
``torch.compile(fullgraph=True)`` traces them without graph breaks (eager calls skip the custom-op
dispatch and run the same code directly: :mod:`mobileops.ops._dispatch`):

- ``mobileops::dwconv_bn_stats_B``: batch mean and rstd of the depthwise conv output,
  updating the running statistics in place. Not differentiable: it runs on detached inputs.
- ``mobileops::dwconv_bn_act_B``: conv -> normalise -> activation, with autograd. With
  ``norm="batch"`` its backward differentiates through the batch statistics as well, so the
  detached statistics above lose nothing.
- ``mobileops::dwconv_bn_act_B_backward``: that backward, recomputing the conv from x.

The launchers are imported on first use: Triton decides at kernel-definition time whether to
interpret them (``TRITON_INTERPRET=1``), so importing mobileops must not define them early.
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


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _out_shape(x: Tensor, weight: Tensor | None, stride: int, padding: int) -> tuple[int, int, int, int]:
    k = weight.shape[-1] if weight is not None else 1
    n, c, h, w = x.shape
    return n, c, _checks.conv_output_size(h, k, stride, padding), _checks.conv_output_size(w, k, stride, padding)


def _autocast(x: Tensor, *tensors: Tensor | None):
    """Cast like autocast casts a convolution's inputs; a no-op outside autocast."""
    if not _checks.autocast_on_for(x):
        return (x,) + tensors
    dtype = torch.get_autocast_dtype(x.device.type)

    def cast(t):
        return t.to(dtype) if t is not None and t.dtype in (torch.float16, torch.bfloat16, torch.float32) else t

    x, *tensors = (cast(t) for t in (x,) + tensors)
    if tensors and tensors[0] is not None and tensors[0].dtype != x.dtype:
        raise TypeError(f"weight has dtype {tensors[0].dtype} but x has {x.dtype} under autocast")
    return (x, *tensors)


# One schema per op, shared by both backends (the names and order of the bodies' arguments).
_BATCH_STATS_SCHEMA = ("(Tensor x, Tensor? weight, Tensor(a2!)? running_mean, Tensor(a3!)? running_var, "
                       "SymInt stride, SymInt padding, float momentum, float eps) -> (Tensor, Tensor)")
_FORWARD_SCHEMA = ("(Tensor x, Tensor? weight, Tensor? bn_weight, Tensor? bn_bias, Tensor? mean, Tensor? var, "
                   "SymInt stride, SymInt padding, str activation, str norm, float eps) -> Tensor")
_BACKWARD_SCHEMA = ("(Tensor dy, Tensor x, Tensor? weight, Tensor? bn_weight, Tensor? bn_bias, Tensor? mean, "
                    "Tensor? var, SymInt stride, SymInt padding, str activation, str norm, float eps, "
                    "bool weight_grad) -> (Tensor, Tensor, Tensor, Tensor)")


def _batch_stats_body(launchers, x, weight, running_mean, running_var, stride, padding, momentum, eps):
    return launchers().batch_stats(x, weight, running_mean, running_var, stride=stride, padding=padding,
                                   momentum=momentum, eps=eps)


def _batch_stats_fake(x, weight, running_mean, running_var, stride, padding, momentum, eps):
    c = x.shape[1]
    return x.new_empty(c, dtype=_acc_dtype(x)), x.new_empty(c, dtype=_acc_dtype(x))


def _forward_body(launchers, x, weight, bn_weight, bn_bias, mean, var, stride, padding, activation, norm, eps):
    out = torch.empty(_out_shape(x, weight, stride, padding), device=x.device, dtype=x.dtype,
                      memory_format=_checks.suggest_memory_format(x))
    return launchers().forward(x, weight, bn_weight, bn_bias, mean, var, out=out, stride=stride, padding=padding,
                               activation=activation, norm=norm, eps=eps)


def _forward_fake(x, weight, bn_weight, bn_bias, mean, var, stride, padding, activation, norm, eps):
    return torch.empty(_out_shape(x, weight, stride, padding), device=x.device, dtype=x.dtype,
                       memory_format=_checks.suggest_memory_format(x))


def _backward_body(launchers, dy, x, weight, bn_weight, bn_bias, mean, var, stride, padding, activation, norm, eps,
                   weight_grad):
    dx, dw, sum_du, sum_dux = launchers().backward(
        dy, x, weight, bn_weight, bn_bias, mean, var, stride=stride, padding=padding, activation=activation,
        norm=norm, eps=eps, weight_grad=weight_grad, memory_format=_checks.suggest_memory_format(x))
    # (a cast only where a parameter is not in the accumulation dtype: even a no-op .to() costs a dispatch)
    d_bn_weight = sum_dux if bn_weight is None or bn_weight.dtype == sum_dux.dtype else sum_dux.to(bn_weight.dtype)
    d_bn_bias = sum_du if bn_bias is None or bn_bias.dtype == sum_du.dtype else sum_du.to(bn_bias.dtype)
    return dx, dw if dw is not None else x.new_empty(0), d_bn_weight, d_bn_bias


def _backward_fake(dy, x, weight, bn_weight, bn_bias, mean, var, stride, padding, activation, norm, eps,
                   weight_grad):
    c, acc = x.shape[1], _acc_dtype(x)
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype, memory_format=_checks.suggest_memory_format(x))
    has_dw = weight_grad and weight is not None
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if has_dw else x.new_empty(0)
    return (dx, dw, x.new_empty(c, dtype=bn_weight.dtype if bn_weight is not None else acc),
            x.new_empty(c, dtype=bn_bias.dtype if bn_bias is not None else acc))


def _setup_context(ctx, inputs, output):
    x, weight, bn_weight, bn_bias, mean, var, *config = inputs
    ctx.save_for_backward(x, weight, bn_weight, bn_bias, mean, var)
    ctx.config = config


def _autograd_backward(backward_op, ctx, dy):
    x, weight, bn_weight, bn_bias, mean, var = ctx.saved_tensors
    needs = ctx.needs_input_grad
    dx, dw, d_bn_weight, d_bn_bias = backward_op(dy, x, weight, bn_weight, bn_bias, mean, var, *ctx.config,
                                                 weight is not None and needs[1])
    return (dx if needs[0] else None, dw if weight is not None and needs[1] else None,
            d_bn_weight if bn_weight is not None and needs[2] else None,
            d_bn_bias if bn_bias is not None and needs[3] else None) + (None,) * 7


class _BatchNormStep:
    """What a call with batch statistics, bound to its signature, runs: the statistics launch,
    the forward bound to its output's size and strides, the backward kernel op, and the
    signature's options."""

    __slots__ = ("stats", "forward", "backward", "stride", "padding", "activation", "update")

    def __init__(self, stats, forward, backward, stride, padding, activation, update):
        self.stats, self.forward, self.backward = stats, forward, backward
        self.stride, self.padding, self.activation, self.update = stride, padding, activation, update

    def __call__(self, x, weight, bn_weight, bn_bias, running_mean, running_var, momentum, eps):
        """(output, batch mean, batch rstd), updating the running statistics where the call does."""
        if not self.update:
            running_mean = running_var = None
        mean, rstd = self.stats(x, weight, running_mean, running_var, stride=self.stride, padding=self.padding,
                                momentum=momentum, eps=eps)
        return self.forward(x, weight, bn_weight, bn_bias, mean, rstd, eps), mean, rstd


class BatchNormTraining(torch.autograd.Function):
    """A ``dwconv_bn_act`` / ``bn_act`` call with batch statistics, bound to its call signature
    (eager, outside autocast for the conv, differentiable): one autograd node for what the
    general implementation runs as the statistics op and the forward op's node. Same launches,
    same arguments, same saved tensors and the same backward, so results are bit-identical.
    ``apply(step, x, weight, bn_weight, bn_bias, running_mean, running_var, momentum, eps)``
    with a :class:`_BatchNormStep`."""

    @staticmethod
    def forward(ctx, step, x, weight, bn_weight, bn_bias, running_mean, running_var, momentum, eps):
        out, mean, rstd = step(x, weight, bn_weight, bn_bias, running_mean, running_var, momentum, eps)
        ctx.save_for_backward(x, weight, bn_weight, bn_bias, mean, rstd)
        ctx.step, ctx.eps = step, eps
        return out

    @staticmethod
    def backward(ctx, dy):
        x, weight, bn_weight, bn_bias, mean, rstd = ctx.saved_tensors
        step, needs = ctx.step, ctx.needs_input_grad
        dx, dw, d_bn_weight, d_bn_bias = step.backward(dy, x, weight, bn_weight, bn_bias, mean, rstd, step.stride,
                                                       step.padding, step.activation, "batch", ctx.eps,
                                                       weight is not None and needs[2])
        return (None, dx if needs[1] else None, dw if weight is not None and needs[2] else None,
                d_bn_weight if bn_weight is not None and needs[3] else None,
                d_bn_bias if bn_bias is not None and needs[4] else None, None, None, None, None)


_BATCH_NORM_TRAINING = fast_apply(BatchNormTraining) or BatchNormTraining.apply


class DwconvBnActKernels:
    """One kernel backend's ``dwconv_bn_act``, ``dwconv_act`` and ``bn_act``: its three custom
    ops and the implementations registered with :mod:`mobileops.backend`.

    Attributes:
        backend: the backend name (``"triton"`` or ``"cuda"``).
        batch_stats: :class:`KernelOp` ``mobileops::dwconv_bn_stats_<backend>``.
        forward: :class:`KernelOp` ``mobileops::dwconv_bn_act_<backend>`` (differentiable).
        backward: :class:`KernelOp` ``mobileops::dwconv_bn_act_<backend>_backward``.

    Args:
        backend: the backend name.
        launchers: returns the launcher module (``forward``, ``batch_stats``, ``backward``; see
            :mod:`mobileops.kernels.dwconv_bn_act`), imported on first use.
    """

    def __init__(self, backend_name: str, launchers: Callable[[], Any]):
        self.backend = backend_name
        self._launchers = launchers
        self.batch_stats = KernelOp(f"mobileops::dwconv_bn_stats_{backend_name}",
                                    functools.partial(_batch_stats_body, launchers), schema=_BATCH_STATS_SCHEMA,
                                    mutates_args=("running_mean", "running_var"), fake=_batch_stats_fake)
        self.backward = KernelOp(f"mobileops::dwconv_bn_act_{backend_name}_backward",
                                 functools.partial(_backward_body, launchers), schema=_BACKWARD_SCHEMA,
                                 fake=_backward_fake)
        self.forward = KernelOp(f"mobileops::dwconv_bn_act_{backend_name}", functools.partial(_forward_body, launchers),
                                schema=_FORWARD_SCHEMA, fake=_forward_fake, setup_context=_setup_context,
                                backward=functools.partial(_autograd_backward, self.backward))
        backend.register_impl("dwconv_bn_act", backend_name)(_plan.Implementation(self.dwconv_bn_act,
                                                                                  self._bind_dwconv_bn_act))
        backend.register_impl("dwconv_act", backend_name)(_plan.Implementation(self.dwconv_act, self._bind_dwconv_act))
        backend.register_impl("bn_act", backend_name)(_plan.Implementation(self.bn_act, self._bind_bn_act))

    def _conv_bn_act(self, x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, activation,
                     training, momentum, eps):
        """Batch statistics (updating the running ones) then normalise, or running statistics."""
        if training or running_mean is None:
            update = training and running_mean is not None
            mean, rstd = self.batch_stats(x.detach(), weight.detach() if weight is not None else None,
                                          running_mean if update else None, running_var if update else None,
                                          stride, padding, momentum, eps)
            return self.forward(x, weight, bn_weight, bn_bias, mean, rstd, stride, padding, activation, "batch", eps)
        return self.forward(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, activation,
                            "running", eps)

    def dwconv_bn_act(self, x, weight, bn_weight, bn_bias, running_mean, running_var, *, stride, padding,
                      activation, training, momentum, eps):
        """This backend's :func:`mobileops.ops.dwconv_bn_act` (arguments already validated)."""
        x, weight = _autocast(x, weight)
        return self._conv_bn_act(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding,
                                 activation, training, momentum, eps)

    def dwconv_act(self, x, weight, bias, *, stride, padding, activation):
        """This backend's :func:`mobileops.ops.dwconv_act`."""
        x, weight, bias = _autocast(x, weight, bias)
        return self.forward(x, weight, None, bias, None, None, stride, padding, activation, "none", 0.0)

    def bn_act(self, x, bn_weight, bn_bias, running_mean, running_var, *, activation, training, momentum, eps):
        """This backend's :func:`mobileops.ops.bn_act` (the kernels without a conv)."""
        # Under autocast BatchNorm runs in its input's dtype, so nothing is cast here.
        return self._conv_bn_act(x, None, bn_weight, bn_bias, running_mean, running_var, 1, 0, activation, training,
                                 momentum, eps)

    # Binding (mobileops.ops._plan.bind), eager calls only, outside autocast for the ops that cast:
    # a call that only runs the forward kernel (running or no statistics, nothing to
    # differentiate) gets the forward op's no-grad body with the output's size and strides
    # decided once; a call with batch statistics gets the statistics and forward launches
    # (_BatchNormStep), differentiated as one BatchNormTraining node. A call with running
    # statistics that is differentiated keeps the general implementation.

    def _bound_forward(self, x, weight, stride, padding, activation, norm):
        size = _out_shape(x, weight, stride, padding)
        strides, device, dtype, forward = _checks.output_strides(x, size), x.device, x.dtype, self._launchers().forward

        def run(x, weight, bn_weight, bn_bias, mean, var, eps):
            out = torch.empty_strided(size, strides, device=device, dtype=dtype)
            return forward(x, weight, bn_weight, bn_bias, mean, var, out=out, stride=stride, padding=padding,
                           activation=activation, norm=norm, eps=eps)

        return run

    def _bound_batch_norm(self, x, weight, bn_weight, bn_bias, running_mean, stride, padding, activation, training,
                          general):
        """A call with batch statistics bound to its signature: the statistics and forward
        launches (:class:`_BatchNormStep`), as one :class:`BatchNormTraining` node where the
        call is differentiated. ``general(x, ..., momentum, eps)``: the general implementation,
        for calls under torch.func transforms (which need the kernel ops' own autograd)."""
        step = _BatchNormStep(self._launchers().batch_stats,
                              self._bound_forward(x, weight, stride, padding, activation, "batch"), self.backward,
                              stride, padding, activation, training and running_mean is not None)
        if not _checks.needs_grad(x, weight, bn_weight, bn_bias):
            def batch_norm(x, weight, bn_weight, bn_bias, running_mean, running_var, *, momentum, eps):
                return step(x, weight, bn_weight, bn_bias, running_mean, running_var, momentum, eps)[0]

            return batch_norm

        def batch_norm_training(x, weight, bn_weight, bn_bias, running_mean, running_var, *, momentum, eps):
            if torch._C._are_functorch_transforms_active():
                return general(x, weight, bn_weight, bn_bias, running_mean, running_var, momentum, eps)
            return _BATCH_NORM_TRAINING(step, x, weight, bn_weight, bn_bias, running_mean, running_var, momentum, eps)

        return batch_norm_training

    def _bind_dwconv_bn_act(self, x, weight, bn_weight, bn_bias, running_mean, running_var, *, stride, padding,
                            activation, training):
        if not eager(x) or _checks.autocast_on_for(x):
            return None
        if training or running_mean is None:
            def general(x, weight, bn_weight, bn_bias, running_mean, running_var, momentum, eps):
                return self.dwconv_bn_act(x, weight, bn_weight, bn_bias, running_mean, running_var, stride=stride,
                                          padding=padding, activation=activation, training=training,
                                          momentum=momentum, eps=eps)

            return self._bound_batch_norm(x, weight, bn_weight, bn_bias, running_mean, stride, padding, activation,
                                          training, general)
        if _checks.needs_grad(x, weight, bn_weight, bn_bias):
            return None
        run = self._bound_forward(x, weight, stride, padding, activation, "running")

        def dwconv_bn_act(x, weight, bn_weight, bn_bias, running_mean, running_var, *, momentum, eps):
            return run(x, weight, bn_weight, bn_bias, running_mean, running_var, eps)

        return dwconv_bn_act

    def _bind_dwconv_act(self, x, weight, bias, *, stride, padding, activation):
        if not eager(x) or _checks.autocast_on_for(x) or _checks.needs_grad(x, weight, bias):
            return None
        run = self._bound_forward(x, weight, stride, padding, activation, "none")

        def dwconv_act(x, weight, bias):
            return run(x, weight, None, bias, None, None, 0.0)

        return dwconv_act

    def _bind_bn_act(self, x, bn_weight, bn_bias, running_mean, running_var, *, activation, training):
        if not eager(x):
            return None
        if training or running_mean is None:
            def general(x, weight, bn_weight, bn_bias, running_mean, running_var, momentum, eps):
                return self.bn_act(x, bn_weight, bn_bias, running_mean, running_var, activation=activation,
                                   training=training, momentum=momentum, eps=eps)

            bound = self._bound_batch_norm(x, None, bn_weight, bn_bias, running_mean, 1, 0, activation, training,
                                           general)

            def bn_act(x, bn_weight, bn_bias, running_mean, running_var, *, momentum, eps):
                return bound(x, None, bn_weight, bn_bias, running_mean, running_var, momentum=momentum, eps=eps)

            return bn_act
        if _checks.needs_grad(x, bn_weight, bn_bias):
            return None
        run = self._bound_forward(x, None, 1, 0, activation, "running")

        def bn_act(x, bn_weight, bn_bias, running_mean, running_var, *, momentum, eps):
            return run(x, None, bn_weight, bn_bias, running_mean, running_var, eps)

        return bn_act


#: The Triton backend's kernels (:mod:`mobileops.kernels.dwconv_bn_act`).
TRITON = DwconvBnActKernels("triton", backend.launcher_loader("triton", "dwconv_bn_act"))
#: The CUDA extension's kernels (:mod:`mobileops.cuda.dwconv_bn_act`).
CUDA = DwconvBnActKernels("cuda", backend.launcher_loader("cuda", "dwconv_bn_act"))
