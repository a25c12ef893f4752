"""BatchNorm + activation, for the dense convolutions whose conv stays on cuDNN/cuBLAS."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mobileops import backend
from mobileops.ops import _checks, _plan
from mobileops.ops.activation import activation as apply_activation
from mobileops.ops.activation import check_activation


def bn_act(x: torch.Tensor, bn_weight: torch.Tensor | None, bn_bias: torch.Tensor | None,
           running_mean: torch.Tensor | None, running_var: torch.Tensor | None, *,
           activation: str = "none", training: bool = False, momentum: float = 0.1,
           eps: float = 1e-5) -> torch.Tensor:
    """BatchNorm over the channels of ``x`` (N, C, H, W), then an activation.

    Arguments and BatchNorm semantics are those of :func:`mobileops.ops.dwconv_bn_act`
    without the convolution. Returns a tensor in ``x``'s dtype and memory format.
    """
    key = _plan.call_key(x, (bn_weight, bn_bias, running_mean, running_var), (activation, training, type(training)))
    plan = _plan.lookup(_PLANS, key)
    if plan is None:
        plan = _plan.remember(_PLANS, key, _bn_act_plan(x, bn_weight, bn_bias, running_mean, running_var, activation,
                                                        training))
    _checks.check_bn_scalars("bn_act", momentum, eps)
    if plan.in_place is not None:
        plan.in_place(running_mean, running_var, x, bn_weight, bn_bias)
    return plan.impl(x, bn_weight, bn_bias, running_mean, running_var, momentum=float(momentum), eps=float(eps),
                     **plan.options)


_PLANS = backend.plan_cache()


def _bn_act_plan(x, bn_weight, bn_bias, running_mean, running_var, activation, training) -> _plan.Plan:
    """Validate a call signature of :func:`bn_act` and choose its implementation."""
    op = "bn_act"
    _checks.check_input(op, x)
    _checks.check_bn_tensors(op, x, bn_weight, bn_bias, running_mean, running_var, training)
    check_activation(activation, op=op)
    batch_stats = training or running_mean is None
    _checks.check_batch_stats_size(op, x.shape, x.shape[2:], batch_stats)
    inference = not batch_stats and not _checks.needs_grad(x, bn_weight, bn_bias)
    impl = backend.resolve(op, x.device, inference=inference, numel=x.numel())
    in_place = None
    if training and running_mean is not None:
        in_place = _checks.InPlaceCheck(op, {"running_mean": running_mean, "running_var": running_var},
                                        {"x": x, "bn_weight": bn_weight, "bn_bias": bn_bias})
    return _plan.bind(impl, (x, bn_weight, bn_bias, running_mean, running_var),
                      dict(activation=activation, training=training), in_place)


@backend.register_impl("bn_act", "torch")
def _bn_act_torch(x, bn_weight, bn_bias, running_mean, running_var, *, activation, training,
                  momentum, eps):
    y = F.batch_norm(x, running_mean, running_var, bn_weight, bn_bias,
                     training or running_mean is None, momentum, eps)
    return apply_activation(y, activation)
