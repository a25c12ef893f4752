"""The YOLOv5 loss as mobileops computed it until 2026-12 (boolean-mask target matching, one
set of ops per head level, host syncs): the reference the static-shape, sync-free
:class:`mobileops.yolo.loss.YOLOv5Loss` is checked against (same values within float32
rounding). Not part of the library."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def reference_ciou(box1: Tensor, box2: Tensor, eps: float = 1e-7) -> Tensor:
    """Complete IoU of boxes given as (..., 4) ``x, y, w, h`` (centre and size), elementwise.

    CIoU = IoU - (centre distance^2 / enclosing-box diagonal^2) - alpha * v, with
    ``v = 4/pi^2 (atan(w2/h2) - atan(w1/h1))^2`` the aspect-ratio term and
    ``alpha = v / (v - IoU + 1)`` treated as a constant (no gradient), as in the CIoU paper.
    Returns a (...,) tensor.
    """
    x1, y1, w1, h1 = box1.unbind(-1)
    x2, y2, w2, h2 = box2.unbind(-1)
    h1, h2 = h1.clamp(min=eps), h2.clamp(min=eps)
    b1_x1, b1_x2, b1_y1, b1_y2 = x1 - w1 / 2, x1 + w1 / 2, y1 - h1 / 2, y1 + h1 / 2
    b2_x1, b2_x2, b2_y1, b2_y2 = x2 - w2 / 2, x2 + w2 / 2, y2 - h2 / 2, y2 + h2 / 2
    inter = (torch.minimum(b1_x2, b2_x2) - torch.maximum(b1_x1, b2_x1)).clamp(min=0) * \
        (torch.minimum(b1_y2, b2_y2) - torch.maximum(b1_y1, b2_y1)).clamp(min=0)
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    cw = torch.maximum(b1_x2, b2_x2) - torch.minimum(b1_x1, b2_x1)
    ch = torch.maximum(b1_y2, b2_y2) - torch.minimum(b1_y1, b2_y1)
    diagonal2 = cw ** 2 + ch ** 2 + eps
    centre2 = (x2 - x1) ** 2 + (y2 - y1) ** 2
    v = (4 / math.pi ** 2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)) ** 2
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (centre2 / diagonal2 + v * alpha)


_NEIGHBOUR_OFFSETS = ((0, 0), (1, 0), (0, 1), (-1, 0), (0, -1))


class BooleanMaskLoss(nn.Module):
    """The earlier loss with the settings (head, gains, balance, smoothing) of ``loss``, a
    :class:`mobileops.yolo.loss.YOLOv5Loss`; called like it."""

    def __init__(self, loss):
        super().__init__()
        self.head = loss.head
        self.nc, self.na, self.nl = loss.nc, loss.na, loss.nl
        self.box_gain, self.obj_gain, self.cls_gain = loss.box_gain, loss.obj_gain, loss.cls_gain
        self.anchor_t, self.balance = loss.anchor_t, loss.balance
        self.cls_pos, self.cls_neg = loss.cls_pos, loss.cls_neg
        self.iou_ratio = loss.iou_ratio

    def forward(self, predictions: list[Tensor], targets: Tensor) -> tuple[Tensor, Tensor]:
        device = predictions[0].device
        lbox, lobj, lcls = (torch.zeros((), device=device, dtype=torch.float32) for _ in range(3))
        for level, (p, match) in enumerate(zip(predictions, self.build_targets(predictions, targets))):
            b, a, gj, gi, tbox, anchors, tcls = match
            tobj = torch.zeros(p.shape[:4], device=device, dtype=torch.float32)
            if b.numel():
                selected = p[b, a, gj, gi].float()
                pxy = selected[:, :2].sigmoid() * 2 - 0.5
                pwh = (selected[:, 2:4].sigmoid() * 2) ** 2 * anchors
                iou = reference_ciou(torch.cat((pxy, pwh), 1), tbox)
                lbox = lbox + (1.0 - iou).mean()
                score = iou.detach().clamp(min=0)
                score = (1.0 - self.iou_ratio) + self.iou_ratio * score
                flat = ((b * self.na + a) * p.shape[2] + gj) * p.shape[3] + gi
                tobj.view(-1).scatter_reduce_(0, flat, score, reduce="amax", include_self=True)
                if self.nc > 1:
                    t = torch.full_like(selected[:, 5:], self.cls_neg)
                    t[torch.arange(b.numel(), device=device), tcls] = self.cls_pos
                    lcls = lcls + F.binary_cross_entropy_with_logits(selected[:, 5:], t)
            lobj = lobj + F.binary_cross_entropy_with_logits(p[..., 4].float(), tobj) * self.balance[level]
        lbox, lobj, lcls = lbox * self.box_gain, lobj * self.obj_gain, lcls * self.cls_gain
        batch = predictions[0].shape[0]
        return (lbox + lobj + lcls) * batch, torch.stack((lbox, lobj, lcls)).detach()

    def build_targets(self, predictions: list[Tensor], targets: Tensor):
        """Per level ``(image, anchor, gj, gi, target box, anchor wh, class)`` of every match:
        target boxes as (x offset in its cell, y offset, w, h) in grid units."""
        device = predictions[0].device
        targets = targets.to(device=device, dtype=torch.float32)
        nt = targets.shape[0]
        anchor_index = torch.arange(self.na, device=device, dtype=torch.float32).view(self.na, 1).expand(self.na, nt)
        # (na, nt, 7): every target once per anchor, its anchor index last
        per_anchor = torch.cat((targets.expand(self.na, nt, 6), anchor_index[..., None]), 2)
        offsets = torch.tensor(_NEIGHBOUR_OFFSETS, device=device, dtype=torch.float32) * 0.5
        out = []
        for level, p in enumerate(predictions):
            anchors = self.head.anchors[level].to(device=device, dtype=torch.float32)
            ny, nx = p.shape[2], p.shape[3]
            gain = torch.tensor([1, 1, nx, ny, nx, ny, 1], device=device, dtype=torch.float32)
            t = per_anchor * gain
            if nt:
                ratio = t[..., 4:6] / anchors[:, None]
                t = t[torch.maximum(ratio, 1 / ratio).amax(2) < self.anchor_t]
                gxy = t[:, 2:4]
                gxy_inverse = gain[[2, 3]] - gxy
                left, top = ((gxy % 1 < 0.5) & (gxy > 1)).T
                right, bottom = ((gxy_inverse % 1 < 0.5) & (gxy_inverse > 1)).T
                keep = torch.stack((torch.ones_like(left), left, top, right, bottom))
                t = t[None].expand(5, -1, -1)[keep]
                shift = offsets[:, None].expand(5, gxy.shape[0], 2)[keep]
            else:
                t = per_anchor[0]
                shift = torch.zeros_like(t[:, 2:4])
            b, c = t[:, 0].long(), t[:, 1].long()
            gxy, gwh, a = t[:, 2:4], t[:, 4:6], t[:, 6].long()
            gij = (gxy - shift).long()
            gi, gj = gij[:, 0].clamp(0, nx - 1), gij[:, 1].clamp(0, ny - 1)
            tbox = torch.cat((gxy - torch.stack((gi, gj), 1), gwh), 1)
            out.append((b, a, gj, gi, tbox, anchors[a], c))
        return out
