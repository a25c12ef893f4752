"""Names a YOLOv5 yaml may use in its ``module`` column, and how each takes its arguments.

Kinds (how the parser turns a row ``[from, n, module, args]`` into a constructor call):

=============  ==========================================================================
``conv``       ``module(c1, c2', *args[1:])``, c2' = args[0] scaled by width_multiple
``csp``        like ``conv`` but the repeat count goes in after c2' and the module is
               built once (C3, C3_UIB)
``verbatim``   ``module(c1, *args)``, output channels = args[0] unscaled (Conv3BN,
               MobileNetv3: their yaml gives exact widths)
``channels``   ``module(c1, *args)``, output channels = c1 (e.g. nn.BatchNorm2d)
``passthrough`` ``module(*args)``, output channels = c1 (nn.Upsample, pooling, ...)
``concat``     ``module(*args)``, output channels = the sum of its inputs'
``detect``     ``module(*args, [c1 of each input])``, the detection head (last layer)
=============  ==========================================================================
"""

from __future__ import annotations

from torch import nn

from mobileops.nn import (
    C3,
    C3_UIB,
    SPPF,
    Bottleneck,
    Concat,
    Conv,
    Conv3BN,
    Detect,
    MobileNetv3,
    UniversalInvertedBottleneckBlock,
)

KINDS = ("conv", "csp", "verbatim", "channels", "passthrough", "concat", "detect")

_REGISTRY: dict[str, tuple[type, str]] = {}


def register(name: str, cls: type, kind: str) -> None:
    """Make ``name`` usable in yaml files, built as ``cls`` following ``kind`` (see module doc).

    Registering an existing name replaces it.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register: name must be a non-empty string, got {name!r}")
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"register: cls must be an nn.Module subclass, got {cls!r}")
    if kind not in KINDS:
        raise ValueError(f"register: kind must be one of {', '.join(KINDS)}; got {kind!r}")
    _REGISTRY[name] = (cls, kind)


def lookup(name: str) -> tuple[type, str]:
    """(class, kind) registered under ``name``; KeyError listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown module {name!r}; known modules: {', '.join(sorted(_REGISTRY))} "
                       "(add your own with mobileops.yolo.register)") from None


def known_modules() -> tuple[str, ...]:
    """All registered names, sorted."""
    return tuple(sorted(_REGISTRY))


for _cls in (Conv, Bottleneck, SPPF):
    register(_cls.__name__, _cls, "conv")
for _cls in (C3, C3_UIB):
    register(_cls.__name__, _cls, "csp")
for _cls in (Conv3BN, MobileNetv3, UniversalInvertedBottleneckBlock):
    register(_cls.__name__, _cls, "verbatim")
register("Concat", Concat, "concat")
register("Detect", Detect, "detect")
register("nn.BatchNorm2d", nn.BatchNorm2d, "channels")
for _cls in (nn.Upsample, nn.Identity, nn.MaxPool2d, nn.AvgPool2d):
    register(f"nn.{_cls.__name__}", _cls, "passthrough")
