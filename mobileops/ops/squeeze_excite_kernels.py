"""The ``triton`` and ``cuda`` backends of :func:`~mobileops.ops.squeeze_excite` (shared
wiring; the launchers are :mod:`mobileops.kernels.squeeze_excite` and
:mod:`mobileops.cuda.squeeze_excite`, imported on first use).

Per backend ``B``, two ``torch.library`` custom ops with fake implementations
(``torch.compile(fullgraph=True)`` traces them): ``mobileops::squeeze_excite_B`` returns the
output plus the per-sample pooled means and gates, which its registered autograd saves, and
``mobileops::squeeze_excite_B_backward`` computes every gradient from x, those two small tensors
and the output gradient. Eager calls run the same code without the custom-op dispatch
(:mod:`mobileops.ops._dispatch`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from mobileops import backend
from mobileops.ops import _checks
from mobileops.ops._dispatch import KernelOp


def _stats_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _like_x(x: Tensor) -> Tensor:
    return torch.empty(x.shape, device=x.device, dtype=x.dtype, memory_format=_checks.suggest_memory_format(x))


def define_backend(name: str, load_kernels: Callable[[], Any]) -> None:
    """Define the two custom ops for backend ``name`` and register its ``squeeze_excite``.

    ``load_kernels()`` returns the launcher module (``forward``, ``backward``; see
    :mod:`mobileops.kernels.squeeze_excite`), imported on first use.
    """

    def _forward_body(x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor,
                      fc2_bias: Tensor | None, gate: str, post_act: str) -> tuple[Tensor, Tensor, Tensor]:
        return load_kernels().forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, out=_like_x(x), gate=gate,
                                      post_act=post_act)

    def _forward_fake(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gate, post_act):
        per_sample = x.new_empty(x.shape[:2], dtype=_stats_dtype(x))
        return _like_x(x), per_sample, torch.empty_like(per_sample)

    def _backward_body(dy: Tensor, x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor,
                       fc2_bias: Tensor | None, pooled: Tensor, gates: Tensor, gate: str,
                       post_act: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        dx, dw1, db1, dw2, db2 = load_kernels().backward(
            dy, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pooled, gates, gate=gate, post_act=post_act,
            memory_format=_checks.suggest_memory_format(x))
        # an absent bias gets its own empty tensor: outputs of a custom op may not alias each other
        return dx, dw1, db1 if db1 is not None else x.new_empty(0), dw2, db2 if db2 is not None else x.new_empty(0)

    def _backward_fake(dy, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pooled, gates, gate, post_act):
        def like(t):
            return torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None else x.new_empty(0)

        return _like_x(x), like(fc1_weight), like(fc1_bias), like(fc2_weight), like(fc2_bias)

    _backward_op = KernelOp(f"mobileops::squeeze_excite_{name}_backward", _backward_body, fake=_backward_fake)

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

    _forward = KernelOp(f"mobileops::squeeze_excite_{name}", _forward_body, fake=_forward_fake,
                        setup_context=_setup_context, backward=_autograd_backward)

    @backend.register_impl("squeeze_excite", name)
    def _squeeze_excite(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, gate, post_act):
        return _forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gate, post_act)[0]


for _name in ("triton", "cuda"):
    define_backend(_name, backend.launcher_loader(_name, "squeeze_excite"))
