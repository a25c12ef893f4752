"""YOLOv5 detectors from yaml: sizes, outputs, head initialisation, fuse(), errors."""

import math

import pytest
import torch
from helpers import count_bn, randomize_bn
from torch import nn

from mobileops import reference as ref_blocks
from mobileops import yolo
from mobileops.nn import Detect

CONFIGS = ["yolov5n", "yolov5s", "yolov5n-c3uib", "yolov5-mobilenetv3"]
PUBLISHED = {"yolov5n": (1_872_157, 4.5), "yolov5s": (7_235_389, 16.5)}


def _params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: yolo.build(name) for name in CONFIGS}


def test_shipped_configs():
    assert set(CONFIGS) <= set(yolo.shipped_configs())


@pytest.mark.parametrize("name", ["yolov5n", "yolov5s"])
def test_stock_configs_reproduce_published_sizes(models, name):
    params, gflops = PUBLISHED[name]
    info = models[name].info(640)
    assert info["parameters"] == params
    assert abs(info["gflops"] - gflops) / gflops < 0.01, info


def test_c3uib_size_is_yolov5n_with_c3_swapped_for_c3_uib(models):
    """Independent count: the published yolov5n size minus its C3s plus the same-shaped
    reference C3_UIBs (tests/reference.py)."""
    stock, c3uib = models["yolov5n"], models["yolov5n-c3uib"]
    expected = PUBLISHED["yolov5n"][0]
    for layer in stock.model:
        if layer.type == "C3":
            c1, c2, n, *rest = layer.args
            expected += _params(ref_blocks.RefC3UIB(c1, c2, n, *rest)) - _params(ref_blocks.RefC3(c1, c2, n, *rest))
    assert c3uib.info(640)["parameters"] == expected


def test_mobilenetv3_size_matches_spec_tables(models):
    R = ref_blocks
    rows = [(16, 16, 16, 3, 1, 0, 0), (16, 24, 64, 3, 2, 0, 0), (24, 24, 72, 3, 1, 0, 0), (24, 40, 72, 5, 2, 1, 0),
            (40, 40, 120, 5, 1, 1, 0), (40, 40, 120, 5, 1, 1, 0), (40, 80, 240, 3, 2, 0, 1), (80, 80, 200, 3, 1, 0, 1),
            (80, 80, 184, 3, 1, 0, 1), (80, 80, 184, 3, 1, 0, 1), (80, 112, 480, 3, 1, 1, 1),
            (112, 112, 672, 3, 1, 1, 1), (112, 160, 672, 5, 1, 1, 1), (160, 160, 672, 5, 2, 1, 1),
            (160, 160, 960, 5, 1, 1, 1)]
    modules = [R.RefConv3BN(3, 16, 2)] + [R.RefMobileNetv3(*r) for r in rows] + [
        R.RefConv(160, 256, 1, 1), R.RefC3(256 + 160, 256, 1, False), R.RefConv(256, 128, 1, 1),
        R.RefC3(128 + 40, 128, 1, False), R.RefConv(128, 128, 3, 2), R.RefC3(128 + 128, 256, 1, False),
        R.RefConv(256, 256, 3, 2), R.RefC3(256 + 256, 512, 1, False)]
    modules += [nn.Conv2d(c, 3 * (2 + 5), 1) for c in (128, 256, 512)]
    assert models["yolov5-mobilenetv3"].info(640)["parameters"] == sum(_params(m) for m in modules)


# 640 (the detectors' real size) for the mobile detectors; the stock YOLOv5 references at 320.
@pytest.mark.parametrize("name, size", [(name, size) for name in CONFIGS for size in (320, 640)
                                        if size == 320 or name in ("yolov5n-c3uib", "yolov5-mobilenetv3")])
def test_output_shapes_in_both_modes(models, name, size):
    model = models[name]
    nc = model.yaml["nc"]
    x = torch.zeros(1, 3, size, size)
    expected = [(1, 3, size // s, size // s, nc + 5) for s in (8, 16, 32)]
    with torch.no_grad():
        model.train()
        raw = model(x)
        model.eval()
        decoded, raw_eval = model(x)
    assert [tuple(t.shape) for t in raw] == expected
    assert [tuple(t.shape) for t in raw_eval] == expected
    assert tuple(decoded.shape) == (1, sum(3 * (size // s) ** 2 for s in (8, 16, 32)), nc + 5)


def test_head_initialisation(models):
    for model in models.values():
        head = model.model[-1]
        assert head.stride.tolist() == [8.0, 16.0, 32.0]
        pixels = torch.tensor(model.yaml["anchors"], dtype=torch.float32).view(3, 3, 2)
        torch.testing.assert_close(head.anchors * head.stride.view(-1, 1, 1), pixels)
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        assert bns and all(bn.eps == 1e-3 and bn.momentum == 0.03 for bn in bns)


def test_building_leaves_bn_statistics_alone():
    bns = [m for m in yolo.build("yolov5n-c3uib").modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(int(bn.num_batches_tracked) == 0 and bool((bn.running_var == 1).all()) for bn in bns)


@pytest.mark.parametrize("nc", [1, 2, 80])
def test_bias_prior_matches_yolov5(nc):
    # Current YOLOv5 (utils since late 2021): obj += log(8 / (640 / s)^2), each class
    # += log(0.6 / (nc - 0.99999)); box biases untouched.
    cfg = yolo.load_config("yolov5n")
    cfg["nc"] = nc
    torch.manual_seed(3)
    raw_head = yolo.parse_model(cfg, 3)[0][-1]
    torch.manual_seed(3)
    head = yolo.build(cfg).model[-1]
    for conv_raw, conv, s in zip(raw_head.m, head.m, (8, 16, 32)):
        delta = (conv.bias - conv_raw.bias).view(3, -1).detach().double()
        torch.testing.assert_close(delta[:, 4], torch.full((3,), math.log(8 / (640 / s) ** 2), dtype=torch.float64),
                                   rtol=0, atol=1e-6)
        class_prior = math.log(0.6 / (nc - 0.99999))
        torch.testing.assert_close(delta[:, 5:], torch.full((3, nc), class_prior, dtype=torch.float64),
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(delta[:, :4], torch.zeros(3, 4, dtype=torch.float64))


def test_anchor_order_follows_strides():
    cfg = yolo.load_config("yolov5n")
    cfg["anchors"] = cfg["anchors"][::-1]
    head = yolo.build(cfg).model[-1]
    pixels = torch.tensor(cfg["anchors"][::-1], dtype=torch.float32).view(3, 3, 2)
    torch.testing.assert_close(head.anchors * head.stride.view(-1, 1, 1), pixels)


def test_eval_decoding_follows_spec(models):
    model = models["yolov5n-c3uib"].eval()
    head = model.model[-1]
    with torch.no_grad():
        decoded, raw = model(torch.randn(2, 3, 64, 96))
    parts = []
    for i, r in enumerate(raw):
        bs, na, ny, nx, no = r.shape
        s = r.sigmoid()
        gy, gx = torch.meshgrid(torch.arange(ny), torch.arange(nx), indexing="ij")
        stride = float(head.stride[i])
        xy = (2 * s[..., :2] - 0.5 + torch.stack((gx, gy), -1)) * stride
        wh = (2 * s[..., 2:4]) ** 2 * (head.anchors[i] * stride).view(1, na, 1, 1, 2)
        parts.append(torch.cat((xy, wh, s[..., 4:]), -1).reshape(bs, -1, no))
    torch.testing.assert_close(decoded, torch.cat(parts, 1))


def test_state_dict_keys_are_yolov5s(models):
    keys = set(models["yolov5n-c3uib"].state_dict())
    assert {"model.0.conv.weight", "model.0.bn.running_var", "model.24.anchors", "model.24.m.2.bias",
            "model.2.m.0._middle_dw.BatchNorm2d.running_mean", "model.2.m.0._start_dw_.conv.weight"} <= keys
    assert not any("stride" in k for k in keys)
    keys = set(models["yolov5-mobilenetv3"].state_dict())
    assert {"model.5.conv.5.fc.0.weight", "model.5.conv.5.fc.2.bias", "model.1.conv.3.fc.0.weight"} - keys \
        == {"model.1.conv.3.fc.0.weight"}  # layer 1 has no SE: its slot 3 is an empty Sequential


@pytest.mark.parametrize("name", CONFIGS)
def test_fuse_folds_every_bn_and_keeps_outputs(name):
    torch.manual_seed(0)
    model = randomize_bn(yolo.build(name), seed=5).double().eval()
    x = torch.randn(2, 3, 96, 64, dtype=torch.float64)
    with torch.no_grad():
        before, _ = model(x)
        params_before = model.info(96)["parameters"]
        assert model.fuse() is model
        after, _ = model(x)
    assert count_bn(model) == 0
    assert model.info(96)["parameters"] < params_before
    torch.testing.assert_close(after, before, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["yolov5n-c3uib", "yolov5-mobilenetv3"])
def test_training_step_produces_gradients_everywhere(name):
    torch.manual_seed(0)
    model = yolo.build(name).train()
    out = model(torch.randn(2, 3, 64, 64))
    sum(o.float().square().mean() for o in out).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_nc_override_and_registry():
    model = yolo.build("yolov5n", nc=3)
    assert model.model[-1].m[0].out_channels == 3 * 8 and model.yaml["nc"] == 3

    class Twice(nn.Module):
        def __init__(self, c1, c2):
            super().__init__()
            self.conv = nn.Conv2d(c1, c2, 1)

        def forward(self, x):
            return 2 * self.conv(x)

    yolo.register("Twice", Twice, "conv")
    cfg = yolo.load_config("yolov5n")
    cfg["backbone"][9] = [-1, 1, "Twice", [1024]]
    model = yolo.build(cfg)
    assert isinstance(model.model[9], Twice) and model.model[9].conv.out_channels == 256
    assert "Twice" in yolo.known_modules()
    with pytest.raises(ValueError, match="kind must be one of"):
        yolo.register("Bad", Twice, "weird")
    with pytest.raises(TypeError, match="nn.Module subclass"):
        yolo.register("Bad", int, "conv")


# ---- bad input -----------------------------------------------------------------------------

def test_model_rejects_bad_images(models):
    model = models["yolov5n"]
    with pytest.raises(ValueError, match="4-D"):
        model(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match="expects 3 input channels, got 4"):
        model(torch.zeros(1, 4, 64, 64))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def _bad(mutate):
    cfg = yolo.load_config("yolov5n")
    mutate(cfg)
    return cfg


@pytest.mark.parametrize("mutate,match", [
    (lambda c: c["backbone"].__setitem__(2, [-1, 3, "C4", [128]]), "unknown module 'C4'; known modules: .*C3_UIB"),
    (lambda c: c["backbone"].__setitem__(2, [-1, 3, "C3"]), r"row must be \[from, number, module, args\]"),
    (lambda c: c["backbone"].__setitem__(2, "C3"), r"row must be \[from, number, module, args\]"),
    (lambda c: c["backbone"].__setitem__(2, [5, 3, "C3", [128]]), "does not name an earlier layer"),
    (lambda c: c["backbone"].__setitem__(2, [-1, 0, "C3", [128]]), "number must be a positive integer"),
    (lambda c: c["backbone"].__setitem__(2, [-1, 3, "C3", 128]), "args must be a list"),
    (lambda c: c["backbone"].__setitem__(2, [-1, 3, "C3", []]), "needs its output channels"),
    (lambda c: c["backbone"].__setitem__(2, [[-1, 1], 3, "C3", [128]]), "takes one input"),
    (lambda c: c["backbone"].__setitem__(2, [-1, 3, "C3", [128, False, 1, 0.5, 7]]), r"C3\(.*\) failed"),
    (lambda c: c["head"].__setitem__(0, [[4, 6, 9], 1, "Detect", ["nc", "anchors"]]), "must be the last layer"),
    (lambda c: c.pop("anchors"), "missing key"),
    (lambda c: c.__setitem__("nc", 0), "nc must be a positive integer"),
    (lambda c: c.__setitem__("width_multiple", "wide"), "width_multiple must be a positive number"),
    (lambda c: c.__setitem__("anchors", [[10, 13, 16]]), "anchors must be a list of levels"),
    (lambda c: c.__setitem__("head", {"a": 1}), "head must be a list"),
])
def test_malformed_configs_raise_clear_errors(mutate, match):
    with pytest.raises(ValueError, match=match):
        yolo.build(_bad(mutate))


def test_config_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a file nor a shipped config"):
        yolo.build("yolov9-huge")
    bad = tmp_path / "bad.yaml"
    bad.write_text("nc: [1, 2\n")
    with pytest.raises(ValueError, match="not valid yaml"):
        yolo.build(str(bad))
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must be a yaml mapping"):
        yolo.build(listing)
    good = tmp_path / "mine.yaml"
    good.write_text((yolo.parse.CONFIG_DIR / "yolov5n.yaml").read_text())
    assert yolo.build(good).yaml["name"] == "mine"


def test_detect_validates_its_arguments():
    with pytest.raises(ValueError, match="anchors must be"):
        Detect(80, [[10, 13, 16]], (8,))
    with pytest.raises(ValueError, match="3 anchor levels but 2 input levels"):
        Detect(80, [[10, 13]] * 3, (8, 16))


@pytest.mark.parametrize("cfg", ["yolov5n-c3uib", "yolov5-mobilenetv3"])
def test_plain_twin_has_the_same_keys_and_outputs(cfg):
    """blocks="plain" builds the detector from the seed blocks (the benchmarks' eager baseline);
    a mobileops detector's state_dict loads into it strictly and both compute the same thing."""
    torch.manual_seed(0)
    fused, plain = yolo.build(cfg), yolo.build(cfg, blocks="plain")
    assert yolo.fused_op_calls(fused, (1, 3, 64, 64)) and not yolo.fused_op_calls(plain, (1, 3, 64, 64))
    plain.load_state_dict(fused.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    for mode in (True, False):
        a, b = fused.train(mode)(x), plain.train(mode)(x)
        a, b = (a, b) if mode else (a[1], b[1])
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v)
    torch.testing.assert_close(fused.state_dict(), plain.state_dict())
    with pytest.raises(ValueError, match="blocks must be"):
        yolo.build(cfg, blocks="fast")
