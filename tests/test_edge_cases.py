"""Edge cases on every backend that runs here: empty batches, one value per channel, NaN
propagation, and checkpoints moving between mobileops and plain blocks."""

import copy
import io

import pytest
import torch
from helpers import DEVICES, assert_nan_and_inf_land_as_with_torch, runnable_backends

import mobileops
from mobileops import backend, ops, yolo

BACKENDS = [pytest.param(d, b, id=f"{d}-{b}") for d in DEVICES for b in runnable_backends("dwconv_bn_act", d)]


def _params(c, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, 1, 3, 3, generator=g, dtype=torch.float64).to(device)
    gamma, beta = (1 + 0.2 * torch.randn(c, generator=g, dtype=torch.float64)).to(device), torch.zeros(c).double()
    return w, gamma, beta.to(device), torch.zeros(c, dtype=torch.float64, device=device), \
        torch.ones(c, dtype=torch.float64, device=device)


@pytest.mark.parametrize("device, backend_name", BACKENDS)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_empty_batch_gives_an_empty_output_without_a_launch(device, backend_name, training):
    x = torch.randn(0, 4, 7, 6, dtype=torch.float64, device=device).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    w, gamma, beta, rm, rv = _params(4, device)
    w1 = torch.randn(2, 4, dtype=torch.float64, device=device)
    w2 = torch.randn(4, 2, dtype=torch.float64, device=device)
    with mobileops.use_backend(backend_name), backend.record_calls() as calls:
        y = ops.dwconv_bn_act(x, w, gamma, beta, rm, rv, stride=2, activation="hswish", training=training)
        z = ops.bn_act(y, gamma, beta, rm, rv, activation="relu", training=training)
        z = ops.dwconv_act(z, w, beta, activation="relu6")
        z = ops.squeeze_excite(z, w1, None, w2, None)
    assert y.shape == (0, 4, 4, 3) and z.shape == (0, 4, 4, 3) and z.dtype == torch.float64
    assert {c["backend"] for c in calls} == {"torch"}, "an empty batch must not reach a kernel"
    assert torch.equal(rm, torch.zeros_like(rm)) and torch.equal(rv, torch.ones_like(rv))
    z.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("device, backend_name", BACKENDS)
def test_one_value_per_channel_is_refused_in_training_like_pytorch(device, backend_name):
    x = torch.randn(1, 4, 1, 1, dtype=torch.float64, device=device)
    w, gamma, beta, rm, rv = _params(4, device)
    with mobileops.use_backend(backend_name):
        with pytest.raises(ValueError, match="more than one value per channel"):
            ops.dwconv_bn_act(x, w, gamma, beta, rm, rv, training=True)
        with pytest.raises(ValueError, match="more than one value per channel"):
            ops.bn_act(x, gamma, beta, rm, rv, training=True)
        assert ops.bn_act(x, gamma, beta, rm, rv, training=False).shape == x.shape  # eval is fine
    with pytest.raises(ValueError, match="more than 1 value per channel"):  # PyTorch's own rule
        torch.nn.functional.batch_norm(x, rm.clone(), rv.clone(), training=True)


@pytest.mark.parametrize("device, backend_name", BACKENDS)
def test_nan_and_inf_land_where_pytorch_puts_them(device, backend_name):
    assert_nan_and_inf_land_as_with_torch(device, backend_name)


TRITON = [pytest.param(d, id=d) for d in DEVICES if "triton" in runnable_backends("dwconv_bn_act", d)]


@pytest.mark.parametrize("device", TRITON)
@pytest.mark.parametrize("limit, layout", [(1, torch.contiguous_format), (2, torch.channels_last)],
                         ids=["y1-nchw", "y2-nhwc"])
def test_channel_blocks_past_the_grid_limit_go_on_along_z(monkeypatch, device, layout, limit):
    """CUDA caps a grid's y extent at 65535, which NCHW Triton launches (4 channels per block)
    would pass at 262141 channels. Channel blocks then continue along z; lowering the cap makes
    every launch here take that path (with programs past the last block on the last z slice)."""
    from mobileops.kernels import _common
    monkeypatch.setattr(_common, "GRID_YZ_LIMIT", limit)
    g = torch.Generator().manual_seed(3)
    c = 40  # 3 channel blocks of 16 under the interpreter
    x = torch.randn(2, c, 4, 5, generator=g, dtype=torch.float64).to(device).contiguous(memory_format=layout)
    w, gamma, beta, rm, rv = _params(c, device, seed=4)
    fc = [(torch.randn(*shape, generator=g, dtype=torch.float64) / 4).to(device)
          for shape in ((5, c), (5,), (c, 5), (c,))]
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(device)
    results = {}
    for backend_name in ("triton", "torch"):
        leaves = [t.detach().clone().requires_grad_(True) for t in [x, w, gamma, beta] + fc]
        stats = [rm.clone(), rv.clone()]
        with mobileops.use_backend(backend_name):
            y = ops.dwconv_bn_act(*leaves[:4], *stats, activation="hswish", training=True)
            y = ops.bn_act(y, leaves[2], leaves[3], None, None, activation="relu6")
            y = ops.dwconv_act(y, leaves[1], leaves[3], activation="silu")
            y = ops.squeeze_excite(y, *leaves[4:], post_act="relu")
        y.backward(dy)
        results[backend_name] = [y] + [t.grad for t in leaves] + stats
    for i, (got, want) in enumerate(zip(results["triton"], results["torch"])):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=lambda m, i=i: f"result {i}: {m}")


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
