"""Squeeze-and-Excitation: pool, FC -> ReLU -> FC -> gate, rescale, optional activation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mobileops import backend
from mobileops.ops import _checks, _plan
from mobileops.ops.activation import GATES, check_activation
from mobileops.ops.activation import activation as apply_activation


def squeeze_excite(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor | None,
                   fc2_weight: torch.Tensor, fc2_bias: torch.Tensor | None, *,
                   gate: str = "hsigmoid", post_act: str = "none") -> torch.Tensor:
    """``post_act(x * gate(fc2(relu(fc1(mean_hw(x))))))`` with a per-(sample, channel) gate.

    Args:
        x: input (N, C, H, W), floating, NCHW or channels_last.
        fc1_weight, fc1_bias: the squeeze layer in ``nn.Linear`` layout, (R, C) and (R,) or None.
        fc2_weight, fc2_bias: the excite layer, (C, R) and (C,) or None.
        gate: ``"hsigmoid"`` (MobileNetV3) or ``"sigmoid"``.
        post_act: activation applied after the rescale (the seed MobileNetV3 expand branch
            applies SE before its activation); one of the names of :func:`dwconv_bn_act`.

    Returns:
        Tensor shaped like ``x`` in its dtype and memory format.
    """
    key = _plan.call_key(x, (fc1_weight, fc1_bias, fc2_weight, fc2_bias), (gate, post_act))
    plan = _plan.lookup(_PLANS, key)
    if plan is None:
        plan = _plan.remember(_PLANS, key, _squeeze_excite_plan(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gate,
                                                                post_act))
    return plan.impl(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, **plan.options)


_PLANS = backend.plan_cache()


def _squeeze_excite_plan(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gate, post_act) -> _plan.Plan:
    """Validate a call signature of :func:`squeeze_excite` and choose its implementation."""
    op = "squeeze_excite"
    _checks.check_input(op, x)
    channels = x.shape[1]
    if not isinstance(fc1_weight, torch.Tensor) or fc1_weight.dim() != 2:
        raise ValueError(f"{op}: fc1_weight must be a 2-D (R, C) tensor")
    reduced = fc1_weight.shape[0]
    _checks.check_tensor(op, "fc1_weight", fc1_weight, (reduced, channels), x, same_dtype=True)
    _checks.check_tensor(op, "fc1_bias", fc1_bias, (reduced,), x, optional=True, same_dtype=True)
    _checks.check_tensor(op, "fc2_weight", fc2_weight, (channels, reduced), x, same_dtype=True)
    _checks.check_tensor(op, "fc2_bias", fc2_bias, (channels,), x, optional=True, same_dtype=True)
    check_activation(gate, "gate", GATES, op)
    check_activation(post_act, "post_act", op=op)
    inference = not _checks.needs_grad(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    impl = backend.resolve(op, x.device, inference=inference, numel=x.numel())
    return _plan.bind(impl, (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias), dict(gate=gate, post_act=post_act))


@backend.register_impl("squeeze_excite", "torch")
def _squeeze_excite_torch(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, gate, post_act):
    pooled = x.mean(dim=(2, 3))
    hidden = F.relu(F.linear(pooled, fc1_weight, fc1_bias))
    scale = apply_activation(F.linear(hidden, fc2_weight, fc2_bias), gate)
    return apply_activation(x * scale[:, :, None, None], post_act)
