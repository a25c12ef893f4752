"""YOLOv5's anchor-based detection head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Detect(nn.Module):
    """Per level, a 1x1 conv to ``na * (nc + 5)`` channels, decoded in eval mode.

    Args:
        nc: number of classes.
        anchors: per level a flat list of (w, h) pairs in pixels, e.g. ``[10,13, 16,30, 33,23]``.
        ch: input channels of each level.
        inplace: accepted for YOLOv5 compatibility (decoding never writes into its input).

    Training mode returns the list of raw ``(bs, na, ny, nx, nc + 5)`` maps. Eval mode returns
    ``(decoded, raw list)`` with ``decoded`` of shape ``(bs, sum(na * ny * nx), nc + 5)``:
    all sigmoid, ``xy = (2 s - 0.5 + grid) * stride``, ``wh = (2 s)^2 * anchor`` in pixels.
    Until :meth:`set_strides` has been called (the detector does it) eval returns the raw list.
    ``anchors`` is stored in units of each level's stride, like YOLOv5.
    """

    def __init__(self, nc=80, anchors=(), ch=(), inplace=True):
        super().__init__()
        if not isinstance(nc, int) or isinstance(nc, bool) or nc < 1:
            raise ValueError(f"Detect: nc must be a positive integer, got {nc!r}")
        if (not isinstance(anchors, (list, tuple)) or not anchors
                or not all(isinstance(a, (list, tuple)) and a and len(a) % 2 == 0 for a in anchors)
                or len({len(a) for a in anchors}) != 1):
            raise ValueError("Detect: anchors must be a non-empty list of levels, each a flat list "
                             f"of (w, h) pairs, all levels with the same count; got {anchors!r}")
        if len(ch) != len(anchors):
            raise ValueError(f"Detect: {len(anchors)} anchor levels but {len(ch)} input levels {list(ch)}")
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.inplace = inplace
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32).view(self.nl, -1, 2))
        # Not persistent: YOLOv5 checkpoints have no stride key; the detector recomputes it.
        self.register_buffer("stride", torch.zeros(self.nl), persistent=False)
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)
        self.strides_ready = False

    def set_strides(self, strides: Sequence[float]) -> None:
        """Record each level's stride in pixels (enables eval-mode decoding)."""
        self.stride = torch.as_tensor(strides, dtype=self.stride.dtype, device=self.stride.device)
        self.strides_ready = True

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        if len(x) != self.nl:
            raise ValueError(f"Detect: expected {self.nl} feature maps, got {len(x)}")
        raw, decoded = [], []
        for i in range(self.nl):
            y = self.m[i](x[i])
            bs, _, ny, nx = y.shape
            y = y.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            raw.append(y)
            if not self.training and self.strides_ready:
                decoded.append(self._decode(y, i))
        if self.training or not self.strides_ready:
            return raw
        return torch.cat(decoded, 1), raw

    def _decode(self, y: torch.Tensor, i: int) -> torch.Tensor:
        bs, na, ny, nx, no = y.shape
        yv, xv = torch.meshgrid(torch.arange(ny, device=y.device, dtype=y.dtype),
                                torch.arange(nx, device=y.device, dtype=y.dtype), indexing="ij")
        grid = torch.stack((xv, yv), 2).view(1, 1, ny, nx, 2) - 0.5
        stride = self.stride[i].to(y.dtype)
        anchor_grid = (self.anchors[i].to(y.dtype) * stride).view(1, na, 1, 1, 2)
        xy, wh, conf = y.sigmoid().split((2, 2, self.nc + 1), 4)
        xy = (xy * 2 + grid) * stride
        wh = (wh * 2) ** 2 * anchor_grid
        return torch.cat((xy, wh, conf), 4).view(bs, na * ny * nx, no)
