"""Call plans: what a fused-op call decides from its signature, decided once per signature.

Validating the arguments, choosing the backend and normalising the options depend only on the
call's *signature*: each tensor's shape, strides, dtype, device and ``requires_grad``, the
options, grad mode, the backend selection and autocast. The first call with a signature does
all of it and stores a :class:`Plan`; a repeated call builds the signature key, finds the plan
with one dictionary lookup and runs it, checking per call only what depends on values
(momentum, eps, and whether in-place outputs share memory with the inputs).

A plan may hold more than a choice: an :class:`Implementation` can *bind* itself to a
signature (:func:`bind`), deciding then what the general call would decide again each time (an
inference call's output size and strides, its kernel op's eager dispatch), so that a repeated
call is the key, the lookup, an allocation and the launch.

Calls that must not be cached take the full path every time: tensor subclasses (fake and
functional tensors while tracing), ``torch.compile`` tracing, TorchScript tracing and ONNX
export, and :func:`mobileops.backend.record_calls`. :func:`mobileops.backend.forget_choices`
clears every plan.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from mobileops import backend
from mobileops.ops._checks import InPlaceCheck, autocast_on_for

#: A cache holding more plans than this is emptied and starts again (a model sees a few dozen
#: signatures; thousands mean shapes that vary call after call, where a plan is not reused).
MAX_PLANS = 4096


class Plan(NamedTuple):
    """The decisions for one call signature.

    Attributes:
        impl: the chosen backend's implementation of the op.
        options: keyword arguments for ``impl`` fixed by the signature (normalised stride,
            padding, activation...).
        in_place: for a call that updates running statistics in place, the check that they
            share no memory with the other tensors, run on every call (addresses change); else
            None.
    """

    impl: Callable
    options: dict
    in_place: InPlaceCheck | None = None


class Implementation:
    """A fused backend's implementation of an op, callable as registered with
    :func:`mobileops.backend.register_impl`, that can bind itself to one call signature.

    Args:
        call: the general implementation, for any signature.
        prepare: called with a signature's first call (its arguments, then the plan's options as
            keywords), returns a callable taking the op's per-call arguments without those options
            (they are bound), or None where the general call is all there is (training, tracing,
            autocast...). What it returns must do exactly what ``call`` does for every call of that
            signature: same launches, same arguments, bit-identical results.
    """

    __slots__ = ("call", "prepare")

    def __init__(self, call: Callable, prepare: Callable):
        self.call = call
        self.prepare = prepare

    def __call__(self, *args, **kwargs):
        return self.call(*args, **kwargs)


def bind(impl: Callable, args: tuple, options: dict, in_place: InPlaceCheck | None = None) -> Plan:
    """The plan of a signature whose first call passed ``args`` and whose implementation
    ``impl`` takes ``options`` as keywords: ``impl`` bound to the signature where it is an
    :class:`Implementation` that can be, else ``impl`` itself."""
    if not isinstance(impl, Implementation):
        return Plan(impl, options, in_place)
    bound = impl.prepare(*args, **options)
    return Plan(impl.call, options, in_place) if bound is None else Plan(bound, {}, in_place)


def call_key(x, tensors: tuple, options: tuple):
    """The signature key of a call on input ``x``, other tensor arguments ``tensors`` (each may
    be None) and hashable ``options`` (include each option's type: ``2.0 == 2`` and ``True == 1``
    hash alike); None when this call must take the full path."""
    if (type(x) is not Tensor or backend._recorders or torch.compiler.is_compiling()
            or backend.exporting()):
        return None
    try:
        # One comprehension: this runs on every call, and each tensor attribute costs ~0.1 us.
        signature = tuple([None if t is None else (t.shape, t.stride(), t.dtype, t.device, t.requires_grad)
                           for t in tensors])
    except AttributeError:  # not a tensor: the full path says which argument is wrong
        return None
    autocast = autocast_on_for(x)
    # auto takes the kernels under CUDA-graph capture
    context = (autocast, torch.cuda.is_current_stream_capturing()) if x.is_cuda else (autocast,)
    if autocast:
        context += (torch.get_autocast_dtype(x.device.type),)
    return (x.shape, x.stride(), x.dtype, x.device, x.requires_grad, signature, options, torch.is_grad_enabled(),
            backend.get_backend(), context)


def lookup(cache: dict, key) -> Plan | None:
    """The plan stored under ``key`` (None for no key, an unknown one or an unhashable option)."""
    if key is None:
        return None
    try:
        return cache.get(key)
    except TypeError:  # an unhashable option (a list...): the full path reports what is wrong
        return None


def remember(cache: dict, key, plan: Plan) -> Plan:
    """Store ``plan`` under ``key`` (unless there is no key) and return it."""
    if key is not None:
        if len(cache) >= MAX_PLANS:
            cache.clear()
        try:
            cache[key] = plan
        except TypeError:
            pass
    return plan


__all__ = ["MAX_PLANS", "Implementation", "Plan", "bind", "call_key", "lookup", "remember"]
