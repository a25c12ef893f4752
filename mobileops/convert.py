"""Convert an existing model's blocks to mobileops' drop-in modules, keeping its state.

>>> report = mobileops.convert(model)        # in place; returns what was replaced
>>> print(report)

Recognised, by class name (a user's own seed classes and :mod:`mobileops.reference`'s ``Ref*``
twins): YOLOv5 ``Conv``, ``Bottleneck``, ``C3``, ``SPPF``, ``C3_UIB``,
``UniversalInvertedBottleneckBlock``, ``MobileNetv3``, ``SELayer`` and ``Conv3BN``. Each is
rebuilt as the mobileops class with constructor arguments read off its layers, then its
``state_dict`` (weights and running statistics) is loaded with ``strict=True`` and its
BatchNorm ``eps``/``momentum``, training mode, device, dtype and memory format are restored;
attributes a training framework hung on the module (YOLOv5's ``f``, ``i``, ``type``, ``np``)
are carried over. A block whose structure does not match is left as it is and listed under
``skipped`` with the reason.

Plain ``nn.Sequential`` containers holding a depthwise ``Conv2d`` -> ``BatchNorm2d`` ->
activation run become :class:`FusedSequential` (same children, same keys), which runs each
such run as one fused op. Forward hooks registered on a replaced block are not carried over.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from mobileops import ops
from mobileops.nn import mobilenetv3, uib, yolov5
from mobileops.nn.activation import activation_name
from mobileops.nn.fused import conv_bn_act, is_same_padded_depthwise


class FusedSequential(nn.Sequential):
    """An ``nn.Sequential`` that runs each depthwise ``Conv2d`` -> ``BatchNorm2d`` ->
    activation run of its children as one fused op (the other children as they are).
    Children, ``state_dict`` keys and results are those of the ``nn.Sequential`` it replaces."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = list(self._modules.values())
        i = 0
        while i < len(layers):
            run = _fusable_run(layers, i)
            if run:
                act = layers[i + 2] if run == 3 else None
                x = conv_bn_act(x, layers[i], layers[i + 1], act)
                i += run
            else:
                x = layers[i](x)
                i += 1
        return x


def _fusable_run(layers: list[nn.Module], i: int) -> int:
    """3 (conv, BN, activation), 2 (conv, BN) or 0 for the run starting at ``layers[i]``."""
    if not (is_same_padded_depthwise(layers[i]) and layers[i].bias is None
            and i + 1 < len(layers) and type(layers[i + 1]) is nn.BatchNorm2d):
        return 0
    if i + 2 < len(layers) and activation_name(layers[i + 2]) in ops.ACTIVATIONS:
        return 3
    return 2


@dataclass
class ConversionReport:
    """What :func:`convert` did: ``(path, old class, new class)`` per replaced module and
    ``(path, class, reason)`` per recognised module left alone."""

    replaced: list[tuple[str, str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    model: nn.Module | None = field(default=None, repr=False)

    def __str__(self) -> str:
        lines = [f"replaced {len(self.replaced)} module(s)"]
        lines += [f"  {path or '<root>'}: {old} -> {new}" for path, old, new in self.replaced]
        if self.skipped:
            lines.append(f"left {len(self.skipped)} recognised module(s) as they were")
            lines += [f"  {path or '<root>'}: {name}: {reason}" for path, name, reason in self.skipped]
        return "\n".join(lines)


# ------------------------------------------------------------------ constructor arguments


def _square(value) -> int:
    if value[0] != value[1]:
        raise ValueError(f"non-square {value}")
    return int(value[0])


def _ratio(part: int, whole: int) -> float:
    """An ``e`` with ``int(whole * e) == part`` despite float rounding (the blocks truncate)."""
    return (part + 0.5) / whole


def _conv_args(m):
    conv = m.conv
    if conv.bias is not None:
        raise ValueError("its conv has a bias")
    act = m.act
    act = True if type(act) is nn.SiLU else False if type(act) is nn.Identity else copy.deepcopy(act)
    return (conv.in_channels, conv.out_channels, _square(conv.kernel_size), _square(conv.stride),
            _square(conv.padding), conv.groups, _square(conv.dilation), act)


def _bottleneck_args(m):
    c1, c2 = m.cv1.conv.in_channels, m.cv2.conv.out_channels
    return (c1, c2, bool(m.add), m.cv2.conv.groups, _ratio(m.cv1.conv.out_channels, c2))


def _c3_args(m):
    c1, c2 = m.cv1.conv.in_channels, m.cv3.conv.out_channels
    first = m.m[0] if len(m.m) else None
    shortcut = bool(getattr(first, "add", True))
    groups = first.cv2.conv.groups if first is not None and hasattr(first, "cv2") else 1
    return (c1, c2, len(m.m), shortcut, groups, _ratio(m.cv1.conv.out_channels, c2))


def _c3_uib_args(m):
    c1, c2 = m.cv1.conv.in_channels, m.cv3.conv.out_channels
    return (c1, c2, len(m.m), True, 1, _ratio(m.cv1.conv.out_channels, c2))


def _sppf_args(m):
    k = m.m.kernel_size
    return (m.cv1.conv.in_channels, m.cv2.conv.out_channels, k if isinstance(k, int) else _square(k))


def _uib_args(m):
    start = getattr(m, "_start_dw_", None) if m.start_dw_kernel_size else None
    middle = getattr(m, "_middle_dw", None) if m.middle_dw_kernel_size else None
    inp = (start or m._expand_conv).conv.in_channels
    hidden = m._expand_conv.conv.out_channels
    start_stride = _square(start.conv.stride) if start is not None else 1
    middle_stride = _square(middle.conv.stride) if middle is not None else 1
    downsample = 0 if start_stride > 1 else 1
    stride = max(start_stride, middle_stride)
    return (inp, m._proj_conv.conv.out_channels, m.start_dw_kernel_size, m.middle_dw_kernel_size, downsample,
            stride, hidden / inp)


def _mobilenetv3_args(m):
    layers = list(m.conv)
    convs = [layer for layer in layers if type(layer) is nn.Conv2d]
    depthwise = next(c for c in convs if c.groups > 1 and c.groups == c.in_channels)
    names = {type(layer).__name__ for layer in m.conv.modules()}
    use_se = bool(names & {"SELayer", "RefSELayer"})
    use_hs = bool(names & {"h_swish", "RefHSwish"})
    return (convs[0].in_channels, convs[-1].out_channels, depthwise.in_channels, _square(depthwise.kernel_size),
            _square(depthwise.stride), use_se, use_hs)


def _se_args(m):
    first = m.fc[0]
    return (first.in_features, first.in_features // first.out_features)


def _conv3bn_args(m):
    return (m.conv.in_channels, m.conv.out_channels, _square(m.conv.stride))


#: seed class name -> (mobileops class, reader of its positional constructor arguments)
CONVERTERS: dict[str, tuple[type, Callable]] = {
    "Conv": (yolov5.Conv, _conv_args),
    "Bottleneck": (yolov5.Bottleneck, _bottleneck_args),
    "C3": (yolov5.C3, _c3_args),
    "SPPF": (yolov5.SPPF, _sppf_args),
    "C3_UIB": (uib.C3_UIB, _c3_uib_args),
    "UniversalInvertedBottleneckBlock": (uib.UniversalInvertedBottleneckBlock, _uib_args),
    "MobileNetv3": (mobilenetv3.MobileNetv3, _mobilenetv3_args),
    "SELayer": (mobilenetv3.SELayer, _se_args),
    "Conv3BN": (mobilenetv3.Conv3BN, _conv3bn_args),
}
_REFERENCE_NAMES = {"RefConv": "Conv", "RefBottleneck": "Bottleneck", "RefC3": "C3", "RefSPPF": "SPPF",
                    "RefC3UIB": "C3_UIB", "RefUIB": "UniversalInvertedBottleneckBlock",
                    "RefMobileNetv3": "MobileNetv3", "RefSELayer": "SELayer", "RefConv3BN": "Conv3BN"}


def _converter(module: nn.Module) -> tuple[type, Callable] | None:
    name = type(module).__name__
    target = CONVERTERS.get(_REFERENCE_NAMES.get(name, name))
    if target is None or type(module) is target[0]:
        return None  # not a seed block, or already the mobileops one
    return target


def _rebuild(module: nn.Module, target: type, read_args: Callable) -> nn.Module:
    new = target(*read_args(module))
    state = module.state_dict()
    # Give every tensor the original's dtype and device before loading: loading a float64
    # state into the float32 module that the constructor builds would round it.
    floating = next((t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()), None)
    if floating is not None:
        new.to(device=floating.device, dtype=floating.dtype)
    for name, tensor in [*new.named_parameters(), *new.named_buffers()]:
        old = state.get(name)
        if old is not None and (tensor.dtype != old.dtype or tensor.device != old.device):
            tensor.data = torch.empty_like(tensor, dtype=old.dtype, device=old.device)
    new.load_state_dict(state, strict=True)
    old_modules = dict(module.named_modules())
    for name, bn in new.named_modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            old = old_modules.get(name)
            if not isinstance(old, nn.modules.batchnorm._BatchNorm):
                raise ValueError(f"no BatchNorm at {name!r} in the original")
            bn.eps, bn.momentum = old.eps, old.momentum  # not in state_dict (YOLOv5 sets 1e-3, 0.03)
    if any(t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
           for t in module.parameters()):
        new.to(memory_format=torch.channels_last)
    for p_new, p_old in zip(new.parameters(), module.parameters()):
        p_new.requires_grad_(p_old.requires_grad)
    new.train(module.training)
    for key, value in vars(module).items():
        # bookkeeping a framework hung on the block (YOLOv5: f, i, type, np; its "type" shadows
        # Module.type as an instance attribute, so methods may be shadowed, properties not)
        if not key.startswith("_") and key != "training" and key not in vars(new) \
                and not isinstance(getattr(type(new), key, None), property):
            setattr(new, key, value)
    return new


def convert(model: nn.Module, inplace: bool = True) -> ConversionReport:
    """Replace every recognised block of ``model`` by its mobileops equivalent.

    Args:
        model: any ``nn.Module`` tree (a YOLOv5 model with the seed blocks, a backbone, an
            ``nn.Sequential`` of layers...). A recognised root module cannot be replaced in
            place; convert its parent or pass ``inplace=False`` and use ``report.model``.
        inplace: modify ``model`` (default) or a deep copy of it.

    Returns:
        A :class:`ConversionReport`; ``report.model`` is the converted model (``model`` itself
        when ``inplace``). Outputs, ``state_dict`` keys, training mode, device and dtype are
        those of the model before conversion.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"convert: inplace must be a bool, got {type(inplace).__name__}")
    root = model if inplace else copy.deepcopy(model)
    report = ConversionReport()
    target = _converter(root)
    if target is not None:
        if inplace:
            raise ValueError(f"convert: the model itself is a {type(root).__name__}, which cannot be replaced in "
                             "place; call convert(model, inplace=False) and use report.model")
        try:
            root = _rebuild(root, *target)
            report.replaced.append(("", type(model).__name__, type(root).__name__))
        except Exception as error:  # any mismatch leaves the block as it was
            report.skipped.append(("", type(root).__name__, f"{type(error).__name__}: {error}"))
    else:
        _convert_children(root, "", report)
    report.model = root
    return report


def _convert_children(parent: nn.Module, prefix: str, report: ConversionReport) -> None:
    if type(parent) is nn.Sequential and any(_fusable_run(list(parent), i) for i in range(len(parent))):
        parent.__class__ = FusedSequential  # same children and keys, fused forward
        report.replaced.append((prefix, "Sequential", "FusedSequential"))
    for name, child in list(parent.named_children()):
        path = f"{prefix}.{name}" if prefix else name
        target = _converter(child)
        if target is None:
            _convert_children(child, path, report)
            continue
        try:
            new = _rebuild(child, *target)
        except Exception as error:  # any mismatch leaves the block as it was
            report.skipped.append((path, type(child).__name__, f"{type(error).__name__}: {error}"))
            _convert_children(child, path, report)
            continue
        setattr(parent, name, new)
        report.replaced.append((path, type(child).__name__, type(new).__name__))


__all__ = ["CONVERTERS", "ConversionReport", "FusedSequential", "convert"]
