"""YOLOv5 building blocks (v6.0+ layout): Conv, Bottleneck, C3, SPPF, Concat.

Constructor signatures and ``state_dict`` keys are YOLOv5's, so its checkpoints load with
``strict=True``; the conv + BN + activation triples run through :mod:`mobileops.ops`.
"""

from __future__ import annotations

import torch
from torch import nn

from mobileops.nn.fused import conv_bn_act
from mobileops.nn.helpers import autopad, check_sizes, fuse_conv_bn, fuse_modules


def _hidden_width(block: str, c2: int, e) -> int:
    """YOLOv5's hidden width ``int(c2 * e)``, which must leave at least one channel."""
    c_ = int(c2 * e)
    if c_ < 1:
        raise ValueError(f"{block}: e={e!r} gives int(c2 * e) = {c_} hidden channels; at least 1 is needed")
    return c_


class Conv(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> activation.

    Args:
        c1, c2: input and output channels.
        k, s: kernel size and stride.
        p: padding, None for "same" (:func:`autopad`).
        g, d: groups and dilation.
        act: True for SiLU, an ``nn.Module`` to use it, anything else for no activation.
    """

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, d=1, act=True):
        super().__init__()
        check_sizes("Conv", c1=c1, c2=c2, k=k, s=s, g=g, d=d)
        if p is not None:
            check_sizes("Conv", 0, p=p)
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU() if act is True else act if isinstance(act, nn.Module) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_bn_act(x, self.conv, self._modules.get("bn"), self.act)

    def fuse(self) -> Conv:
        """Fold ``bn`` into ``conv`` for inference (the ``bn`` key disappears)."""
        fuse_conv_bn(self, "conv", "bn")
        return self


class Bottleneck(nn.Module):
    """YOLOv5 bottleneck: 1x1 Conv -> 3x3 Conv, plus the input when ``shortcut`` and c1 == c2.

    Args:
        c1, c2: input and output channels.
        shortcut: add the input (only possible when c1 == c2).
        g: groups of the 3x3 conv.
        e: hidden width ratio, c_ = int(c2 * e).
    """

    def __init__(self, c1, c2, shortcut=True, g=1, e=0.5):
        super().__init__()
        check_sizes("Bottleneck", c1=c1, c2=c2)
        c_ = _hidden_width("Bottleneck", c2, e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_, c2, 3, 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y

    def fuse(self) -> Bottleneck:
        """Fold every BN of the block into its conv."""
        return fuse_modules(self)


class CSPBlock(nn.Module):
    """YOLOv5's CSP layout shared by C3 and C3_UIB: ``cv3(cat(m(cv1(x)), cv2(x)))``.

    Args:
        c1, c2: input and output channels.
        e: hidden width ratio, c_ = int(c2 * e).
        n: number of bottlenecks in ``m``.
        make_bottleneck: builds one bottleneck of width c_ -> c_ from c_.
    """

    def __init__(self, c1, c2, e, n, make_bottleneck):
        super().__init__()
        block = type(self).__name__
        check_sizes(block, c1=c1, c2=c2)
        check_sizes(block, 0, n=n)
        c_ = _hidden_width(block, c2, e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(make_bottleneck(c_) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))

    def fuse(self) -> CSPBlock:
        """Fold every BN of the block into its conv."""
        return fuse_modules(self)


class C3(CSPBlock):
    """CSP bottleneck with 3 convolutions: ``cv3(cat(m(cv1(x)), cv2(x)))``.

    Args:
        c1, c2: input and output channels.
        n: number of Bottlenecks in ``m``.
        shortcut, g: passed to each Bottleneck.
        e: hidden width ratio, c_ = int(c2 * e).
    """

    def __init__(self, c1, c2, n=1, shortcut=True, g=1, e=0.5):
        super().__init__(c1, c2, e, n, lambda c_: Bottleneck(c_, c_, shortcut, g, e=1.0))


class SPPF(nn.Module):
    """Spatial pyramid pooling (fast): three chained k x k max-pools concatenated.

    Args:
        c1, c2: input and output channels.
        k: max-pool kernel size.
    """

    def __init__(self, c1, c2, k=5):
        super().__init__()
        check_sizes("SPPF", 2, c1=c1)  # halved for the hidden width
        check_sizes("SPPF", c2=c2, k=k)
        if k % 2 == 0:
            raise ValueError(f"SPPF: k must be odd (a k x k max-pool with padding k // 2 keeps the size "
                             f"only then), got {k}")
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))

    def fuse(self) -> SPPF:
        """Fold every BN of the block into its conv."""
        return fuse_modules(self)


class Concat(nn.Module):
    """Concatenate a list of tensors along ``dimension``."""

    def __init__(self, dimension=1):
        super().__init__()
        self.d = dimension

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(x, self.d)
