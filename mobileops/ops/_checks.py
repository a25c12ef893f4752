"""Argument validation shared by the fused ops: every error names the argument at fault."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def autocast_on(device: torch.device) -> bool:
    if device.type == "meta":  # autocast has no meta device (and asking raises)
        return False
    try:
        return torch.is_autocast_enabled(device.type)
    except TypeError:  # torch versions whose is_autocast_enabled takes no device type
        return torch.is_autocast_enabled() if device.type == "cuda" else torch.is_autocast_cpu_enabled()


def autocast_on_for(x: torch.Tensor) -> bool:
    """``autocast_on(x.device)``, quicker on CPU and CUDA tensors (reading ``x.device.type``
    costs about a microsecond, and this runs on every call)."""
    kind = "cuda" if x.is_cuda else "cpu" if x.is_cpu else None
    if kind is None:
        return autocast_on(x.device)
    try:
        return torch.is_autocast_enabled(kind)
    except TypeError:
        return autocast_on(x.device)


def needs_grad(*args) -> bool:
    """Whether autograd will record a call on ``args`` (grad mode on and some tensor among
    them requires grad; other arguments are ignored)."""
    return torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def check_input(op: str, x) -> None:
    """``x`` must be a floating (N, C, H, W) tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be a 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: x must be float16, bfloat16, float32 or float64, got {x.dtype}")


def check_tensor(op: str, name: str, t, shape: Sequence[int], x: torch.Tensor, *,
                 optional: bool = False, same_dtype: bool = False) -> None:
    """``t`` must be a floating tensor of ``shape`` on ``x``'s device (or None if ``optional``).

    ``same_dtype`` requires ``x``'s dtype unless autocast is active (it casts for us).
    """
    if t is None:
        if optional:
            return
        raise TypeError(f"{op}: {name} is required, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.shape != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)} to match x of shape "
                         f"{tuple(x.shape)}, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be a floating tensor, got {t.dtype}")
    if same_dtype and t.dtype != x.dtype and not autocast_on(x.device):
        raise TypeError(f"{op}: {name} has dtype {t.dtype} but x has {x.dtype}; cast one of them "
                        "or run under torch.autocast")


def _is_real(value) -> bool:
    # A plain float first: the ABC check is several times slower, and this runs on every call.
    return type(value) is float or isinstance(value, numbers.Real)


def check_bn_tensors(op: str, x: torch.Tensor, bn_weight, bn_bias, running_mean, running_var,
                     training: bool) -> None:
    """BatchNorm tensors: per-channel (each may be None), running statistics both given or
    both absent, and a bool ``training``."""
    channels = (x.shape[1],)
    for name, t in (("bn_weight", bn_weight), ("bn_bias", bn_bias),
                    ("running_mean", running_mean), ("running_var", running_var)):
        check_tensor(op, name, t, channels, x, optional=True)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: running_mean and running_var must both be given or both be None")
    if not isinstance(training, bool):
        raise TypeError(f"{op}: training must be a bool, got {type(training).__name__}")


def check_bn_scalars(op: str, momentum, eps) -> None:
    """A momentum in [0, 1] and a positive eps (checked on every call: they are values, and a
    module with ``momentum=None`` passes a new one each step)."""
    if not _is_real(momentum) or not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"{op}: momentum must be a number in [0, 1], got {momentum!r}")
    if not _is_real(eps) or not float(eps) > 0.0:
        raise ValueError(f"{op}: eps must be a positive number, got {eps!r}")


def _byte_size(t) -> int:
    """Bytes from ``t``'s first element to one past its last (0 for tensors without memory to
    compare: fake, functional and other subclasses (tracing), the meta device, empty tensors)."""
    if (type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter) or t.is_meta or t.numel() == 0:
        return 0
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):  # dense: no stride walk
        return t.nbytes
    return (sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1) * t.element_size()


class InPlaceCheck:
    """Tensors an op updates in place must not repeat an element (a stride-0 expansion), nor
    share memory with each other or with the op's other tensors: the result would depend on the
    order in which the kernel's threads write. Built once per call signature: what depends only
    on shapes, strides and dtypes (each tensor's byte size, repeated elements) is checked here,
    and a call compares only address ranges. Real tensors only (fake, meta and traced tensors
    have no memory to compare). All tensors must be on one device (the callers check that first).

    Args:
        op: the op's name, for the messages.
        written: name -> tensor updated in place (None entries are skipped).
        read: name -> the other tensors of the call.
    """

    def __init__(self, op: str, written: dict, read: dict):
        self.op = op
        self.written = len(written)
        if torch.compiler.is_compiling():  # traced tensors have no memory (and symbolic sizes)
            self.names, self.sizes = (), ()
            return
        for name, t in written.items():
            if t is not None and not t.is_contiguous() and any(st == 0 and s > 1 for s, st in zip(t.shape, t.stride())):
                raise ValueError(f"{op}: {name} is updated in place, so it must not repeat elements (it has "
                                 f"stride {tuple(t.stride())}, e.g. from expand()); pass a tensor of its own")
        self.names = (*written, *read)
        self.sizes = tuple(0 if t is None else _byte_size(t) for t in (*written.values(), *read.values()))

    def __call__(self, *tensors) -> None:
        """Raise if the written tensors (first) overlap each other or the read ones: ``tensors``
        in the order of the names given to the constructor."""
        if torch.compiler.is_compiling():
            return
        spans = [(name, start, start + size) for name, size, start in
                 zip(self.names, self.sizes, [0 if t is None else t.data_ptr() for t in tensors]) if size]
        for i, (name, begin, end) in enumerate(spans[:self.written]):
            for other, other_begin, other_end in spans[i + 1:]:
                if begin < other_end and other_begin < end:
                    raise ValueError(f"{self.op}: {name} and {other} share memory, but {name} is updated in place; "
                                     "pass separate tensors")


def check_int(op: str, name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{op}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_depthwise_weight(op: str, weight, x: torch.Tensor) -> int:
    """Depthwise weight (C, 1, K, K); returns K."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"{op}: weight must be a 4-D (C, 1, K, K) depthwise kernel, got {shape}")
    k = weight.shape[-1]
    check_tensor(op, "weight", weight, (x.shape[1], 1, k, k), x, same_dtype=True)
    return k


def resolve_padding(op: str, padding: int | None, kernel_size: int) -> int:
    if padding is None:
        return (kernel_size - 1) // 2
    return check_int(op, "padding", padding, 0)


def conv_output_size(size: int, kernel_size: int, stride: int, padding: int) -> int:
    """Output length of a convolution along one spatial dimension."""
    return (size + 2 * padding - kernel_size) // stride + 1


def check_conv_output(op: str, x: torch.Tensor, kernel_size: int, stride: int, padding: int) -> tuple:
    """The (H_out, W_out) of a KxK conv of ``x``; a ValueError if the kernel does not fit."""
    h, w = x.shape[-2:]
    ho, wo = (conv_output_size(s, kernel_size, stride, padding) for s in (h, w))
    if ho < 1 or wo < 1:
        raise ValueError(f"{op}: a {kernel_size}x{kernel_size} kernel with padding {padding} does not "
                         f"fit the input of spatial size {h}x{w}")
    return ho, wo


def check_batch_stats_size(op: str, x_shape, out_hw, batch_stats: bool) -> None:
    """BatchNorm with batch statistics refuses exactly one value per channel, as
    nn.BatchNorm2d does (an empty batch passes: its output is empty too)."""
    count = x_shape[0] * out_hw[0] * out_hw[1]
    if batch_stats and count == 1:
        raise ValueError(f"{op}: BatchNorm with batch statistics needs more than one value per channel; "
                         f"got {count} (batch {x_shape[0]}, spatial output {out_hw[0]}x{out_hw[1]})")


def suggest_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format an op's output should have: channels_last when ``x`` stores channels
    innermost (including strided slices of channels_last tensors), else contiguous."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last) or x.stride(1) < x.stride(3):
        return torch.channels_last
    return torch.contiguous_format


def output_strides(x: torch.Tensor, size) -> tuple[int, ...]:
    """The strides of ``torch.empty(size, memory_format=suggest_memory_format(x))``: an op's
    output, for allocating it with ``torch.empty_strided`` (cheaper per call)."""
    return torch.empty(size, device="meta", dtype=x.dtype, memory_format=suggest_memory_format(x)).stride()

