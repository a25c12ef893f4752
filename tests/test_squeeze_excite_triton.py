"""The triton backend of squeeze_excite beyond the generic parity tests of test_ops.py: several
MLP channel blocks and pooling chunks, strided inputs, custom-op registration, torch.compile,
low precision with poisoned allocations, determinism. CPU interpreter without a GPU."""

import pytest
import torch
from harness import LAYOUTS, assert_parity, check, inputs, run
from helpers import count_launches
from torch.utils._python_dispatch import TorchDispatchMode

import mobileops
from mobileops import ops, yolo

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(n, c, h, w, reduced, *, dtype=torch.float64, layout="nchw", seed=0, biases=True):
    """The op's positional tensors (tests that call the op or its custom ops directly)."""
    return list(inputs("squeeze_excite", (n, c, h, w), hidden=reduced, dtype=dtype, layout=layout, seed=seed,
                       biases=biases, device=DEVICE).values())


def _se(shape, reduced, **kwargs):
    return inputs("squeeze_excite", shape, hidden=reduced, device=DEVICE, **kwargs)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("gate,post_act,biases", [("hsigmoid", "hswish", True), ("sigmoid", "none", False)])
def test_many_channel_blocks_and_chunks(layout, gate, post_act, biases):
    """C = 72 spans three MLP channel blocks and H x W = 99 two pooling chunks (interpreter)."""
    ours = check("squeeze_excite", "triton", _se((2, 72, 9, 11), 18, layout=layout, biases=biases),
                 reference="torch", gate=gate, post_act=post_act)
    assert ours["y"].is_contiguous(memory_format=LAYOUTS[layout])


def test_strided_input_and_output_gradient():
    big = torch.randn(3, 40, 10, 12, dtype=torch.float64, device=DEVICE)
    x = big[:, 5:29, 1:9, ::2]
    assert not x.is_contiguous()
    args = _se((1, 24, 1, 1), 6) | dict(x=x)
    dy = torch.randn(3, 24, 6, 8, dtype=torch.float64, device=DEVICE).transpose(2, 3)
    ours, ref = (run("squeeze_excite", b, args, dy=dy, gate="hsigmoid", post_act="relu") for b in ("triton", "torch"))
    assert_parity(ours, ref, what="strided")


def test_custom_ops_pass_opcheck():
    x, w1, b1, w2, b2 = (t.requires_grad_(True) for t in _inputs(2, 12, 5, 6, 3))
    torch.library.opcheck(torch.ops.mobileops.squeeze_excite_triton.default, (x, w1, b1, w2, b2, "hsigmoid", "hswish"))
    torch.library.opcheck(torch.ops.mobileops.squeeze_excite_triton.default, (x, w1, None, w2, None, "sigmoid", "none"))
    _, pooled, gates = torch.ops.mobileops.squeeze_excite_triton(x, w1, b1, w2, b2, "hsigmoid", "relu6")
    dy = torch.randn_like(x)
    torch.library.opcheck(torch.ops.mobileops.squeeze_excite_triton_backward.default,
                          (dy, x.detach(), w1.detach(), b1.detach(), w2.detach(), b2.detach(), pooled.detach(),
                           gates.detach(),
                           "hsigmoid", "relu6"))


def test_torch_compile_fullgraph():
    se = mobileops.nn.SELayer(16).double().to(DEVICE)
    compiled = torch.compile(se, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")
    x = torch.randn(2, 16, 7, 5, dtype=torch.float64, device=DEVICE)
    with mobileops.use_backend("triton"):
        results = []
        for model in (se, compiled):
            xi = x.clone().requires_grad_(True)
            model.zero_grad()
            y = model(xi)
            y.square().sum().backward()
            results.append([y.detach(), xi.grad] + [p.grad.clone() for p in se.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype,layout", [(torch.float16, "nhwc"), (torch.bfloat16, "nchw"), (torch.float32, "nhwc")],
                         ids=["fp16-nhwc", "bf16-nchw", "fp32-nhwc"])
def test_low_precision_within_the_error_bound(monkeypatch, dtype, layout):
    _check_low_precision(monkeypatch, (3, 40, 9, 7), 10, dtype, layout)


def _se_layers():
    """(C, H, W, reduced) of every squeeze_excite call of yolov5-mobilenetv3 at 640."""
    calls = yolo.fused_op_calls(yolo.build("yolov5-mobilenetv3"), (1, 3, 640, 640))
    return sorted({c["inputs"][0][0][1:] + (c["inputs"][1][0][0],) for c in calls if c["op"] == "squeeze_excite"})


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layer", _se_layers() if DEVICE == "cuda" else [None], ids=str)
def test_real_layer_shapes_within_the_error_bound(monkeypatch, layer, dtype):
    c, h, w, reduced = layer
    _check_low_precision(monkeypatch, (16, c, h, w), reduced, dtype, "nhwc")


def _check_low_precision(monkeypatch, shape, reduced, dtype, layout):
    """Output and input gradient within twice the torch backend's error (weight gradients:
    relative to their norm), with every allocation poisoned."""
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
    ours = check("squeeze_excite", "triton", _se(shape, reduced, layout=layout), dtype=dtype,
                 by_norm=("dfc1_weight", "dfc1_bias", "dfc2_weight", "dfc2_bias"), gate="hsigmoid", post_act="hswish")
    assert ours["y"].is_contiguous(memory_format=LAYOUTS[layout])


def test_deterministic_results():
    inputs = _se((4, 24, 6, 6), 6, dtype=torch.float32)
    runs = [run("squeeze_excite", "triton", inputs, gate="sigmoid", post_act="none") for _ in range(2)]
    for name, a in runs[0].items():
        assert torch.equal(a, runs[1][name]), name


@pytest.mark.parametrize("biases", [True, False], ids=["biases", "no-biases"])
def test_two_launches_forward_and_at_most_three_backward(monkeypatch, biases):
    inputs = _inputs(2, 20, 5, 6, 5, biases=biases)
    leaves = [t.requires_grad_(True) for t in inputs if t is not None]
    launched = count_launches(monkeypatch)
    with mobileops.use_backend("triton"):
        with torch.no_grad():
            ops.squeeze_excite(*inputs)
        assert len(launched) == 2, "inference"
        launched.clear()
        y = ops.squeeze_excite(*inputs)
        assert len(launched) == 2, "training forward"
        launched.clear()
        torch.autograd.grad(y, leaves, torch.ones_like(y))
        assert len(launched) <= 3, "backward"


class _RecordingOps(TorchDispatchMode):
    """The aten ops run while active, by name."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_repeated_calls_fill_nothing_with_zeros_and_leave_the_counters_zero():
    """The ticket counters are zero-filled once, reset by the kernels, and reused."""
    from mobileops.kernels import squeeze_excite as se

    x, w1, b1, w2, b2 = _inputs(3, 20, 9, 8, 5)
    kwargs = dict(gate="hsigmoid", post_act="hswish")
    dy = torch.randn_like(x)

    def call():
        y, pooled, gates = se.forward(x, w1, b1, w2, b2, out=torch.empty_like(x), **kwargs)
        grads = se.backward(dy, x, w1, b1, w2, b2, pooled, gates, memory_format=torch.contiguous_format, **kwargs)
        return [y, pooled, gates, *grads]

    first = call()
    recording = _RecordingOps()
    with recording:
        second = call()
    assert not [name for name in recording.names if "zero" in name or "fill" in name]
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    from mobileops.kernels import _common

    counters = _common._TICKET_COUNTERS[(x.device, 0)]
    assert counters.numel() >= 3 and not counters.any()


@pytest.mark.parametrize("shape,reduced", [
    ((1, 37, 13, 11), 5),    # N = 1; C not a multiple of the channel block; three chunks per sample
    ((3, 21, 3, 4), 33),     # R past one weight-gradient tile, a single short chunk
    ((5, 3, 10, 13), 2),     # fewer channels than a block, two chunks
], ids=["n1-c37-3chunks", "r33", "c3"])
def test_odd_shapes_match_the_torch_backend(shape, reduced):
    check("squeeze_excite", "triton", _se(shape, reduced, layout="nhwc"), reference="torch", gate="hsigmoid",
          post_act="relu6")


def test_each_signature_gets_its_own_launch_plan():
    """Calls that differ only in what the cached plans are keyed on (layout, biases, gate, batch
    size: a larger batch also grows the counters) each match the torch backend."""
    variants = [dict(layout="nchw"), dict(layout="nhwc"), dict(layout="nhwc", biases=False),
                dict(layout="nhwc", gate="sigmoid"), dict(layout="nhwc", n=7)]
    for variant in variants:
        what = str(variant)
        n, gate = variant.pop("n", 2), variant.pop("gate", "hsigmoid")
        ours, ref = (run("squeeze_excite", b, _se((n, 20, 5, 6), 5, **variant), gate=gate, post_act="hswish")
                     for b in ("triton", "torch"))
        assert_parity(ours, ref, what=what)
