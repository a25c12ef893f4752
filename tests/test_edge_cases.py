"""Edge cases on every backend that runs here: empty batches, one value per channel, NaN
propagation, and checkpoints moving between mobileops and plain blocks."""

import copy
import io

import pytest
import torch
from harness import (
    LAYOUTS,
    check,
    inputs,
    over_targets,
    target_fixture,  # noqa: F401 (the fixture over_targets parametrizes)
)
from helpers import DEVICES, assert_nan_and_inf_land_as_with_torch, runnable_backends

import mobileops
from mobileops import backend, ops, yolo


@over_targets("dwconv_bn_act", emulated=False)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_empty_batch_gives_an_empty_output_without_a_launch(target, training):
    args = inputs("dwconv_bn_act", (0, 4, 7, 6), layout="nhwc", device=target.device)
    x, w, gamma, beta, rm, rv = args.values()
    stats = rm.clone(), rv.clone()
    x.requires_grad_(True)
    se = inputs("squeeze_excite", (0, 4, 4, 3), hidden=2, biases=False, device=target.device)
    with mobileops.use_backend(target.backend), backend.record_calls() as calls:
        y = ops.dwconv_bn_act(x, w, gamma, beta, rm, rv, stride=2, activation="hswish", training=training)
        z = ops.bn_act(y, gamma, beta, rm, rv, activation="relu", training=training)
        z = ops.dwconv_act(z, w, beta, activation="relu6")
        z = ops.squeeze_excite(z, *list(se.values())[1:])
    assert y.shape == (0, 4, 4, 3) and z.shape == (0, 4, 4, 3) and z.dtype == torch.float64
    assert {c["backend"] for c in calls} == {"torch"}, "an empty batch must not reach a kernel"
    assert torch.equal(rm, stats[0]) and torch.equal(rv, stats[1]), "an empty batch must not move the statistics"
    z.sum().backward()
    assert x.grad.shape == x.shape


@over_targets("dwconv_bn_act", emulated=False)
def test_one_value_per_channel_is_refused_in_training_like_pytorch(target):
    x, w, gamma, beta, rm, rv = inputs("dwconv_bn_act", (1, 4, 1, 1), device=target.device).values()
    with mobileops.use_backend(target.backend):
        with pytest.raises(ValueError, match="more than one value per channel"):
            ops.dwconv_bn_act(x, w, gamma, beta, rm, rv, training=True)
        with pytest.raises(ValueError, match="more than one value per channel"):
            ops.bn_act(x, gamma, beta, rm, rv, training=True)
        assert ops.bn_act(x, gamma, beta, rm, rv, training=False).shape == x.shape  # eval is fine
    with pytest.raises(ValueError, match="more than 1 value per channel"):  # PyTorch's own rule
        torch.nn.functional.batch_norm(x, rm.clone(), rv.clone(), training=True)


@over_targets("dwconv_bn_act", emulated=False)
def test_nan_and_inf_land_where_pytorch_puts_them(target):
    assert_nan_and_inf_land_as_with_torch(target.device, target.backend)


TRITON = [pytest.param(d, id=d) for d in DEVICES if "triton" in runnable_backends("dwconv_bn_act", d)]


@pytest.mark.parametrize("device", TRITON)
@pytest.mark.parametrize("limit, layout", [(1, "nchw"), (2, "nhwc")], ids=["y1-nchw", "y2-nhwc"])
def test_channel_blocks_past_the_grid_limit_go_on_along_z(monkeypatch, device, layout, limit):
    """CUDA caps a grid's y extent at 65535, which NCHW Triton launches (4 channels per block)
    would pass at 262141 channels. Channel blocks then continue along z; lowering the cap makes
    every launch here take that path (with programs past the last block on the last z slice)."""
    from mobileops.kernels import _common
    monkeypatch.setattr(_common, "GRID_YZ_LIMIT", limit)
    shape = (2, 40, 4, 5)  # 3 channel blocks of 16 under the interpreter
    args = inputs("dwconv_bn_act", shape, layout=layout, seed=3, device=device)
    ours = check("dwconv_bn_act", "triton", args, activation="hswish", training=True)
    assert ours["y"].is_contiguous(memory_format=LAYOUTS[layout])
    bn = {name: t for name, t in args.items() if name != "weight"} | dict(running_mean=None, running_var=None)
    check("bn_act", "triton", bn, activation="relu6")
    check("dwconv_act", "triton", inputs("dwconv_act", shape, layout=layout, seed=4, device=device), activation="silu")
    se = inputs("squeeze_excite", shape, hidden=5, layout=layout, seed=5, device=device)
    check("squeeze_excite", "triton", se, post_act="relu")


def test_checkpoints_move_between_mobileops_and_plain_blocks_with_weights_only():
    torch.manual_seed(0)
    fused = yolo.build("yolov5-mobilenetv3").eval()
    plain = yolo.build("yolov5-mobilenetv3", blocks="plain").eval()
    buffer = io.BytesIO()
    torch.save(fused.state_dict(), buffer)
    buffer.seek(0)
    plain.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(plain(x)[0], fused(x)[0], rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(plain.state_dict(), buffer)
    buffer.seek(0)
    again = yolo.build("yolov5-mobilenetv3").eval()
    again.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    torch.testing.assert_close(again(x)[0], fused(x)[0], rtol=0, atol=0)
    # a converted plain model saves the same keys as the original
    converted = copy.deepcopy(plain)
    mobileops.convert(converted)
    assert list(converted.state_dict()) == list(plain.state_dict())
