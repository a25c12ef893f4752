"""mobileops.convert: existing models with the seed blocks become mobileops models with the
same state, keys and outputs, and the fused ops actually run."""

import copy

import pytest
import torch
from helpers import randomize_bn
from torch import nn

import mobileops
from mobileops import backend, reference, yolo
from mobileops.convert import FusedSequential


def _outputs(model, x, train):
    model.train(train)
    out = model(x)
    return out if train else out[0]


@pytest.mark.parametrize("cfg, expected", [("yolov5n-c3uib", 18), ("yolov5-mobilenetv3", 24)])
def test_plain_detector_converts_with_identical_state_and_outputs(cfg, expected):
    torch.manual_seed(0)
    plain = randomize_bn(yolo.build(cfg, blocks="plain")).double()
    keys = list(plain.state_dict())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    before = copy.deepcopy(plain)
    report = mobileops.convert(plain)
    assert report.model is plain and not report.skipped
    assert len(report.replaced) == expected
    assert not any(type(m).__name__.startswith("Ref") for m in plain.modules())
    assert list(plain.state_dict()) == keys
    for name, m in plain.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            assert (m.eps, m.momentum) == (1e-3, 0.03), name
    for train in (False, True):
        ref, out = _outputs(before, x, train), _outputs(plain, x, train)
        for a, b in zip(out if train else [out], ref if train else [ref]):
            assert torch.equal(a, b)
    # the running statistics moved identically in the training-mode pass above
    for (name, a), (_, b) in zip(plain.state_dict().items(), before.state_dict().items()):
        assert torch.equal(a, b), name
    with backend.record_calls() as calls:
        plain.eval()(x)
    assert {c["op"] for c in calls} >= {"dwconv_bn_act", "bn_act"}


def test_converted_modules_keep_mode_dtype_grad_flags_and_framework_attributes():
    block = reference.RefMobileNetv3(16, 24, 64, 5, 2, True, True).to(torch.float64).eval()
    block.conv[0].weight.requires_grad_(False)
    block.f, block.i, block.type = -1, 7, "MobileNetv3"  # what YOLOv5's parse_model hangs on a layer
    holder = nn.ModuleDict({"layer": block})
    report = mobileops.convert(holder)
    new = holder["layer"]
    assert report.replaced == [("layer", "RefMobileNetv3", "MobileNetv3")]
    assert type(new) is mobileops.MobileNetv3 and not new.training
    assert new.conv[0].weight.dtype == torch.float64 and not new.conv[0].weight.requires_grad
    assert (new.f, new.i, new.type) == (-1, 7, "MobileNetv3")
    x = torch.randn(2, 16, 12, 12, dtype=torch.float64)
    assert torch.equal(new(x), block(x))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_conversion_keeps_every_bit_of_the_weights_in_their_dtype(dtype):
    torch.manual_seed(0)
    plain = nn.Sequential(reference.RefC3UIB(16, 16, 1), reference.RefMobileNetv3(16, 24, 64, 5, 2, True, True))
    plain = randomize_bn(plain).to(dtype)
    with torch.no_grad():
        for t in [*plain.parameters(), *plain.buffers()]:
            if t.is_floating_point():
                # float64 values that float32 cannot hold: a float32 round trip would change them
                # (positive, so running variances stay valid; bfloat16 checks the dtype is kept)
                t.copy_(torch.rand(t.shape, dtype=torch.float64).add(0.5).to(dtype) if t.dim() else t)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    report = mobileops.convert(plain)
    assert len(report.replaced) == 2 and not report.skipped
    after = plain.state_dict()
    assert list(after) == list(before)
    for name, value in before.items():
        assert after[name].dtype == value.dtype, name
        assert torch.equal(after[name], value), name


def test_inplace_false_leaves_the_original_alone():
    model = nn.Sequential(reference.RefConv(3, 8, 3, 2), reference.RefC3UIB(8, 16, 2))
    report = mobileops.convert(model, inplace=False)
    assert type(model[0]) is reference.RefConv and type(report.model[0]) is mobileops.Conv
    assert type(report.model[1]) is mobileops.C3_UIB
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(report.model.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_a_recognised_root_needs_inplace_false():
    block = reference.RefConv3BN(3, 16, 2)
    with pytest.raises(ValueError, match="inplace=False"):
        mobileops.convert(block)
    report = mobileops.convert(block, inplace=False)
    assert type(report.model) is mobileops.Conv3BN


def test_plain_sequential_of_depthwise_conv_bn_act_runs_fused():
    torch.manual_seed(0)
    layers = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
                           nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish(),
                           nn.Conv2d(16, 16, 5, 2, 2, groups=16, bias=False), nn.BatchNorm2d(16))
    randomize_bn(layers).double()
    before = copy.deepcopy(layers)
    report = mobileops.convert(layers)
    assert type(layers) is FusedSequential and report.replaced == [("", "Sequential", "FusedSequential")]
    assert list(layers.state_dict()) == list(before.state_dict())
    x = torch.randn(2, 8, 11, 9, dtype=torch.float64)
    for train in (False, True):
        layers.train(train)
        before.train(train)
        with backend.record_calls() as calls:
            out = layers(x)
        torch.testing.assert_close(out, before(x), rtol=1e-12, atol=1e-12)
        assert [c["op"] for c in calls] == ["dwconv_bn_act", "dwconv_bn_act"]


def test_blocks_that_do_not_match_are_reported_and_left_alone():
    class Conv(nn.Module):  # a user's "Conv" with a biased convolution: not the YOLOv5 block
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.act = nn.Conv2d(3, 4, 3, 1, 1, bias=True), nn.BatchNorm2d(4), nn.SiLU()

        def forward(self, x):
            return self.act(self.bn(self.conv(x)))

    model = nn.Sequential(Conv())
    report = mobileops.convert(model)
    assert type(model[0]) is Conv and not report.replaced
    assert report.skipped[0][:2] == ("0", "Conv") and "bias" in report.skipped[0][2]
    assert "left 1 recognised module" in str(report)


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        mobileops.convert("model")
    with pytest.raises(TypeError, match="inplace"):
        mobileops.convert(nn.Sequential(), inplace="yes")
