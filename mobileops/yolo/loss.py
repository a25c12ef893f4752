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
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mobileops.nn.detect import Detect

#: Objectness weight per head level, finest first (YOLOv5's values for 3 and 5 levels).
BALANCE = {3: (4.0, 1.0, 0.4), 5: (4.0, 1.0, 0.25, 0.06, 0.02)}

#: The image index of a padding row in a fixed-size target tensor (:func:`pack_targets`).
PADDING = -1.0

# A match is also given to the neighbouring cell on a side whose centre is within half a cell.
_NEIGHBOUR_OFFSETS = ((0, 0), (1, 0), (0, 1), (-1, 0), (0, -1))


def bbox_ciou(box1: Tensor, box2: Tensor, eps: float = 1e-7) -> Tensor:
    """Complete IoU of boxes given as (..., 4) ``x, y, w, h`` (centre and size), elementwise.

    CIoU = IoU - (centre distance^2 / enclosing-box diagonal^2) - alpha * v, with
    ``v = 4/pi^2 (atan(w2/h2) - atan(w1/h1))^2`` the aspect-ratio term and
    ``alpha = v / (v - IoU + 1)`` treated as a constant (no gradient), as in the CIoU paper.
    Sizes are clamped to at least ``eps``. Returns a (...,) tensor.
    """
    return centre_size_ciou(box1[..., :2], box1[..., 2:], box2[..., :2], box2[..., 2:], eps)


def centre_size_ciou(centre1: Tensor, size1: Tensor, centre2: Tensor, size2: Tensor, eps: float = 1e-7) -> Tensor:
    """:func:`bbox_ciou` of boxes given as (..., 2) centres and (..., 2) sizes, which broadcast:
    x and y are computed together, so the loss launches half as many kernels."""
    return _ciou_terms(centre1, size1, centre2, size2, eps).ciou[..., 0]


class _CIoUTerms(NamedTuple):
    """The intermediate values of one CIoU evaluation (:func:`_ciou_terms`) that its gradient
    (:func:`_ciou_gradient`) reads; per-box values keep a trailing dimension of 1."""

    ciou: Tensor
    size1: Tensor      # the raw (unclamped) size of box 1, and clamped
    size1c: Tensor
    low1: Tensor
    high1: Tensor
    low2: Tensor
    high2: Tensor
    overlap_raw: Tensor
    overlap: Tensor
    union: Tensor
    iou: Tensor
    enclosing: Tensor
    diagonal2: Tensor
    distance: Tensor
    distance2: Tensor
    ratio1: Tensor     # w1 / h1
    aspect: Tensor
    alpha: Tensor


def _ciou_terms(centre1: Tensor, size1: Tensor, centre2: Tensor, size2: Tensor, eps: float) -> _CIoUTerms:
    clamped1, size2 = size1.clamp(min=eps), size2.clamp(min=eps)
    half1, half2 = clamped1 * 0.5, size2 * 0.5
    low1, high1, low2, high2 = centre1 - half1, centre1 + half1, centre2 - half2, centre2 + half2
    overlap_raw = torch.minimum(high1, high2) - torch.maximum(low1, low2)
    overlap = overlap_raw.clamp(min=0)
    inter = overlap.prod(-1, keepdim=True)  # (a product of two: the bits of x * y)
    union = clamped1.prod(-1, keepdim=True) + size2.prod(-1, keepdim=True) - inter + eps
    iou = inter / union
    enclosing = torch.maximum(high1, high2) - torch.minimum(low1, low2)
    diagonal2 = (enclosing * enclosing).sum(-1, keepdim=True) + eps
    distance = centre2 - centre1
    distance2 = (distance * distance).sum(-1, keepdim=True)
    ratio1 = clamped1[..., :1] / clamped1[..., 1:]
    aspect = torch.atan(size2[..., :1] / size2[..., 1:]) - torch.atan(ratio1)
    v = (4 / math.pi ** 2) * (aspect * aspect)
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    ciou = iou - (distance2 / diagonal2 + v * alpha)
    return _CIoUTerms(ciou, size1, clamped1, low1, high1, low2, high2, overlap_raw, overlap, union, iou, enclosing,
                      diagonal2, distance, distance2, ratio1, aspect, alpha)


def _ciou_gradient(t: _CIoUTerms, eps: float) -> tuple[Tensor, Tensor]:
    """d CIoU / d (centre1, size1) of box 1, (..., 2) each, from the terms of its evaluation, with
    autograd's subgradients: a lower clamp passes the gradient where its input is at or above
    the bound, a minimum or maximum of two equal values gives each half (a predicted edge on the
    target's: at the optimum the two one-sided derivatives cancel), alpha is a constant."""
    # iou = inter / union, union = area1 + area2 - inter + eps
    d_union = -t.iou / t.union
    d_overlap = ((1 + t.iou) / t.union * t.overlap.flip(-1)) * (t.overlap_raw >= 0)
    # overlap_raw = min(high1, high2) - max(low1, low2), enclosing = max(high) - min(low), through
    # -distance2 / diagonal2: each edge of box 1 feeds one of the two
    d_enclosing = (2 * t.distance2 / (t.diagonal2 * t.diagonal2)) * t.enclosing
    tied = (d_overlap + d_enclosing) * 0.5
    d_high1 = torch.where(t.high1 == t.high2, tied, torch.where(t.high1 < t.high2, d_overlap, d_enclosing))
    # the negative of d CIoU / d low1
    d_low1 = torch.where(t.low1 == t.low2, tied, torch.where(t.low1 > t.low2, d_overlap, d_enclosing))
    d_centre1 = (d_high1 - d_low1) + t.distance * (2 / t.diagonal2)
    # v = k * aspect^2 with aspect = atan(w2 / h2) - atan(w1 / h1), times -alpha
    d_ratio = (t.alpha * t.aspect * (8 / math.pi ** 2)) / (1 + t.ratio1 * t.ratio1) / t.size1c[..., 1:]
    d_w1h1 = torch.cat((d_ratio, -d_ratio * t.ratio1), -1)
    d_size1 = (d_union * t.size1c.flip(-1) + 0.5 * (d_high1 + d_low1) + d_w1h1) * (t.size1 >= eps)
    return d_centre1, d_size1


class YOLOv5Loss(nn.Module):
    """YOLOv5's detection loss for a model ending in :class:`~mobileops.nn.detect.Detect`.

    Args:
        head: the model's Detect head (its ``anchors`` are in grid units, ``na`` per level).
        box_gain, obj_gain, cls_gain: weights of the three parts (``hyp.scratch-low``).
        anchor_t: largest allowed ratio between a target's and an anchor's width or height.
        balance: objectness weight per level; default :data:`BALANCE` for 3 or 5 levels.
        label_smoothing: class-target smoothing ``eps`` (targets 1 - eps/2 and eps/2).
        iou_ratio: objectness target ``(1 - r) + r * IoU`` (YOLOv5's ``gr``, 1.0).
        analytic_gradient: compute the gradient with the loss's value, without autograd (one
            backward pass per call; 252 instead of 320 aten ops at 3 levels). False records the
            loss with autograd instead, for double backward (``create_graph=True``); under
            ``torch.func`` transforms it is recorded with autograd either way.

    Call with the head's training-mode output (one (bs, na, ny, nx, nc + 5) tensor per level)
    and the targets (nt, 6); returns ``(loss, parts)``: the scalar to backpropagate (already
    multiplied by the batch size, as YOLOv5 does) and the detached ``[box, obj, cls]``.
    """

    def __init__(self, head: Detect, *, box_gain: float = 0.05, obj_gain: float = 1.0, cls_gain: float = 0.5,
                 anchor_t: float = 4.0, balance: Sequence[float] | None = None, label_smoothing: float = 0.0,
                 iou_ratio: float = 1.0, analytic_gradient: bool = True):
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
        self.analytic_gradient = analytic_gradient
        self._cache: dict[tuple, _Constants] = {}

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
        batch = self._check(predictions, targets)
        constants = self._constants(predictions)
        if targets.numel() and targets.device.type != "meta":
            self._check_values(targets, batch, constants)
        if (self.analytic_gradient and torch.is_grad_enabled() and any(p.requires_grad for p in predictions)
                and not torch._C._are_functorch_transforms_active()):
            return _LossWithGradient.apply(self, targets, batch, *predictions)
        total, parts, _ = self._terms(predictions, self._match(targets, constants), constants, batch, False)
        return total, parts

    def _terms(self, predictions: list[Tensor], m: Matches, constants: _Constants, batch: int,
               gradient: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """(loss, parts, and with ``gradient`` d loss / d predictions in float32 as one
        (total cells, no) tensor, the levels' cells one after another, else None), all without
        autograd."""
        # Every candidate is computed; invalid ones gather cell 0 of their level, scatter into a
        # spare slot past the last cell and are weighted by zero. Shapes are (levels, na, nt, 5)
        # and a trailing 1 for per-candidate values.
        no = self.nc + 5
        index = m.cell * m.valid
        flat = [p.reshape(-1, no) for p in predictions]  # (a view where the head's output is contiguous)
        rows = torch.cat([f[index[level].view(-1)] for level, f in enumerate(flat)])
        rows = rows.float().view(*m.valid.shape, no)
        valid = m.valid[..., None]
        weight = valid / valid.sum((1, 2, 3), keepdim=True).clamp(min=1)  # each level's matches: mean
        xy_wh = rows[..., :4].sigmoid()
        # a rejected row's box may hold anything (inf, NaN): a benign box in its place, so that
        # nothing non-finite meets the zero weights
        box_xy, box_wh = torch.where(valid, m.box_xy, constants.half), torch.where(valid, m.box_wh, constants.one)
        # the decoded box: xy = 2 s - 0.5 cells, wh = (2 s)^2 anchor (= s^2 * 4 anchor, the same bits)
        anchor4 = m.anchor_wh * 4
        ciou = _ciou_terms(xy_wh[..., :2] * 2 - 0.5, xy_wh[..., 2:] ** 2 * anchor4, box_xy, box_wh, _CIOU_EPS)
        box_weight = weight * self.box_gain
        lbox = ((1.0 - ciou.ciou) * box_weight).sum()
        score = ciou.ciou.detach().clamp(min=0)  # (a target: no gradient when autograd records the loss)
        if self.iou_ratio != 1.0:
            score = (1.0 - self.iou_ratio) + self.iou_ratio * score
        slot = torch.where(m.valid, m.cell + constants.cells_before, constants.spare_slot)
        tobj = torch.zeros(constants.total_cells + 1, device=score.device, dtype=torch.float32)
        tobj = tobj.scatter_reduce(0, slot.view(-1), score.view(-1), reduce="amax", include_self=True)[:-1]
        logits = torch.cat([f[:, 4] for f in flat]).float()  # (cat reads the strided column: no copy first)
        lobj = F.binary_cross_entropy_with_logits(logits, tobj, weight=constants.obj_weight, reduction="sum")
        lobj = lobj * self.obj_gain
        if self.nc > 1:
            target = torch.where(m.cls[:, None] == constants.classes, constants.cls_pos, constants.cls_neg)
            target = target.view(-1, 1, self.nc).expand(rows[..., 5:].shape)
            cls_weight = weight * (self.cls_gain / self.nc)
            lcls = F.binary_cross_entropy_with_logits(rows[..., 5:], target, weight=cls_weight, reduction="sum")
        else:
            lcls = constants.zero
        parts = torch.stack((lbox, lobj, lcls))
        total = parts.sum() * batch
        if not gradient:
            return total, parts, None
        # d total / d (the logits of every row and cell): each part's derivative times the batch
        # size; through xy = 2 s - 0.5 and wh = s^2 * 4 anchor, then the sigmoid's s (1 - s)
        d_centre, d_size = _ciou_gradient(ciou, _CIOU_EPS)
        d_box = torch.cat((d_centre * 2, d_size * (xy_wh[..., 2:] * anchor4 * 2)), -1) * \
            ((box_weight * -batch) * (xy_wh * (1 - xy_wh)))
        # (levels, na, nt, 5, no): the objectness column is zero here and dense below, and so is a
        # one-class model's class column
        zero = torch.zeros_like(d_box[..., :1])
        d_cls = (rows[..., 5:].sigmoid() - target) * (cls_weight * batch) if self.nc > 1 else zero
        d_rows = torch.cat((d_box, zero, d_cls), -1)
        grad = torch.zeros((constants.total_cells, no), device=rows.device, dtype=torch.float32)
        grad[:, 4] = (logits.sigmoid() - tobj) * (constants.obj_weight * (self.obj_gain * batch))
        # matches landing in one cell (and every invalid candidate, on cell 0 with zeros) add up
        grad.index_put_(((index + constants.cells_before).view(-1),), d_rows.view(-1, no), accumulate=True)
        return total, parts, grad

    def build_targets(self, predictions: list[Tensor], targets: Tensor) -> Matches:
        """Every candidate match of every level at once, as :class:`Matches` of static shapes:
        each target against each anchor, in its own cell and the four neighbours, with
        ``valid`` marking the matches YOLOv5 keeps (anchor ratio within ``anchor_t``, the two
        neighbours nearest the centre, not a padding row)."""
        return self._match(targets, self._constants(predictions))

    def _match(self, targets: Tensor, constants: _Constants) -> Matches:
        t = targets.to(device=constants.grid.device, dtype=torch.float32)
        xywh = t[:, 2:6] * constants.grid  # (levels, nt, 4), grid units
        xy, wh = xywh[..., :2], xywh[..., 2:]
        anchors = self.head.anchors.to(device=t.device, dtype=torch.float32)[:, :, None, None]  # (levels, na, 1, 1, 2)
        ratio = wh[:, None] / anchors[..., 0, :]  # (levels, na, nt, 2)
        anchor_ok = torch.maximum(ratio, 1 / ratio).amax(3, keepdim=True) < self.anchor_t
        # left, top, right, bottom: a side whose neighbour's centre is within half a cell; the
        # centre's own cell first
        sides = torch.cat((xy, constants.grid[..., :2] - xy), 2)
        near = F.pad((sides % 1 < 0.5) & (sides > 1), (1, 0), value=True)  # (levels, nt, 5)
        image_class = t[:, :2]
        valid = near[:, None] & anchor_ok & (image_class[:, :1] >= 0)  # (levels, na, nt, 5)
        ij = torch.minimum((xy[:, :, None] - constants.offsets).long().clamp(min=0), constants.last_cell)
        image = image_class.long()
        # (image * na + anchor) * ny * nx + gj * nx + gi: the flat index in the level's grid
        cell = (image[:, :1] * self.na + constants.anchor_index) * constants.cells_per_map + \
            (ij * constants.cell_stride).sum(3)[:, None]
        return Matches(cell=cell, valid=valid, box_xy=(xy[:, :, None] - ij)[:, None], box_wh=wh[:, None, :, None],
                       anchor_wh=anchors, cls=image[:, 1])

    def _constants(self, predictions: list[Tensor]) -> _Constants:
        """The shape-only tensors of a call, made once per (device, prediction shapes): creating
        them from Python numbers is a host-to-device copy, which a captured or sync-free step
        must not make."""
        if torch.compiler.is_compiling():  # constants of the traced graph; a cache entry would retrace
            return _Constants.make(self, predictions)
        key = (predictions[0].device, tuple(tuple(p.shape[:4]) for p in predictions))
        constants = self._cache.get(key)
        if constants is None:
            if len(self._cache) >= 8:  # multi-scale training: a few sizes; never grow without bound
                self._cache.clear()
            constants = self._cache[key] = _Constants.make(self, predictions)
        return constants

    def _check(self, predictions, targets) -> int:
        """Checks the shapes (on the host); returns the batch size."""
        if not isinstance(predictions, (list, tuple)) or len(predictions) != self.nl:
            raise ValueError(f"YOLOv5Loss: expected the head's {self.nl} training-mode outputs, got "
                             f"{type(predictions).__name__}")
        for p in predictions:
            if not isinstance(p, Tensor) or p.dim() != 5 or p.shape[1] != self.na or p.shape[4] != self.nc + 5:
                shape = tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__
                raise ValueError(f"YOLOv5Loss: each output must be (bs, {self.na}, ny, nx, {self.nc + 5}), got {shape}")
            if p.shape[0] != predictions[0].shape[0] or p.device != predictions[0].device:
                raise ValueError("YOLOv5Loss: the outputs must share one batch size and one device")
        if not isinstance(targets, Tensor) or targets.dim() != 2 or targets.shape[1] != 6:
            shape = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
            raise ValueError(f"YOLOv5Loss: targets must be (nt, 6) rows [image, class, x, y, w, h], got {shape}")
        if not targets.is_floating_point():
            raise ValueError(f"YOLOv5Loss: targets must be floating point, got {targets.dtype}")
        return predictions[0].shape[0]

    def _check_values(self, targets: Tensor, batch: int, constants: _Constants) -> None:
        # Asserted on the device, so the host never waits for the targets' values: on the CPU
        # a failure raises here, on a GPU it is a device-side assert.
        low, high = constants.id_range
        image_class = targets[:, :2].to(device=low.device, dtype=low.dtype)
        ok = (image_class == image_class.round()) & (image_class >= low) & (image_class < high)
        ok = ok | (image_class[:, :1] == PADDING)  # (nt, 2): image index, class
        message = (f"YOLOv5Loss: target rows must hold an integer image index in [0, batch size) (-1 for a "
                   f"padding row) and an integer class in [0, {self.nc})")
        if torch.compiler.is_compiling():
            torch._assert_async(ok.all(), message)
            return
        try:
            torch._assert_async(ok.all(), message)
        except RuntimeError:  # on the CPU: which column, read on the host (no device to wait for)
            if not ok[:, 0].all():
                raise ValueError(f"YOLOv5Loss: target image indices must be integers in [0, {batch}) "
                                 "(or -1 for a padding row)") from None
            raise ValueError(f"YOLOv5Loss: target classes must be integers in [0, {self.nc})") from None


#: The CIoU's epsilon in the loss (its default).
_CIOU_EPS = 1e-7


class _LossWithGradient(torch.autograd.Function):
    """The loss and, computed with it, its gradient with respect to each prediction. The loss is
    linear in its upstream gradient (one scalar), so backward scales the stored gradients: a
    handful of ops instead of replaying the ~150 that autograd records for the loss's forward.
    The stored gradient is scaled in place, so in eager mode a graph kept with
    ``retain_graph=True`` cannot be differentiated a second time, and the gradient itself cannot
    be (``create_graph=True``): both raise (``analytic_gradient=False`` records the loss with
    autograd instead)."""

    @staticmethod
    def forward(ctx, loss: YOLOv5Loss, targets: Tensor, batch: int, *predictions: Tensor):
        constants = loss._constants(predictions)
        total, parts, grad = loss._terms(list(predictions), loss._match(targets, constants), constants, batch, True)
        ctx.save_for_backward(grad)
        ctx.levels = [(p.shape, p.dtype) for p in predictions]
        ctx.used = False
        ctx.mark_non_differentiable(parts)
        return total, parts

    @staticmethod
    def backward(ctx, d_total: Tensor, _d_parts: Tensor):
        if torch.is_grad_enabled():  # create_graph=True: the gradient here is no function autograd knows
            raise RuntimeError("YOLOv5Loss: its gradient is computed without autograd, so it has no gradient "
                               "itself (create_graph=True); build the loss with analytic_gradient=False")
        if ctx.used:
            raise RuntimeError("YOLOv5Loss: its gradient was already used by a backward pass; call the loss again")
        ctx.used = True
        grad = ctx.saved_tensors[0].mul_(d_total)
        grads = grad.split([shape[:4].numel() for shape, _ in ctx.levels])
        return (None, None, None, *[g.view(shape) if g.dtype == dtype else g.view(shape).to(dtype)
                                    for g, (shape, dtype) in zip(grads, ctx.levels)])


class Matches(NamedTuple):
    """The candidate matches of :meth:`YOLOv5Loss.build_targets`. Each field broadcasts to
    (levels, na, nt, 5): level, anchor, target, and cell (the centre's, then the left, top,
    right and bottom neighbour); only entries where ``valid`` holds are matches.

    ``cell``: the flat index of (image, anchor, gj, gi) in its level's (bs, na, ny, nx) grid;
    ``box_xy`` / ``box_wh`` (..., 2): the target's centre offset from that cell and its size, in
    grid units; ``anchor_wh`` (..., 2): the anchor; ``cls``: each target's class, (nt,).
    """

    cell: Tensor
    valid: Tensor
    box_xy: Tensor
    box_wh: Tensor
    anchor_wh: Tensor
    cls: Tensor


@dataclass(frozen=True)
class _Constants:
    grid: Tensor             # (levels, 1, 4): nx, ny, nx, ny as floats
    last_cell: Tensor        # (levels, 1, 1, 2): nx - 1, ny - 1
    offsets: Tensor          # (5, 2): the cell shifts of _NEIGHBOUR_OFFSETS, half a cell each
    cell_stride: Tensor      # (levels, 1, 1, 2): 1, nx (gi + gj * nx)
    cells_per_map: Tensor    # (levels, 1, 1, 1): ny * nx
    anchor_index: Tensor     # (na, 1, 1)
    cells_before: Tensor     # (levels, 1, 1, 1): cells of the finer levels
    spare_slot: Tensor       # (): the objectness slot past the last cell, for invalid candidates
    obj_weight: Tensor       # (total cells,): each level's balance over its cell count
    classes: Tensor          # (nc,)
    cls_pos: Tensor          # (): class target values
    cls_neg: Tensor
    zero: Tensor             # (): the class loss of a one-class model
    half: Tensor             # (): 0.5 and 1.0, the benign box of an invalid candidate
    one: Tensor
    id_range: tuple[Tensor, Tensor]  # (2,) each: lowest and past-highest image index and class
    total_cells: int

    @classmethod
    def make(cls, loss: YOLOv5Loss, predictions: list[Tensor]) -> _Constants:
        device, levels = predictions[0].device, len(predictions)
        sizes = [(p.shape[3], p.shape[2]) for p in predictions]  # (nx, ny)
        cells = [p.shape[:4].numel() for p in predictions]
        first = [sum(cells[:level]) for level in range(levels)]

        def tensor(values, dtype=torch.float32):
            return torch.tensor(values, device=device, dtype=dtype)

        obj_weight = torch.cat([torch.full((n,), balance / n, device=device)
                                for n, balance in zip(cells, loss.balance)])
        id_dtype = predictions[0].dtype if predictions[0].dtype == torch.float64 else torch.float32
        return cls(grid=tensor([[nx, ny, nx, ny] for nx, ny in sizes]).view(levels, 1, 4),
                   last_cell=(tensor(sizes, torch.long) - 1).view(levels, 1, 1, 2),
                   offsets=tensor(_NEIGHBOUR_OFFSETS) * 0.5,
                   cell_stride=tensor([[1, nx] for nx, _ in sizes], torch.long).view(levels, 1, 1, 2),
                   cells_per_map=tensor([nx * ny for nx, ny in sizes], torch.long).view(levels, 1, 1, 1),
                   anchor_index=torch.arange(loss.na, device=device).view(loss.na, 1, 1),
                   cells_before=tensor(first, torch.long).view(levels, 1, 1, 1),
                   spare_slot=tensor(sum(cells), torch.long), obj_weight=obj_weight,
                   classes=torch.arange(loss.nc, device=device), cls_pos=tensor(loss.cls_pos),
                   cls_neg=tensor(loss.cls_neg), zero=tensor(0.0), half=tensor(0.5), one=tensor(1.0),
                   id_range=(tensor([PADDING, 0], id_dtype), tensor([predictions[0].shape[0], loss.nc], id_dtype)),
                   total_cells=sum(cells))


def pack_targets(targets: Tensor, capacity: int) -> Tensor:
    """``targets`` (nt, 6) padded to ``capacity`` rows with padding rows (image index -1), for a
    step whose shapes must not change (a captured CUDA graph, ``torch.compile`` without dynamic
    shapes). Only the row count is read: nothing waits for the device.

    Raises:
        ValueError: more than ``capacity`` targets (nothing is ever dropped), or a bad shape.
    """
    if not isinstance(targets, Tensor) or targets.dim() != 2 or targets.shape[1] != 6:
        shape = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
        raise ValueError(f"pack_targets: targets must be (nt, 6) rows [image, class, x, y, w, h], got {shape}")
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
        raise ValueError(f"pack_targets: capacity must be a non-negative integer, got {capacity!r}")
    nt = targets.shape[0]
    if nt > capacity:
        raise ValueError(f"pack_targets: the batch has {nt} targets, more than the capacity of {capacity} "
                         "(raise max_targets)")
    padding = targets.new_zeros(capacity - nt, 6)
    padding[:, 0] = PADDING
    return torch.cat((targets, padding))


__all__ = ["BALANCE", "PADDING", "Matches", "YOLOv5Loss", "bbox_ciou", "centre_size_ciou", "pack_targets"]
