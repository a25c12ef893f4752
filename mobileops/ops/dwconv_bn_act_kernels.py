"""The ``triton`` and ``cuda`` backends of :func:`~mobileops.ops.dwconv_bn_act`,
:func:`~mobileops.ops.dwconv_act` and :func:`~mobileops.ops.bn_act` (the same kernels without
the convolution: ``weight=None``). Both backends share this wiring; only the launcher module
differs (:mod:`mobileops.kernels.dwconv_bn_act` for Triton, :mod:`mobileops.cuda.dwconv_bn_act`
for the CUDA extension).

Per backend ``B``, three ``torch.library`` custom ops, each with a fake (meta) implementation so
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

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from mobileops import backend
from mobileops.ops import _checks
from mobileops.ops._dispatch import KernelOp


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _out_shape(x: Tensor, weight: Tensor | None, stride: int, padding: int) -> tuple[int, int, int, int]:
    k = weight.shape[-1] if weight is not None else 1
    n, c, h, w = x.shape
    return n, c, _checks.conv_output_size(h, k, stride, padding), _checks.conv_output_size(w, k, stride, padding)


def _autocast(x: Tensor, *tensors: Tensor | None):
    """Cast like autocast casts a convolution's inputs; a no-op outside autocast."""
    if not _checks.autocast_on(x.device):
        return (x,) + tensors
    dtype = torch.get_autocast_dtype(x.device.type)

    def cast(t):
        return t.to(dtype) if t is not None and t.dtype in (torch.float16, torch.bfloat16, torch.float32) else t

    x, *tensors = (cast(t) for t in (x,) + tensors)
    if tensors and tensors[0] is not None and tensors[0].dtype != x.dtype:
        raise TypeError(f"weight has dtype {tensors[0].dtype} but x has {x.dtype} under autocast")
    return (x, *tensors)


def define_backend(name: str, load_kernels: Callable[[], Any]) -> None:
    """Define the three custom ops for backend ``name`` and register its ``dwconv_bn_act``,
    ``dwconv_act`` and ``bn_act`` implementations.

    ``load_kernels()`` returns the launcher module (``forward``, ``batch_stats``,
    ``backward``; see :mod:`mobileops.kernels.dwconv_bn_act`), imported on first use.
    """

    def _batch_stats_body(x: Tensor, weight: Tensor | None, running_mean: Tensor | None,
                          running_var: Tensor | None, stride: int, padding: int, momentum: float,
                          eps: float) -> tuple[Tensor, Tensor]:
        return load_kernels().batch_stats(x, weight, running_mean, running_var, stride=stride, padding=padding,
                                          momentum=momentum, eps=eps)

    def _batch_stats_fake(x, weight, running_mean, running_var, stride, padding, momentum, eps):
        c = x.shape[1]
        return x.new_empty(c, dtype=_acc_dtype(x)), x.new_empty(c, dtype=_acc_dtype(x))

    _batch_stats = KernelOp(f"mobileops::dwconv_bn_stats_{name}", _batch_stats_body,
                            mutates_args=("running_mean", "running_var"), fake=_batch_stats_fake)

    def _forward_body(x: Tensor, weight: Tensor | None, bn_weight: Tensor | None, bn_bias: Tensor | None,
                      mean: Tensor | None, var: Tensor | None, stride: int, padding: int, activation: str,
                      norm: str, eps: float) -> Tensor:
        out = torch.empty(_out_shape(x, weight, stride, padding), device=x.device, dtype=x.dtype,
                          memory_format=_checks.suggest_memory_format(x))
        return load_kernels().forward(x, weight, bn_weight, bn_bias, mean, var, out=out, stride=stride,
                                      padding=padding, activation=activation, norm=norm, eps=eps)

    def _forward_fake(x, weight, bn_weight, bn_bias, mean, var, stride, padding, activation, norm, eps):
        return torch.empty(_out_shape(x, weight, stride, padding), device=x.device, dtype=x.dtype,
                           memory_format=_checks.suggest_memory_format(x))

    def _backward_body(dy: Tensor, x: Tensor, weight: Tensor | None, bn_weight: Tensor | None,
                       bn_bias: Tensor | None, mean: Tensor | None, var: Tensor | None, stride: int,
                       padding: int, activation: str, norm: str, eps: float,
                       weight_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        dx, dw, sum_du, sum_dux = load_kernels().backward(
            dy, x, weight, bn_weight, bn_bias, mean, var, stride=stride, padding=padding,
            activation=activation, norm=norm, eps=eps, weight_grad=weight_grad,
            memory_format=_checks.suggest_memory_format(x))
        d_bn_weight = sum_dux.to(bn_weight.dtype) if bn_weight is not None else sum_dux
        d_bn_bias = sum_du.to(bn_bias.dtype) if bn_bias is not None else sum_du
        return dx, dw if dw is not None else x.new_empty(0), d_bn_weight, d_bn_bias

    def _backward_fake(dy, x, weight, bn_weight, bn_bias, mean, var, stride, padding, activation, norm, eps,
                       weight_grad):
        c, acc = x.shape[1], _acc_dtype(x)
        dx = torch.empty(x.shape, device=x.device, dtype=x.dtype, memory_format=_checks.suggest_memory_format(x))
        has_dw = weight_grad and weight is not None
        dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if has_dw else x.new_empty(0)
        return (dx, dw, x.new_empty(c, dtype=bn_weight.dtype if bn_weight is not None else acc),
                x.new_empty(c, dtype=bn_bias.dtype if bn_bias is not None else acc))

    _backward_op = KernelOp(f"mobileops::dwconv_bn_act_{name}_backward", _backward_body, fake=_backward_fake)

    def _setup_context(ctx, inputs, output):
        x, weight, bn_weight, bn_bias, mean, var, *config = inputs
        ctx.save_for_backward(x, weight, bn_weight, bn_bias, mean, var)
        ctx.config = config

    def _autograd_backward(ctx, dy):
        x, weight, bn_weight, bn_bias, mean, var = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dx, dw, d_bn_weight, d_bn_bias = _backward_op(dy, x, weight, bn_weight, bn_bias, mean, var, *ctx.config,
                                                      weight is not None and needs[1])
        return (dx if needs[0] else None, dw if weight is not None and needs[1] else None,
                d_bn_weight if bn_weight is not None and needs[2] else None,
                d_bn_bias if bn_bias is not None and needs[3] else None) + (None,) * 7

    _forward = KernelOp(f"mobileops::dwconv_bn_act_{name}", _forward_body, fake=_forward_fake,
                        setup_context=_setup_context, backward=_autograd_backward)

    def _conv_bn_act(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, activation,
                     training, momentum, eps):
        """Batch statistics (updating the running ones) then normalise, or running statistics."""
        if training or running_mean is None:
            update = training and running_mean is not None
            mean, rstd = _batch_stats(x.detach(), weight.detach() if weight is not None else None,
                                      running_mean if update else None, running_var if update else None,
                                      stride, padding, momentum, eps)
            return _forward(x, weight, bn_weight, bn_bias, mean, rstd, stride, padding, activation, "batch", eps)
        return _forward(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, activation,
                        "running", eps)

    @backend.register_impl("dwconv_bn_act", name)
    def _dwconv_bn_act(x, weight, bn_weight, bn_bias, running_mean, running_var, *, stride, padding,
                       activation, training, momentum, eps):
        x, weight = _autocast(x, weight)
        return _conv_bn_act(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, activation,
                            training, momentum, eps)

    @backend.register_impl("dwconv_act", name)
    def _dwconv_act(x, weight, bias, *, stride, padding, activation):
        x, weight, bias = _autocast(x, weight, bias)
        return _forward(x, weight, None, bias, None, None, stride, padding, activation, "none", 0.0)

    @backend.register_impl("bn_act", name)
    def _bn_act(x, bn_weight, bn_bias, running_mean, running_var, *, activation, training, momentum, eps):
        # Under autocast BatchNorm runs in its input's dtype, so nothing is cast here.
        return _conv_bn_act(x, None, bn_weight, bn_bias, running_mean, running_var, 1, 0, activation, training,
                            momentum, eps)


for _name in ("triton", "cuda"):
    define_backend(_name, backend.launcher_loader(_name, "dwconv_bn_act"))
