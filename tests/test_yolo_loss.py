"""The YOLOv5 loss on hand-made boxes, targets and predictions."""

import math

import pytest
import torch
from host_syncs import CountOps, ForbidHostSyncs, HostSyncError
from reference_loss import BooleanMaskLoss

from mobileops import yolo
from mobileops.nn.detect import Detect
from mobileops.yolo.loss import BALANCE, PADDING, YOLOv5Loss, bbox_ciou, pack_targets
from mobileops.yolo.train import synthetic_batch

LOG2 = math.log(2.0)


def test_ciou_of_hand_made_boxes():
    box = torch.tensor([0.0, 0.0, 2.0, 2.0], dtype=torch.float64)
    assert bbox_ciou(box, box).item() == pytest.approx(1.0, abs=1e-6)
    # shifted by one: IoU 2/6, enclosing box 3x2 (diagonal^2 13), centre distance^2 1, same aspect
    shifted = torch.tensor([1.0, 0.0, 2.0, 2.0], dtype=torch.float64)
    assert bbox_ciou(box, shifted).item() == pytest.approx(1 / 3 - 1 / 13, abs=1e-6)
    # same centre, twice as wide: IoU 1/2, no distance term, aspect term v * alpha
    wide = torch.tensor([0.0, 0.0, 4.0, 2.0], dtype=torch.float64)
    v = 4 / math.pi ** 2 * (math.atan(2.0) - math.atan(1.0)) ** 2
    assert bbox_ciou(box, wide).item() == pytest.approx(0.5 - v * v / (v - 0.5 + 1), abs=1e-6)
    # disjoint: IoU 0, the distance term alone
    far = torch.tensor([4.0, 0.0, 2.0, 2.0], dtype=torch.float64)
    assert bbox_ciou(box, far).item() == pytest.approx(-16 / (6 ** 2 + 2 ** 2), abs=1e-6)


def _head(nc=2):
    head = Detect(nc, ([10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]),
                  (4, 4, 4))
    with torch.no_grad():  # grid units, chosen for the tests
        head.anchors.copy_(torch.tensor([[[1, 1], [2, 2], [8, 8]], [[1, 1], [2, 2], [4, 4]], [[1, 1], [2, 2], [4, 4]]]))
    return head


def _predictions(batch, nc=2, sizes=(16, 8, 4), fill=0.0):
    return [torch.full((batch, 3, s, s, nc + 5), fill, dtype=torch.float64) for s in sizes]


def _matches(loss, predictions, targets, level):
    """The valid matches of one level as sorted (anchor, gj, gi, image, class, box, anchor wh)."""
    m = loss.build_targets(predictions, targets)
    shape = m.valid.shape[1:]
    _, _, ny, nx, _ = predictions[level].shape
    out = []
    for a, t, k in m.valid[level].nonzero().tolist():
        cell = m.cell.expand(m.valid.shape)[level, a, t, k].item()
        image, rest = divmod(cell, loss.na * ny * nx)
        anchor, rest = divmod(rest, ny * nx)
        gj, gi = divmod(rest, nx)
        xy, wh, anchor_wh = (field.expand(*m.valid.shape, 2)[level, a, t, k] for field in m[2:5])
        out.append((anchor, gj, gi, image, m.cls[t].item(), torch.cat((xy, wh)).tolist(), anchor_wh.tolist()))
        assert anchor == a and len(shape) == 3
    return sorted(out)


def test_matching_uses_the_ratio_threshold_and_the_two_nearest_neighbour_cells():
    loss = YOLOv5Loss(_head())
    # level 0 (16x16 grid): centre (5.3, 7.8) cells, size 1.5 x 1.2 cells
    target = torch.tensor([[0, 1, 5.3 / 16, 7.8 / 16, 1.5 / 16, 1.2 / 16]])
    got = _matches(loss, _predictions(1), target, 0)
    # anchors 1x1 (ratio 1.5) and 2x2 (1/0.6) match; 8x8 (ratio 6.7 > 4) does not. Each match
    # also goes to the left neighbour (x fraction 0.3 < 0.5) and the one below (y fraction 0.8).
    assert [(a, j, i) for a, j, i, *_ in got] == sorted(
        (anchor, j, i) for anchor in (0, 1) for j, i in ((7, 5), (7, 4), (8, 5)))
    assert all(image == 0 and cls == 1 for _, _, _, image, cls, _, _ in got)
    for anchor_index, j, i, _, _, box, wh in got:
        assert box == pytest.approx([5.3 - i, 7.8 - j, 1.5, 1.2], abs=1e-5)
        assert wh == [[1, 1], [2, 2]][anchor_index]


def test_targets_at_the_border_get_no_neighbour_outside_the_grid():
    loss = YOLOv5Loss(_head())
    target = torch.tensor([[0, 0, 0.2 / 16, 15.9 / 16, 1.0 / 16, 1.0 / 16]])
    assert sorted({(j, i) for _, j, i, *_ in _matches(loss, _predictions(1), target, 0)}) == [(15, 0)]


def test_loss_without_targets_is_the_objectness_term_alone():
    loss = YOLOv5Loss(_head(), obj_gain=1.0)
    total, parts = loss(_predictions(3), torch.zeros(0, 6))
    # zero logits against all-zero objectness targets: BCE log 2 per level, weighted by balance
    expected = LOG2 * sum(BALANCE[3])
    assert parts.tolist() == pytest.approx([0.0, expected, 0.0], rel=1e-6)
    assert total.item() == pytest.approx(3 * expected, rel=1e-6)


def test_loss_of_one_target_by_hand():
    head = _head()
    loss = YOLOv5Loss(head, box_gain=0.05, obj_gain=1.0, cls_gain=0.5)
    target = torch.tensor([[1, 1, 5.3 / 16, 7.8 / 16, 1.5 / 16, 1.2 / 16]])
    # zero logits everywhere: every matched cell predicts (0.5, 0.5) offsets and its anchor's size,
    # and every BCE (objectness and class, whatever the target) is log 2
    total, parts = loss(_predictions(2), target)
    # per level: grid size, matching anchors, cells (i, j): the centre's and its nearest neighbours
    levels = [(16, ((1, 1), (2, 2)), ((5, 7), (4, 7), (5, 8))),   # x fraction .3 -> left, y .8 -> below
              (8, ((1, 1), (2, 2)), ((2, 3), (3, 3), (2, 4))),    # x .65 -> right, y .9 -> below
              (4, ((1, 1),), ((1, 1), (0, 1), (1, 2)))]           # 2x2 ratio 6.7 > 4 here
    lbox = 0.0
    for size, anchors, cells in levels:
        cx, cy, w, h = 5.3 * size / 16, 7.8 * size / 16, 1.5 * size / 16, 1.2 * size / 16
        terms = [1 - bbox_ciou(torch.tensor([0.5, 0.5, *anchor], dtype=torch.float64),
                               torch.tensor([cx - i, cy - j, w, h], dtype=torch.float64)).item()
                 for anchor in anchors for i, j in cells]
        lbox += sum(terms) / len(terms)
    lbox, lobj, lcls = 0.05 * lbox, LOG2 * sum(BALANCE[3]), 0.5 * 3 * LOG2
    assert parts.tolist() == pytest.approx([lbox, lobj, lcls], rel=1e-5)
    assert total.item() == pytest.approx(2 * (lbox + lobj + lcls), rel=1e-5)


def test_objectness_target_is_the_matched_iou():
    loss = YOLOv5Loss(_head(nc=1))
    target = torch.tensor([[0, 0, 5.3 / 16, 7.8 / 16, 1.5 / 16, 1.2 / 16]])
    predictions = _predictions(1, nc=1)
    predictions[0][0, 0, 7, 5, 4] = 2.0  # one objectness logit of a matched cell
    _, parts = loss(predictions, target)
    iou = bbox_ciou(torch.tensor([0.5, 0.5, 1.0, 1.0], dtype=torch.float64),
                    torch.tensor([0.3, 0.8, 1.5, 1.2], dtype=torch.float64)).clamp(min=0).item()
    cells = 3 * 16 * 16
    level0 = (LOG2 * (cells - 1) + math.log1p(math.exp(2.0)) - 2.0 * iou) / cells
    assert parts[1].item() == pytest.approx(BALANCE[3][0] * level0 + LOG2 * sum(BALANCE[3][1:]), rel=1e-6)


def test_minimising_the_loss_moves_predictions_onto_the_target():
    loss = YOLOv5Loss(_head())
    target = torch.tensor([[0, 1, 5.3 / 16, 7.8 / 16, 1.5 / 16, 1.2 / 16], [0, 0, 0.5, 0.5, 0.3, 0.2]])
    predictions = [p.requires_grad_(True) for p in _predictions(1)]
    optimizer = torch.optim.Adam(predictions, lr=0.05)
    first = None
    for _ in range(60):
        optimizer.zero_grad()
        total, parts = loss(predictions, target)
        first = parts if first is None else first
        total.backward()
        optimizer.step()
    assert (parts < 0.5 * first).all(), (first, parts)


def test_for_model_scales_the_gains_like_yolov5_train():
    model = yolo.build("yolov5n-c3uib", nc=8)
    loss = YOLOv5Loss.for_model(model, img_size=320)
    assert (loss.box_gain, loss.cls_gain, loss.obj_gain) == pytest.approx((0.05, 0.5 * 8 / 80, 0.25))
    assert loss.head is model.model[-1]


def test_bad_input_is_rejected_with_the_argument_named():
    loss = YOLOv5Loss(_head())
    with pytest.raises(ValueError, match="targets must be"):
        loss(_predictions(1), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="targets must be floating point"):
        loss(_predictions(1), torch.zeros(3, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="classes must be integers"):
        loss(_predictions(1), torch.tensor([[0, 2, 0.5, 0.5, 0.1, 0.1]]))
    with pytest.raises(ValueError, match="classes must be integers"):
        loss(_predictions(1), torch.tensor([[0, 0.5, 0.5, 0.5, 0.1, 0.1]]))
    with pytest.raises(ValueError, match="image indices"):
        loss(_predictions(1), torch.tensor([[1, 0, 0.5, 0.5, 0.1, 0.1]]))
    with pytest.raises(ValueError, match="image indices"):
        loss(_predictions(1), torch.tensor([[-2, 0, 0.5, 0.5, 0.1, 0.1]]))
    with pytest.raises(ValueError, match="training-mode outputs"):
        loss(_predictions(1)[:2], torch.zeros(0, 6))
    with pytest.raises(ValueError, match="one batch size"):
        loss(_predictions(1)[:2] + _predictions(2)[2:], torch.zeros(0, 6))
    with pytest.raises(TypeError, match="Detect"):
        YOLOv5Loss(torch.nn.Conv2d(1, 1, 1))


# The static-shape loss against the earlier boolean-mask one (tests/reference_loss.py).

def _detector_head(nc):
    head = Detect(nc, ([10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]),
                  (4, 4, 4))
    with torch.no_grad():  # grid units at strides 8, 16, 32, as a built model holds them
        head.anchors.div_(torch.tensor([8.0, 16.0, 32.0]).view(3, 1, 1))
    return head


def _random_case(seed, nc=4, batch=3, img=128, nt=20):
    generator = torch.Generator().manual_seed(seed)
    predictions = [torch.randn(batch, 3, img // s, img // s, nc + 5, generator=generator, dtype=torch.float64)
                   for s in (8, 16, 32)]
    wh = 0.02 + 0.5 * torch.rand(nt, 2, generator=generator, dtype=torch.float64)
    xy = wh / 2 + (1 - wh) * torch.rand(nt, 2, generator=generator, dtype=torch.float64)
    image = torch.randint(0, batch, (nt, 1), generator=generator).double()
    cls = torch.randint(0, nc, (nt, 1), generator=generator).double()
    return predictions, torch.cat((image, cls, xy, wh), 1)


def _loss_and_grads(loss, predictions, targets):
    predictions = [p.detach().requires_grad_(True) for p in predictions]
    total, parts = loss(predictions, targets)
    return total, parts, torch.autograd.grad(total, predictions)


@pytest.mark.parametrize("analytic", [True, False], ids=["analytic", "autograd"])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1}, {"iou_ratio": 0.5}], ids=str)
@pytest.mark.parametrize("nc", [1, 4])
def test_static_loss_matches_the_boolean_mask_loss(nc, options, analytic):
    loss = YOLOv5Loss(_detector_head(nc), analytic_gradient=analytic, **options)
    reference = BooleanMaskLoss(loss)
    predictions, targets = _random_case(0, nc=nc)
    for rows in (targets, targets[:0], targets[:1]):
        got, want = _loss_and_grads(loss, predictions, rows), _loss_and_grads(reference, predictions, rows)
        # both compute in float32: equal to its rounding
        torch.testing.assert_close(got[1], want[1], rtol=2e-6, atol=1e-7)
        torch.testing.assert_close(got[0], want[0], rtol=2e-6, atol=1e-7)
        for a, b in zip(got[2], want[2]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_targets_sharing_a_cell_take_the_larger_iou_and_padding_changes_nothing():
    loss = YOLOv5Loss(_detector_head(4))
    reference = BooleanMaskLoss(loss)
    predictions, targets = _random_case(1)
    # two boxes centred in the same cell of the same image (different sizes): they share cells and
    # anchors, so the objectness target there is the larger IoU of the two
    shared = targets[:2].clone()
    shared[1, 2:4] = shared[0, 2:4] + 0.001
    shared[1, 4:6] = shared[0, 4:6] * 1.1
    shared[1, 0] = shared[0, 0]
    m = loss.build_targets(predictions, shared)
    cells = m.cell.expand(m.valid.shape)[m.valid]  # flat cell indices of all valid matches (per level)
    assert cells.unique().numel() < cells.numel(), "the two targets must share cells"
    for rows in (shared, torch.cat((targets, shared))):
        got, want = _loss_and_grads(loss, predictions, rows), _loss_and_grads(reference, predictions, rows)
        torch.testing.assert_close(got[1], want[1], rtol=2e-6, atol=1e-7)
        padded = _loss_and_grads(loss, predictions, pack_targets(rows, rows.shape[0] + 7))
        torch.testing.assert_close(padded[1], got[1], rtol=1e-6, atol=0)  # only the summation order differs
        for a, b in zip(padded[2], got[2]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)  # float32 rounding of terms ~0.06


def test_pack_targets_pads_and_never_drops():
    targets = torch.rand(5, 6)
    packed = pack_targets(targets, 8)
    assert packed.shape == (8, 6) and torch.equal(packed[:5], targets)
    assert (packed[5:, 0] == PADDING).all() and (packed[5:, 1:] == 0).all()
    assert pack_targets(targets, 5).shape == (5, 6)
    with pytest.raises(ValueError, match="6 targets, more than the capacity of 5"):
        pack_targets(torch.rand(6, 6), 5)
    with pytest.raises(ValueError, match="capacity must be"):
        pack_targets(targets, -1)
    with pytest.raises(ValueError, match="targets must be"):
        pack_targets(torch.rand(5, 4), 8)


def _real_shapes_case():
    model = yolo.build("yolov5n-c3uib", nc=80)
    loss = YOLOv5Loss.for_model(model, img_size=128)
    _, targets = synthetic_batch(4, 128, 80, generator=torch.Generator().manual_seed(0))
    predictions = [torch.randn(4, 3, 128 // s, 128 // s, 85, requires_grad=True) for s in (8, 16, 32)]
    return loss, predictions, pack_targets(targets, 40)


def test_the_loss_never_makes_the_host_wait():
    loss, predictions, targets = _real_shapes_case()
    loss(predictions, targets)  # the first call per shape makes the loss's constant tensors
    with ForbidHostSyncs():
        total, _ = loss(predictions, targets)
        total.backward()
    # the probe can fail: the earlier loss synchronises (boolean masks, .tolist())
    with pytest.raises(HostSyncError), ForbidHostSyncs():
        BooleanMaskLoss(loss)(predictions, targets)


def test_the_loss_launches_a_third_of_the_earlier_ops():
    loss, predictions, targets = _real_shapes_case()
    counts = []
    for impl in (loss, BooleanMaskLoss(loss)):
        impl(predictions, targets)
        with CountOps() as ops:
            total, _ = impl(predictions, targets)
            total.backward()
        counts.append(ops.total)
    # measured (torch 2.13): 252 aten ops forward + backward, views included (10 of them in the
    # backward: the gradient is computed with the loss); 320 with autograd's backward; the earlier
    # loss 960
    assert counts[0] <= 260 and counts[0] * 3 <= counts[1], counts


def test_the_ciou_gradient_is_autograds():
    """_ciou_gradient against autograd through the same forward, in float64: overlapping,
    disjoint and nested boxes, sizes under the clamp."""
    from mobileops.yolo.loss import _ciou_gradient, _ciou_terms

    g = torch.Generator().manual_seed(5)
    n = 4000
    centre1 = (torch.rand(n, 2, generator=g, dtype=torch.float64) * 6).requires_grad_(True)
    size1 = (torch.rand(n, 2, generator=g, dtype=torch.float64) * 4).requires_grad_(True)
    with torch.no_grad():
        size1[:50] = 1e-9  # clamped: no gradient through the size
    centre2 = torch.rand(n, 2, generator=g, dtype=torch.float64) * 6
    size2 = torch.rand(n, 2, generator=g, dtype=torch.float64) * 4
    weights = torch.randn(n, generator=g, dtype=torch.float64)
    terms = _ciou_terms(centre1, size1, centre2, size2, 1e-7)
    want = torch.autograd.grad((terms.ciou[..., 0] * weights).sum(), (centre1, size1))
    with torch.no_grad():
        got = [d * weights[:, None] for d in _ciou_gradient(_ciou_terms(centre1, size1, centre2, size2, 1e-7), 1e-7)]
    overlapping = (terms.overlap > 0).all(-1)
    assert 0.2 < overlapping.double().mean() < 0.9, "both overlapping and disjoint boxes"
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert (got[1][:50] == 0).all()


def test_a_prediction_on_its_target_has_autograds_gradient():
    """Predicted edges equal to the target's (min/max ties): autograd gives each side half, the
    one-sided derivatives cancel, and the analytic gradient must do the same."""
    target = torch.tensor([[0, 1, 5.5 / 16, 7.5 / 16, 1 / 16, 1 / 16]], dtype=torch.float64)
    grads = []
    for analytic in (True, False):
        loss = YOLOv5Loss(_head(2), analytic_gradient=analytic)
        predictions = [p.requires_grad_(True) for p in _predictions(1, fill=0.0)]
        grads.append(torch.autograd.grad(loss(predictions, target)[0], predictions))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)  # float32 rounding of terms ~0.06


def test_double_backward_needs_the_autograd_loss_and_torch_func_gets_it():
    loss, predictions, targets = _real_shapes_case()
    total, _ = loss(predictions, targets)
    with pytest.raises(RuntimeError, match="analytic_gradient=False"):
        torch.autograd.grad(total, predictions, create_graph=True)
    recorded = YOLOv5Loss.for_model(yolo.build("yolov5n-c3uib", nc=80), img_size=128, analytic_gradient=False)
    first = torch.autograd.grad(recorded(predictions, targets)[0], predictions[2], create_graph=True)[0]
    assert first.requires_grad  # a second-order term can be built on it
    # torch.func transforms record the loss with autograd too
    def level2(p):
        return loss(predictions[:2] + [p], targets)[0]

    torch.testing.assert_close(torch.func.grad(level2)(predictions[2].detach()),
                               torch.autograd.grad(loss(predictions, targets)[0], predictions[2])[0],
                               rtol=1e-5, atol=1e-8)


def test_the_loss_gradient_scales_with_its_upstream_gradient_and_serves_once():
    loss, predictions, targets = _real_shapes_case()
    half = [p.detach().half().requires_grad_(True) for p in predictions]
    base = torch.autograd.grad(loss(predictions, targets)[0], predictions)
    scaled = torch.autograd.grad(loss(predictions, targets)[0] * 1024.0, predictions)
    for a, b in zip(scaled, base):
        torch.testing.assert_close(a, b * 1024.0, rtol=1e-6, atol=0)
    # float16 predictions get float16 gradients (computed in float32, then rounded once)
    assert all(d.dtype == torch.float16 for d in torch.autograd.grad(loss(half, targets)[0], half))
    total, _ = loss(predictions, targets)
    total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already used"):
        total.backward()


def test_the_loss_runs_on_meta_tensors():
    loss, predictions, targets = _real_shapes_case()
    loss = loss.to("meta")
    predictions = [p.detach().to("meta").requires_grad_(True) for p in predictions]
    total, parts = loss(predictions, targets.to("meta"))
    total.backward()
    assert total.shape == () and parts.shape == (3,) and predictions[0].grad.shape == predictions[0].shape


def test_the_loss_compiles_as_one_graph():
    loss, predictions, targets = _real_shapes_case()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got, want = _loss_and_grads(compiled, predictions, targets), _loss_and_grads(loss, predictions, targets)
    torch.testing.assert_close(got[1], want[1])
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b)


def test_rejected_rows_with_non_finite_boxes_change_nothing():
    # a row no anchor matches is dropped, whatever its box holds: a NaN or inf size, or a NaN
    # centre on a box far smaller than every anchor
    loss = YOLOv5Loss(_detector_head(4))
    predictions, targets = _random_case(2)
    odd = torch.tensor([[0, 1, 0.5, 0.5, float("nan"), 0.1], [1, 2, 0.5, 0.5, float("inf"), 0.2],
                        [2, 3, float("nan"), float("inf"), 1e-6, 1e-6]], dtype=torch.float64)
    assert not loss.build_targets(predictions, odd).valid.any()
    got = _loss_and_grads(loss, predictions, torch.cat((targets, odd)))
    want = _loss_and_grads(loss, predictions, targets)
    assert torch.isfinite(got[0]) and all(torch.isfinite(g).all() for g in got[2])
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=0)


def test_non_contiguous_outputs_give_the_same_loss():
    loss = YOLOv5Loss(_detector_head(4))
    predictions, targets = _random_case(3)
    strided = [p.transpose(2, 3).contiguous().transpose(2, 3) for p in predictions]
    assert not strided[0].is_contiguous()
    got, want = _loss_and_grads(loss, strided, targets), _loss_and_grads(loss, predictions, targets)
    torch.testing.assert_close(got[1], want[1])
