"""The ``triton`` backend of :func:`~mobileops.ops.squeeze_excite`.

Two ``torch.library`` custom ops with fake implementations (``torch.compile(fullgraph=True)``
traces them): ``mobileops::squeeze_excite_triton`` returns the output plus the per-sample pooled
means and gates, which its registered autograd saves, and
``mobileops::squeeze_excite_triton_backward`` computes every gradient from x, those two small
tensors and the output gradient. Kernels: ``kernels/squeeze_excite.py``, imported on first use.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from mobileops import backend
from mobileops.ops import _checks


def _kernels():
    from mobileops.kernels import squeeze_excite as kernels

    return kernels


def _stats_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _like_x(x: Tensor) -> Tensor:
    return torch.empty(x.shape, device=x.device, dtype=x.dtype, memory_format=_checks.suggest_memory_format(x))


@torch.library.custom_op("mobileops::squeeze_excite_triton", mutates_args=())
def _forward(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
             fc2_bias: Optional[Tensor], gate: str, post_act: str) -> Tuple[Tensor, Tensor, Tensor]:
    return _kernels().forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, out=_like_x(x), gate=gate,
                              post_act=post_act)


@_forward.register_fake
def _forward_fake(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gate, post_act):
    per_sample = x.new_empty(x.shape[:2], dtype=_stats_dtype(x))
    return _like_x(x), per_sample, torch.empty_like(per_sample)


@torch.library.custom_op("mobileops::squeeze_excite_triton_backward", mutates_args=())
def _backward_op(dy: Tensor, x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
                 fc2_bias: Optional[Tensor], pooled: Tensor, gates: Tensor, gate: str,
                 post_act: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dx, dw1, db1, dw2, db2 = _kernels().backward(
        dy, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pooled, gates, gate=gate, post_act=post_act,
        memory_format=_checks.suggest_memory_format(x))
    # an absent bias gets its own empty tensor: outputs of a custom op may not alias each other
    return dx, dw1, db1 if db1 is not None else x.new_empty(0), dw2, db2 if db2 is not None else x.new_empty(0)


@_backward_op.register_fake
def _backward_fake(dy, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pooled, gates, gate, post_act):
    def like(t):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None else x.new_empty(0)

    return _like_x(x), like(fc1_weight), like(fc1_bias), like(fc2_weight), like(fc2_bias)


def _setup_context(ctx, inputs, output):
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gate, post_act = inputs
    _, pooled, gates = output
    ctx.mark_non_differentiable(pooled, gates)
    ctx.save_for_backward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pooled, gates)
    ctx.config = (gate, post_act)


def _autograd_backward(ctx, dy, _d_pooled, _d_gates):
    # pooled and gates are returned only to be saved here; nothing downstream uses them.
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pooled, gates = ctx.saved_tensors
    dx, dw1, db1, dw2, db2 = _backward_op(dy, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pooled, gates,
                                          *ctx.config)
    needs = ctx.needs_input_grad
    grads = (dx, dw1, db1 if fc1_bias is not None else None, dw2, db2 if fc2_bias is not None else None)
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None, None)


torch.library.register_autograd("mobileops::squeeze_excite_triton", _autograd_backward,
                                setup_context=_setup_context)


@backend.register_impl("squeeze_excite", "triton")
def _squeeze_excite_triton(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, gate, post_act):
    return _forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gate, post_act)[0]
