"""One kernel op, two ways in: a ``torch.library`` custom op for tracing, a direct call in eager.

The custom ops (with fake implementations and registered autograd) are what
``torch.compile``, ``torch.export`` and meta-device runs need. In plain eager mode their
dispatch (schema binding, autograd wrapper, redispatch) costs more host time than a fused
kernel takes on the GPU at many real layer shapes, so eager calls run the same Python body
directly, through a ``torch.autograd.Function`` when a gradient is needed. Both ways launch
the same kernels with the same arguments, so results are bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from mobileops.ops._checks import needs_grad


def eager(x: Tensor) -> bool:
    """Whether a call on ``x`` runs a kernel op's body directly. Fake, functional and other
    tensor subclasses, the meta device and dynamo tracing all go through the custom op, which
    knows how to be traced."""
    return type(x) is Tensor and not x.is_meta and not torch.compiler.is_compiling()


class KernelOp:
    """A kernel entry point callable like its custom op.

    Args:
        name: the custom op's qualified name, e.g. ``"mobileops::squeeze_excite_triton"``.
        body: the implementation.
        schema: the custom op's schema, e.g. ``"(Tensor x, str gate) -> Tensor"`` (one string per op,
            shared by its backends, so their bodies can be one function bound to each backend's
            launchers).
        mutates_args: arguments ``body`` writes in place (as for ``torch.library.custom_op``).
        fake: the fake (meta) implementation.
        setup_context, backward: the autograd formula, as for ``torch.library.register_autograd``
            (None: not differentiable).
    """

    def __init__(self, name: str, body: Callable, *, schema: str, mutates_args=(), fake: Callable,
                 setup_context: Callable = None, backward: Callable = None):
        self.name = name
        self.body = body
        self.custom_op = torch.library.custom_op(name, body, mutates_args=mutates_args, schema=schema)
        self.custom_op.register_fake(fake)
        self.function = None
        if backward is not None:
            torch.library.register_autograd(name, backward, setup_context=setup_context)

            def forward(ctx, *args):
                # ctx-taking forward: with a separate setup_context, Function.apply binds its
                # arguments through inspect.signature on every call.
                output = body(*args)
                setup_context(ctx, args, output)
                return output

            self.function = type(f"{name.split('::')[-1]}_function", (torch.autograd.Function,),
                                 dict(forward=staticmethod(forward), backward=staticmethod(backward)))
            self._apply = fast_apply(self.function)

    def __call__(self, *args):
        if not eager(args[0]):
            return self.custom_op(*args)
        if self.function is not None and needs_grad(*args):
            if self._apply is not None and not torch._C._are_functorch_transforms_active():
                return self._apply(*args)
            return self.function.apply(*args)
        return self.body(*args)


def fast_apply(function: type):
    """``function``'s C++ ``apply``, or None where this torch lacks it. ``Function.apply`` adds
    Python around it (about 5 us a call here) for functorch transforms and ``setup_context``
    functions, neither of which an eager call without transforms uses."""
    base = getattr(torch._C, "_FunctionBase", None)
    apply = None if base is None else base.__dict__.get("apply")
    return None if apply is None else apply.__get__(None, function)


__all__ = ["KernelOp", "eager", "fast_apply"]
