"""The YOLOv5 detection loss (anchor-based), written from the published method.

Targets are rows ``[image_index, class, x, y, w, h]`` with the box centre and size normalised
to the image (0-1). For every head level the targets are matched to anchors whose width and
height ratios to the box are all within ``anchor_t`` (4.0), and each match is also assigned to
the two neighbouring grid cells nearest the box centre, so up to three cells per anchor predict
a box. Per matched cell the box loss is ``1 - CIoU`` of the decoded prediction
(``xy = 2 sigmoid - 0.5`` cells, ``wh = (2 sigmoid)^2 * anchor``) against the target; the
objectness target is that (detached, clamped) IoU and zero elsewhere, with a BCE-with-logits
loss weighted per level by ``balance`` (4.0, 1.0, 0.4 for P3-P5); classes use BCE-with-logits
against one-hot targets (optionally label-smoothed) when there is more than one class. The
three parts are scaled by their gains (box 0.05, obj 1.0, cls 0.5 by default: YOLOv5's
``hyp.scratch-low``) and their sum by the batch size.

One deliberate difference: where several matches land in the same cell and anchor, the
objectness target is the largest of their IoUs (a deterministic scatter-max); YOLOv5 writes
them in an unspecified order unless ``sort_obj_iou`` is set, which also yields the largest on
the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mobileops.nn.detect import Detect

#: Objectness weight per head level, finest first (YOLOv5's values for 3 and 5 levels).
BALANCE = {3: (4.0, 1.0, 0.4), 5: (4.0, 1.0, 0.25, 0.06, 0.02)}

# A match is also given to the neighbouring cell on a side whose centre is within half a cell.
_NEIGHBOUR_OFFSETS = ((0, 0), (1, 0), (0, 1), (-1, 0), (0, -1))


def bbox_ciou(box1: Tensor, box2: Tensor, eps: float = 1e-7) -> Tensor:
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


class YOLOv5Loss(nn.Module):
    """YOLOv5's detection loss for a model ending in :class:`~mobileops.nn.detect.Detect`.

    Args:
        head: the model's Detect head (its ``anchors`` are in grid units, ``na`` per level).
        box_gain, obj_gain, cls_gain: weights of the three parts (``hyp.scratch-low``).
        anchor_t: largest allowed ratio between a target's and an anchor's width or height.
        balance: objectness weight per level; default :data:`BALANCE` for 3 or 5 levels.
        label_smoothing: class-target smoothing ``eps`` (targets 1 - eps/2 and eps/2).
        iou_ratio: objectness target ``(1 - r) + r * IoU`` (YOLOv5's ``gr``, 1.0).

    Call with the head's training-mode output (one (bs, na, ny, nx, nc + 5) tensor per level)
    and the targets (nt, 6); returns ``(loss, parts)``: the scalar to backpropagate (already
    multiplied by the batch size, as YOLOv5 does) and the detached ``[box, obj, cls]``.
    """

    def __init__(self, head: Detect, *, box_gain: float = 0.05, obj_gain: float = 1.0, cls_gain: float = 0.5,
                 anchor_t: float = 4.0, balance: Sequence[float] | None = None, label_smoothing: float = 0.0,
                 iou_ratio: float = 1.0):
        super().__init__()
        if not isinstance(head, Detect):
            raise TypeError(f"YOLOv5Loss: head must be a Detect module, got {type(head).__name__}")
        if balance is None:
            if head.nl not in BALANCE:
                raise ValueError(f"YOLOv5Loss: no default balance for {head.nl} levels; pass balance=")
            balance = BALANCE[head.nl]
        if len(balance) != head.nl:
            raise ValueError(f"YOLOv5Loss: balance has {len(balance)} entries for {head.nl} levels")
        if not anchor_t > 1:
            raise ValueError(f"YOLOv5Loss: anchor_t must be > 1, got {anchor_t!r}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"YOLOv5Loss: label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.head = head
        self.nc, self.na, self.nl = head.nc, head.na, head.nl
        self.box_gain, self.obj_gain, self.cls_gain = box_gain, obj_gain, cls_gain
        self.anchor_t, self.balance = anchor_t, tuple(balance)
        self.cls_pos, self.cls_neg = 1.0 - 0.5 * label_smoothing, 0.5 * label_smoothing
        self.iou_ratio = iou_ratio

    @classmethod
    def for_model(cls, model: nn.Module, img_size: int = 640, **kwargs) -> YOLOv5Loss:
        """The loss for ``model`` with YOLOv5 ``train.py``'s gain scaling: box by 3/nl, cls by
        nc/80 * 3/nl, obj by (img_size/640)^2 * 3/nl (``kwargs`` override the base gains)."""
        head = model.model[-1] if hasattr(model, "model") else model
        if not isinstance(head, Detect):
            raise TypeError("YOLOv5Loss.for_model: the model must end in a Detect head")
        scale = 3 / head.nl
        gains = dict(box_gain=0.05, obj_gain=1.0, cls_gain=0.5)
        gains.update({k: kwargs.pop(k) for k in list(kwargs) if k in gains})
        return cls(head, box_gain=gains["box_gain"] * scale, cls_gain=gains["cls_gain"] * head.nc / 80 * scale,
                   obj_gain=gains["obj_gain"] * (img_size / 640) ** 2 * scale, **kwargs)

    def forward(self, predictions: list[Tensor], targets: Tensor) -> tuple[Tensor, Tensor]:
        self._check(predictions, targets)
        device = predictions[0].device
        lbox, lobj, lcls = (torch.zeros((), device=device, dtype=torch.float32) for _ in range(3))
        for level, (p, match) in enumerate(zip(predictions, self.build_targets(predictions, targets))):
            b, a, gj, gi, tbox, anchors, tcls = match
            tobj = torch.zeros(p.shape[:4], device=device, dtype=torch.float32)
            if b.numel():
                selected = p[b, a, gj, gi].float()
                pxy = selected[:, :2].sigmoid() * 2 - 0.5
                pwh = (selected[:, 2:4].sigmoid() * 2) ** 2 * anchors
                iou = bbox_ciou(torch.cat((pxy, pwh), 1), tbox)
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

    def _check(self, predictions, targets) -> None:
        if not isinstance(predictions, (list, tuple)) or len(predictions) != self.nl:
            raise ValueError(f"YOLOv5Loss: expected the head's {self.nl} training-mode outputs, got "
                             f"{type(predictions).__name__}")
        for p in predictions:
            if not isinstance(p, Tensor) or p.dim() != 5 or p.shape[1] != self.na or p.shape[4] != self.nc + 5:
                shape = tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__
                raise ValueError(f"YOLOv5Loss: each output must be (bs, {self.na}, ny, nx, {self.nc + 5}), got {shape}")
        if not isinstance(targets, Tensor) or targets.dim() != 2 or targets.shape[1] != 6:
            shape = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
            raise ValueError(f"YOLOv5Loss: targets must be (nt, 6) rows [image, class, x, y, w, h], got {shape}")
        if targets.numel():
            def out_of_range(column, upper):
                values = targets[:, column]
                return ((values < 0) | (values >= upper) | (values != values.round())).any()

            # one host sync per call for both columns (targets usually live on the GPU)
            bad = torch.stack((out_of_range(0, predictions[0].shape[0]), out_of_range(1, self.nc))).tolist()
            if bad[0]:
                raise ValueError("YOLOv5Loss: target image indices must be integers in [0, batch size)")
            if bad[1]:
                raise ValueError(f"YOLOv5Loss: target classes must be integers in [0, {self.nc})")


__all__ = ["BALANCE", "YOLOv5Loss", "bbox_ciou"]
