"""Property-based tests: hypothesis draws shapes, strides, kernel sizes, activations, dtypes,
layouts (contiguous, channels_last, strided slices) and modes, and every fused backend that runs
here must agree with the torch backend, forward and backward, running statistics included, by
tests/harness.py's ``check`` (the bound of docs/measuring.md; float64 to rtol 1e-9). Each (op,
backend) is a property of its own.

Without a GPU the CUDA backend's kernels (csrc/) run emulated on the CPU
(tests/cuda_emulation), so they are fuzzed on every machine.

By default the run is short and derandomized (the same examples every run): on CPU the Triton
kernels run in the interpreter, so the shapes are tiny; on a GPU every new example compiles new
kernel variants (2-3 s each on an H100). MOBILEOPS_HYPOTHESIS_EXAMPLES=N makes it a random run
of N examples per property (on a GPU, best outside xdist, with a generous per-test timeout)."""

import os

import pytest
import torch
from harness import (
    ACTIVATIONS,
    check,
    inputs,
    target_fixture,  # noqa: F401 (the fixture the tests parametrize)
    targets,
)
from helpers import DEVICES

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

DEVICE = DEVICES[-1]
EXAMPLES = int(os.environ.get("MOBILEOPS_HYPOTHESIS_EXAMPLES", "0"))
# The target fixture only selects a backend (and switches the emulated CUDA backend on) for the
# whole test, the same for every example.
PROPERTY = settings(max_examples=EXAMPLES or (6 if DEVICE == "cpu" else 15), deadline=None,
                    derandomize=not EXAMPLES, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
DTYPES = [torch.float64, torch.float32] + ([torch.float16, torch.bfloat16] if DEVICE == "cuda" else [])
MAX_SIDE = 9 if DEVICE == "cpu" else 40


def fused(op):
    """pytest params, one per fused backend that runs ``op`` on DEVICE (the CUDA backend emulated
    without a GPU), for the ``target`` fixture."""
    return [p for p in targets(op) if p.values[0].device == DEVICE and p.values[0].backend != "torch"]


pytestmark = pytest.mark.skipif(not fused("dwconv_bn_act"), reason="no fused backend runs here")


def kernel_sizes(target):
    """The depthwise kernel sizes to draw: the CUDA extension takes K = 3, 5, 7."""
    return [3, 5, 7] if target.backend == "cuda" else [3, 5, 7, 1]


@st.composite
def layouts(draw, op, shape, **kwargs):
    """The float64 arguments of ``op`` (tests/harness.py) with x in a drawn layout: contiguous,
    channels_last, or a strided slice of a larger channels_last tensor (non-contiguous in every
    dimension), each run as it is in float64 and converted (made dense) in lower precision."""
    layout, seed = draw(st.sampled_from(["nchw", "nhwc", "slice"])), draw(st.integers(0, 2 ** 16))
    if layout != "slice":
        return inputs(op, shape, layout=layout, seed=seed, device=DEVICE, **kwargs)
    n, c, h, w = shape
    big = inputs(op, (n, 2 * c + 1, h + 1, 2 * w), layout="nhwc", seed=seed, device=DEVICE, **kwargs)["x"]
    return inputs(op, shape, seed=seed, device=DEVICE, **kwargs) | dict(x=big[:, 1::2, 1:, ::2])


@st.composite
def conv_cases(draw, kernel_sizes):
    """An input shape, a depthwise kernel size and stride, a dtype, an activation and a mode."""
    k = draw(st.sampled_from(kernel_sizes))
    stride = draw(st.integers(1, 2))
    h, w = draw(st.integers(1, MAX_SIDE)), draw(st.integers(1, MAX_SIDE))
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 9)), h, w)
    training = draw(st.booleans())
    if training and shape[0] * ((h - 1) // stride + 1) * ((w - 1) // stride + 1) == 1:
        training = False  # one value per channel: refused, as by nn.BatchNorm2d
    return dict(shape=shape, k=k, stride=stride, dtype=draw(st.sampled_from(DTYPES)), training=training,
                activation=draw(st.sampled_from(ACTIVATIONS)), stats=draw(st.booleans()) or not training)


@pytest.mark.parametrize("target", fused("dwconv_bn_act"), indirect=True)
@PROPERTY
@given(data=st.data())
def test_dwconv_bn_act_agrees_with_torch(target, data):
    case = data.draw(conv_cases(kernel_sizes(target)), label="case")
    args = data.draw(layouts("dwconv_bn_act", case["shape"], k=case["k"], stats=case["stats"]), label="args")
    check("dwconv_bn_act", target, args, dtype=case["dtype"], reference="torch", stride=case["stride"],
          activation=case["activation"], training=case["training"], momentum=0.1, eps=1e-3)


@pytest.mark.parametrize("target", fused("dwconv_act"), indirect=True)
@PROPERTY
@given(data=st.data(), with_bias=st.booleans())
def test_dwconv_act_agrees_with_torch(target, data, with_bias):
    case = data.draw(conv_cases(kernel_sizes(target)), label="case")
    args = data.draw(layouts("dwconv_act", case["shape"], k=case["k"], biases=with_bias), label="args")
    check("dwconv_act", target, args, dtype=case["dtype"], reference="torch", stride=case["stride"],
          activation=case["activation"])


@pytest.mark.parametrize("target", fused("bn_act"), indirect=True)
@PROPERTY
@given(data=st.data())
def test_bn_act_agrees_with_torch(target, data):
    case = data.draw(conv_cases([3]), label="case")
    n, _, h, w = case["shape"]
    args = data.draw(layouts("bn_act", case["shape"]), label="args")
    check("bn_act", target, args, dtype=case["dtype"], reference="torch", activation=case["activation"],
          training=case["training"] and n * h * w > 1)


@pytest.mark.parametrize("target", fused("squeeze_excite"), indirect=True)
@PROPERTY
@given(data=st.data())
def test_squeeze_excite_agrees_with_torch(target, data):
    c, hidden = data.draw(st.integers(1, 24)), data.draw(st.integers(1, 8))
    shape = (data.draw(st.integers(1, 3)), c, data.draw(st.integers(1, MAX_SIDE)), data.draw(st.integers(1, MAX_SIDE)))
    args = data.draw(layouts("squeeze_excite", shape, hidden=hidden, biases=data.draw(st.booleans())), label="args")
    gate, post_act = data.draw(st.sampled_from(["hsigmoid", "sigmoid"])), data.draw(st.sampled_from(ACTIVATIONS))
    check("squeeze_excite", target, args, dtype=data.draw(st.sampled_from(DTYPES)), reference="torch", gate=gate,
          post_act=post_act)
