"""MobileNetV4's Universal Inverted Bottleneck (as used in YOLOv5 ``C3_UIB``) and ``C3_UIB``.

Defaults reproduce the seed block that users' checkpoints come from: a plain sequence with
no residual connection. The official MobileNetV4 behaviour is opt-in; see
:class:`UniversalInvertedBottleneckBlock`.
"""

from __future__ import annotations

import torch
from torch import nn

from mobileops.nn.fused import conv_bn_act
from mobileops.nn.helpers import check_sizes, fuse_conv_bn, fuse_modules, make_divisible
from mobileops.nn.yolov5 import CSPBlock


class ConvBN(nn.Sequential):
    """The seed's ``conv_2d`` unit: children ``conv`` (no bias), ``BatchNorm2d`` and, when
    ``act``, ``Activation`` (ReLU6), run as one fused op.

    Args:
        inp, oup: input and output channels.
        kernel_size, stride, groups: of the convolution; padding is ``(kernel_size - 1) // 2``.
        act: append the ReLU6 activation.
    """

    def __init__(self, inp, oup, kernel_size=3, stride=1, groups=1, act=True):
        super().__init__()
        self.add_module("conv", nn.Conv2d(inp, oup, kernel_size, stride, (kernel_size - 1) // 2,
                                          groups=groups, bias=False))
        self.add_module("BatchNorm2d", nn.BatchNorm2d(oup))
        if act:
            self.add_module("Activation", nn.ReLU6())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_bn_act(x, self.conv, self._modules.get("BatchNorm2d"), self._modules.get("Activation"))

    def fuse(self) -> ConvBN:
        """Fold ``BatchNorm2d`` into ``conv`` (the ``BatchNorm2d`` keys disappear)."""
        fuse_conv_bn(self, "conv", "BatchNorm2d")
        return self


class LayerScale(nn.Module):
    """Per-channel learnable scale ``x * gamma`` (MobileNetV4 layer scale)."""

    def __init__(self, channels: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((channels,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.view(1, -1, 1, 1).to(x.dtype)


class UniversalInvertedBottleneckBlock(nn.Module):
    """MobileNetV4 Universal Inverted Bottleneck, seed-compatible.

    ``[start depthwise + BN] -> 1x1 expand + BN + ReLU6 -> [middle depthwise + BN + ReLU6]
    -> 1x1 project + BN``.

    Args:
        inp, oup: input and output channels.
        start_dw_kernel_size: kernel of the optional first depthwise conv (0 = none).
        middle_dw_kernel_size: kernel of the optional middle depthwise conv (0 = none).
        middle_dw_downsample: put the stride on the middle depthwise conv (else on the start one).
        stride: spatial stride of the block.
        expand_ratio: hidden width ``make_divisible(inp * expand_ratio, 8)``.

    Keyword-only options giving the official MobileNetV4 behaviour (all off by default, so
    outputs and ``state_dict`` keys match the seed block):
        residual: add the input when ``stride == 1`` and ``inp == oup`` (official: always on).
        layer_scale_init_value: if set, scale the output per channel by a learnable
            ``layer_scale.gamma`` initialised to this value (official: 1e-5) before the residual.
        check_stride: raise ValueError when ``stride > 1`` but the depthwise conv meant to
            carry it is absent (the seed silently drops the stride then).

    Not offered: the official optional end depthwise conv, stochastic depth and a
    configurable activation.
    """

    def __init__(self, inp, oup, start_dw_kernel_size=3, middle_dw_kernel_size=3,
                 middle_dw_downsample=1, stride=1, expand_ratio=1, *, residual: bool = False,
                 layer_scale_init_value: float | None = None, check_stride: bool = False):
        super().__init__()
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride must be a positive integer, got {stride!r}")
        block = "UniversalInvertedBottleneckBlock"
        check_sizes(block, inp=inp, oup=oup)
        check_sizes(block, 0, start_dw_kernel_size=start_dw_kernel_size, middle_dw_kernel_size=middle_dw_kernel_size)
        if isinstance(expand_ratio, bool) or not isinstance(expand_ratio, (int, float)) or not expand_ratio > 0:
            raise ValueError(f"{block}: expand_ratio must be a number > 0, got {expand_ratio!r}")
        if check_stride and stride > 1:
            carrier = middle_dw_kernel_size if middle_dw_downsample else start_dw_kernel_size
            if not carrier:
                where = "middle" if middle_dw_downsample else "start"
                raise ValueError(f"stride {stride} needs the {where} depthwise conv, but "
                                 f"{where}_dw_kernel_size is {carrier!r}")
        self.start_dw_kernel_size = start_dw_kernel_size
        self.middle_dw_kernel_size = middle_dw_kernel_size
        if start_dw_kernel_size:
            s = 1 if middle_dw_downsample else stride
            self._start_dw_ = ConvBN(inp, inp, start_dw_kernel_size, s, groups=inp, act=False)
        expand = make_divisible(inp * expand_ratio, 8)
        self._expand_conv = ConvBN(inp, expand, 1)
        if middle_dw_kernel_size:
            s = stride if middle_dw_downsample else 1
            self._middle_dw = ConvBN(expand, expand, middle_dw_kernel_size, s, groups=expand)
        self._proj_conv = ConvBN(expand, oup, 1, act=False)
        if layer_scale_init_value is not None:
            self.layer_scale = LayerScale(oup, layer_scale_init_value)
        self.use_residual = bool(residual) and stride == 1 and inp == oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.start_dw_kernel_size:
            y = self._start_dw_(y)
        y = self._expand_conv(y)
        if self.middle_dw_kernel_size:
            y = self._middle_dw(y)
        y = self._proj_conv(y)
        if "layer_scale" in self._modules:
            y = self.layer_scale(y)
        return x + y if self.use_residual else y

    def fuse(self) -> UniversalInvertedBottleneckBlock:
        """Fold every BN of the block into its conv."""
        return fuse_modules(self)


class C3_UIB(CSPBlock):  # the seed's class name
    """YOLOv5 C3 with its bottlenecks replaced by Universal Inverted Bottlenecks.

    ``cv3(cat(m(cv1(x)), cv2(x)))`` with ``m`` = ``n`` x ``UniversalInvertedBottleneckBlock(c_, c_)``.

    Args:
        c1, c2: input and output channels.
        n: number of UIBs.
        shortcut, g: accepted for signature compatibility with C3 and **ignored** (seed
            behaviour), unless ``use_shortcut``.
        e: hidden width ratio, c_ = int(c2 * e).
        use_shortcut: keyword-only; when True, ``shortcut`` turns on each UIB's residual.
    """

    def __init__(self, c1, c2, n=1, shortcut=True, g=1, e=0.5, *, use_shortcut: bool = False):
        residual = bool(use_shortcut and shortcut)
        super().__init__(c1, c2, e, n, lambda c_: UniversalInvertedBottleneckBlock(c_, c_, residual=residual))
