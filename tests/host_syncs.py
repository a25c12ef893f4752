"""Dispatch-mode probes for a training step: which aten ops it runs, and whether any of them
makes the host wait for the device's data (a host synchronisation). They see every op a
step dispatches, on any device, so a CPU run proves what a GPU run would do."""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops whose result (or output shape) depends on tensor values, so the host must read them.
_SYNC_OPS = {
    aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default, aten.allclose.default,
    aten.nonzero.default, aten.nonzero_numpy.default, aten.argwhere.default, aten.masked_select.default,
    aten._unique.default, aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
    aten.unique_dim_consecutive.default, aten.bincount.default, aten.histc.default,
}


def _is_bool_index(indices) -> bool:
    return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)


def sync_reason(func, args, kwargs) -> str | None:
    """Why ``func(*args, **kwargs)`` would make the host wait for device data, or None."""
    if func in _SYNC_OPS:
        return "reads tensor values on the host"
    if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default) and _is_bool_index(args[1]):
        return "boolean-mask indexing (its output shape depends on the mask)"
    if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return "repeat_interleave without output_size"
    if func in (aten._to_copy.default, aten.copy_.default):
        source = args[1] if func is aten.copy_.default else args[0]
        target = args[0].device if func is aten.copy_.default else kwargs.get("device") or source.device
        if (source.device.type == "cpu") != (torch.device(target).type == "cpu"):
            return f"a copy between {source.device} and {target}"
    return None


class HostSyncError(AssertionError):
    """An op that synchronises with the host ran under :class:`ForbidHostSyncs`."""


class ForbidHostSyncs(TorchDispatchMode):
    """Raises :class:`HostSyncError` at the first op that would synchronise with the host."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = sync_reason(func, args, kwargs)
        if reason is not None:
            raise HostSyncError(f"{func}: {reason}")
        return func(*args, **kwargs)


class CountOps(TorchDispatchMode):
    """Counts the aten ops dispatched (views included) in ``counts``, by op."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())
