"""What every CUDA launcher needs: the extension module, dtype and activation codes, pointers,
strides and the current stream. Tensors are validated by the ops (:mod:`mobileops.ops`) and
each launch's arguments by the binding (``csrc/binding.cpp``), so nothing here checks them."""

from __future__ import annotations

import torch

# The launchers read the codes as ext.ACTIVATION_CODES / ext.NORM_CODES (re-exported).
from mobileops.codes import ACTIVATION_CODES as ACTIVATION_CODES
from mobileops.codes import DTYPE_CODES as _DTYPE_NAME_CODES
from mobileops.codes import NORM_CODES as NORM_CODES

DTYPE_CODES = {getattr(torch, name): code for name, code in _DTYPE_NAME_CODES.items()}

#: Tests only: a CPU build of csrc/ (tests/cuda_emulation) that stands in for mobileops._C and
#: runs the same kernels on CPU tensors. None in normal use.
EMULATION = None


def extension():
    """The compiled module; ImportError with the reason if it is not built."""
    if EMULATION is not None:
        return EMULATION
    from mobileops import _C  # type: ignore[attr-defined]

    return _C


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulation and per-channel parameter dtype: float64 for float64 tensors, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def as_acc(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A small parameter tensor as a contiguous ``dtype`` tensor (no copy when it already is)."""
    return None if t is None else t.detach().to(dtype).contiguous()


def ptr(t: torch.Tensor | None) -> int:
    """Device address of ``t`` (0 for an absent tensor). ``t`` must stay referenced until the
    launch that reads the address returns."""
    return 0 if t is None else t.data_ptr()


def strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """Element strides of a 4-D tensor."""
    return tuple(t.stride())  # type: ignore[return-value]


def channels_last(t: torch.Tensor) -> bool:
    """Whether to walk ``t`` channels-fastest (its channel stride is the smallest)."""
    return t.dim() == 4 and t.shape[1] > 1 and t.stride(1) == 1 and t.stride(3) != 1


def prepare(x: torch.Tensor) -> int:
    """Make x's device current for the extension's own runtime; return the stream handle."""
    if EMULATION is not None:
        return 0
    extension().set_device(x.device.index if x.device.index is not None else torch.cuda.current_device())
    return torch.cuda.current_stream(x.device).cuda_stream
