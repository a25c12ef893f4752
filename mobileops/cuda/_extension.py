"""What every CUDA launcher needs: the extension module, dtype and activation codes, tensor
checks, pointers, strides and the current stream."""

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


def _device_type() -> str:
    return "cpu" if EMULATION is not None else "cuda"


def check_tensor(op: str, name: str, t: torch.Tensor | None, device: torch.device,
                 dtype: torch.dtype | None = None, dim: int | None = None) -> None:
    """Raise ValueError/TypeError unless ``t`` (if given) is on ``device`` with ``dtype``/``dim``."""
    if t is None:
        return
    if t.device != device:
        raise ValueError(f"{op} (cuda backend): {name} is on {t.device}, expected {device}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{op} (cuda backend): {name} has dtype {t.dtype}, expected {dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{op} (cuda backend): {name} must be {dim}-D, got shape {tuple(t.shape)}")


def dtype_code(op: str, x: torch.Tensor) -> int:
    """The kernels' dtype code of ``x``, which must be a floating CUDA tensor."""
    if x.dtype not in DTYPE_CODES:
        raise TypeError(f"{op} (cuda backend): unsupported dtype {x.dtype} (float32, float16, bfloat16, float64)")
    if x.device.type != _device_type():
        raise ValueError(f"{op} (cuda backend): tensors must be on a CUDA device, got {x.device}")
    return DTYPE_CODES[x.dtype]


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
