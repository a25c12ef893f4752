"""Property-based tests: hypothesis draws shapes, strides, kernel sizes, activations, dtypes,
layouts (contiguous, channels_last, strided slices) and modes, and every fused backend that runs
here must agree with the torch backend, forward and backward, within the bound of docs/measuring.md.

Without a GPU the CUDA backend's kernels (csrc/) run emulated on the CPU
(tests/cuda_emulation), so they are fuzzed on every machine.

By default the run is short and derandomized (the same examples every run): on CPU the Triton
kernels run in the interpreter, so the shapes are tiny; on a GPU every new example compiles new
kernel variants (2-3 s each on an H100). MOBILEOPS_HYPOTHESIS_EXAMPLES=N makes it a random run
of N examples per property (on a GPU, best outside xdist, with a generous per-test timeout)."""

import contextlib
import os

import pytest
import torch
from helpers import DEVICES, assert_within_bound, cuda_backend_on_cpu, runnable_backends

import mobileops
from mobileops import ops

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

DEVICE = DEVICES[-1]
FUSED = [b for b in runnable_backends("dwconv_bn_act", DEVICE) if b != "torch"]
EMULATED_CUDA = DEVICE == "cpu"
if EMULATED_CUDA:
    FUSED.append("cuda")
EXAMPLES = int(os.environ.get("MOBILEOPS_HYPOTHESIS_EXAMPLES", "0"))
PROPERTY = settings(max_examples=EXAMPLES or (6 if DEVICE == "cpu" else 15), deadline=None,
                    derandomize=not EXAMPLES, database=None, print_blob=True)
ACTIVATIONS = ["none", "relu", "relu6", "hswish", "silu", "hsigmoid"]
DTYPES = [torch.float64, torch.float32] + ([torch.float16, torch.bfloat16] if DEVICE == "cuda" else [])
MAX_SIDE = 9 if DEVICE == "cpu" else 40

pytestmark = pytest.mark.skipif(not FUSED, reason="no fused backend runs here")


@st.composite
def activations(draw, x_shape, dtype, layout_name):
    """An input of ``x_shape`` drawn in ``layout_name``: contiguous, channels_last, or a strided
    slice of a larger channels_last tensor (non-contiguous in every dimension)."""
    seed = draw(st.integers(0, 2 ** 16))
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = x_shape
    if layout_name == "slice":
        big = torch.randn(n, 2 * c + 1, h + 1, 2 * w, generator=g, dtype=torch.float64)
        x = big.to(memory_format=torch.channels_last)[:, 1::2, 1:, ::2]
    else:
        x = torch.randn(x_shape, generator=g, dtype=torch.float64)
        if layout_name == "nhwc":
            x = x.contiguous(memory_format=torch.channels_last)
    return x.to(DEVICE, dtype), g


@st.composite
def conv_cases(draw):
    k = draw(st.sampled_from([3, 5, 7, 1]))
    stride = draw(st.integers(1, 2))
    h, w = draw(st.integers(1, MAX_SIDE)), draw(st.integers(1, MAX_SIDE))
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 9)), h, w)
    dtype = draw(st.sampled_from(DTYPES))
    x, g = draw(activations(shape, dtype, draw(st.sampled_from(["nchw", "nhwc", "slice"]))))
    training = draw(st.booleans())
    if training and shape[0] * ((h - 1) // stride + 1) * ((w - 1) // stride + 1) == 1:
        training = False  # one value per channel: refused, as by nn.BatchNorm2d
    return dict(x=x, g=g, k=k, stride=stride, training=training, activation=draw(st.sampled_from(ACTIVATIONS)),
                stats=draw(st.booleans()) or not training)


def backends_for(k=3):
    """The fused backends to compare: all that run here (the CUDA extension takes K = 3, 5, 7)."""
    return [b for b in FUSED if b != "cuda" or k in (3, 5, 7)]


@pytest.fixture(scope="module")
def cuda_emulation(request):
    """The emulated CUDA extension on a machine without a GPU, else None."""
    return request.getfixturevalue("emulated_extension") if EMULATED_CUDA else None


def bn_dtype(dtype):
    """BatchNorm parameters and statistics stay float32 under low precision, as in nn modules."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as_dtype(tensors, dtype, bn_params):
    """``tensors`` converted to ``dtype``, the last ``bn_params`` of them to bn_dtype."""
    return [t.detach().to(dtype if i < len(tensors) - bn_params else bn_dtype(dtype)) for i, t in enumerate(tensors)]


def _run(backend_name, fn, tensors, dtype, dy, bn_params, emulation=None):
    """fn on leaves converted to ``dtype`` (see _as_dtype); returns the output and every
    gradient. ``emulation``: run ``cuda`` on the emulated build."""
    leaves = [t.requires_grad_(True) for t in _as_dtype(tensors, dtype, bn_params)]
    emulated = backend_name == "cuda" and emulation is not None
    with cuda_backend_on_cpu(emulation) if emulated else contextlib.nullcontext():  # the backward too
        with mobileops.use_backend(backend_name):
            y = fn(*leaves)
        y.backward(dy.to(dtype))
    return [y.detach()] + [t.grad for t in leaves]


def _assert_agree(backends, fn, tensors, dtype, dy, what, bn_params=0, emulation=None):
    """The error-bound rule (docs/measuring.md) on the output and every gradient, for each of
    ``backends``: within twice the torch backend's own error in ``dtype`` (against float64) plus
    the dtype's floor; float64 itself to 1e-9."""
    # The float64 reference starts from the inputs as the dtype runs see them (rounded to the
    # dtype, BatchNorm tensors to bn_dtype): otherwise it also measures the inputs' rounding,
    # which for a one-element reduction (dgamma of one channel) can exceed twice torch's error
    # by luck of cancellation alone (seen on an H100: fp16 weights rounded, 2.8e-4 vs 7e-5).
    rounded = _as_dtype(tensors, dtype, bn_params)
    ref = _run("torch", fn, rounded, torch.float64, dy.to(dtype).double(), bn_params)
    base = _run("torch", fn, tensors, dtype, dy, bn_params) if dtype != torch.float64 else None
    for backend_name in backends:
        ours = _run(backend_name, fn, tensors, dtype, dy, bn_params, emulation)
        where = f"{backend_name}: {what}"
        if base is None:
            for i, (o, r) in enumerate(zip(ours, ref)):
                assert not torch.isnan(o).any(), f"{where}: NaN in result {i}"
                torch.testing.assert_close(o, r, rtol=0, atol=1e-9 * max(r.abs().max().item(), 1.0),
                                           msg=lambda m, i=i, where=where: f"{where}: result {i}: {m}")
        else:
            for i, (o, r, b) in enumerate(zip(ours, ref, base)):
                assert_within_bound(o, r, b, f"{where}: result {i}")


def _per_channel(g, c, low, high):
    return (low + (high - low) * torch.rand(c, generator=g, dtype=torch.float64)).to(DEVICE)


@PROPERTY
@given(case=conv_cases())
def test_dwconv_bn_act_agrees_with_torch(cuda_emulation, case):
    x, g, k = case["x"], case["g"], case["k"]
    c = x.shape[1]
    weight = (torch.randn(c, 1, k, k, generator=g, dtype=torch.float64) / k).to(DEVICE)
    gamma, beta = _per_channel(g, c, 0.5, 1.5), _per_channel(g, c, -0.3, 0.3)
    rm, rv = (_per_channel(g, c, -0.2, 0.2), _per_channel(g, c, 0.5, 1.5)) if case["stats"] else (None, None)

    def fn(x, weight, gamma, beta):
        stats = [None, None] if rm is None else [rm.to(bn_dtype(x.dtype)), rv.to(bn_dtype(x.dtype))]
        return ops.dwconv_bn_act(x, weight, gamma, beta, *stats, stride=case["stride"],
                                 activation=case["activation"], training=case["training"], momentum=0.1, eps=1e-3)

    with torch.no_grad():
        out_shape = fn(x.double(), weight, gamma, beta).shape
    dy = torch.randn(out_shape, generator=g, dtype=torch.float64).to(DEVICE)
    what = {key: v for key, v in case.items() if key not in ("x", "g")} | dict(shape=tuple(x.shape), dtype=x.dtype)
    _assert_agree(backends_for(k), fn, [x, weight, gamma, beta], x.dtype, dy, str(what), bn_params=2,
                  emulation=cuda_emulation)


@PROPERTY
@given(case=conv_cases(), with_bias=st.booleans())
def test_bn_act_and_dwconv_act_agree_with_torch(cuda_emulation, case, with_bias):
    x, g, k = case["x"], case["g"], case["k"]
    c = x.shape[1]
    weight = (torch.randn(c, 1, k, k, generator=g, dtype=torch.float64) / k).to(DEVICE)
    bias = _per_channel(g, c, -0.3, 0.3) if with_bias else None
    gamma, beta = _per_channel(g, c, 0.5, 1.5), _per_channel(g, c, -0.3, 0.3)
    rm, rv = _per_channel(g, c, -0.2, 0.2), _per_channel(g, c, 0.5, 1.5)
    training = case["training"] and x.shape[0] * x.shape[2] * x.shape[3] > 1
    what = f"{tuple(x.shape)} {x.dtype} k{k} s{case['stride']} {case['activation']} train={training} bias={with_bias}"

    def folded(x, weight, *bias_):
        return ops.dwconv_act(x, weight, *(bias_ or [None]), stride=case["stride"], activation=case["activation"])

    def bn(x, gamma, beta):
        return ops.bn_act(x, gamma, beta, rm.to(bn_dtype(x.dtype)), rv.to(bn_dtype(x.dtype)),
                          activation=case["activation"], training=training)

    with torch.no_grad():
        dy = torch.randn(folded(x.double(), weight).shape, generator=g, dtype=torch.float64).to(DEVICE)
    _assert_agree(backends_for(k), folded, [x, weight] + ([bias] if with_bias else []), x.dtype, dy,
                  f"dwconv_act {what}", emulation=cuda_emulation)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(DEVICE)
    _assert_agree(backends_for(), bn, [x, gamma, beta], x.dtype, dy, f"bn_act {what}", bn_params=2,
                  emulation=cuda_emulation)


@PROPERTY
@given(data=st.data())
def test_squeeze_excite_agrees_with_torch(cuda_emulation, data):
    c, hidden = data.draw(st.integers(1, 24)), data.draw(st.integers(1, 8))
    shape = (data.draw(st.integers(1, 3)), c, data.draw(st.integers(1, MAX_SIDE)), data.draw(st.integers(1, MAX_SIDE)))
    dtype = data.draw(st.sampled_from(DTYPES))
    x, g = data.draw(activations(shape, dtype, data.draw(st.sampled_from(["nchw", "nhwc", "slice"]))))
    gate, post_act = data.draw(st.sampled_from(["hsigmoid", "sigmoid"])), data.draw(st.sampled_from(ACTIVATIONS))
    biases = data.draw(st.booleans())
    params = [torch.randn(hidden, c, generator=g, dtype=torch.float64).to(DEVICE) / c ** 0.5,
              _per_channel(g, hidden, -0.3, 0.3) if biases else None,
              torch.randn(c, hidden, generator=g, dtype=torch.float64).to(DEVICE) / hidden ** 0.5,
              _per_channel(g, c, -0.3, 0.3) if biases else None]

    def fn(x, w1, *rest):
        b1, w2, b2 = rest if biases else (None, rest[0], None)
        return ops.squeeze_excite(x, w1, b1, w2, b2, gate=gate, post_act=post_act)

    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE)
    tensors = [x] + [p for p in params if p is not None]
    _assert_agree(backends_for(), fn, tensors, dtype, dy, f"squeeze_excite {shape} {dtype} {gate}/{post_act} "
                  f"biases={biases}", emulation=cuda_emulation)
