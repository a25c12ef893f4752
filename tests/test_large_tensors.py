"""Tensors past 2**31 elements: offsets no longer fit 32-bit integers.

On CPU the index arithmetic is checked by construction: the Triton launchers' choice of 64-bit
offsets (kernels/_common.index64) on shapes and strides of huge tensors that are never
allocated (meta tensors). Under the CPU interpreter every kernel runs with 64-bit offsets and
the interpreter flags any 32-bit overflow, so the other CPU tests cover the 64-bit code itself.
On a GPU with enough free memory the ops run on a real (2, 64, 4100, 4100) float16 tensor
(2.15e9 elements, 4.3 GB) and must agree with the torch backend everywhere, including the
elements whose offsets pass 2**31. That test checks addressing, not rounding (the precision
tests do that): integer-valued data keeps the convolution exact, so a wrong address shows up
as an error of whole units, far above the tolerance. The training tests' references are
float64, computed a few channels at a time (float32 one sample at a time for SE, which mixes
channels). The CUDA kernels' offsets past 2**31 are also checked on CPU, emulated
(tests/test_cuda_emulated.py)."""

import pytest
import torch
from helpers import relative_norm_error, runnable_backends

import mobileops
from mobileops import ops

LIMIT = 2 ** 31
SHAPE = (2, 64, 4100, 4100)
assert SHAPE[0] * SHAPE[1] * SHAPE[2] * SHAPE[3] > LIMIT


def _common():
    pytest.importorskip("triton")
    from mobileops.kernels import _common
    return _common


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_triton_launchers_choose_64_bit_offsets_past_2_31(monkeypatch, layout):
    common = _common()
    monkeypatch.setattr(common, "COMPILED_FOR_INTERPRETER", False)  # the choice a GPU run makes
    big = torch.empty(SHAPE, dtype=torch.float16, device="meta", memory_format=layout)
    assert common.index64(big)
    # the largest offset, not the element count, decides: a tensor one element short of 2**31 ...
    just_fits = torch.empty(1, 1, 1, LIMIT - 1, device="meta")
    assert not common.index64(just_fits)
    # ... a slice of three elements whose strides reach past 2**31 ...
    bigger = torch.empty((3,) + SHAPE[1:], dtype=torch.float16, device="meta", memory_format=layout)
    assert common.index64(bigger[:, :1, :1, :1])
    assert not common.index64(bigger[:2, :1, :1, :1])
    # ... and any operand of the call decides (output, gradients)
    assert common.index64(just_fits, big)
    assert not common.index64(torch.empty(0, 64, 4100, 4100, device="meta"))


def test_interpreter_always_runs_the_64_bit_path(monkeypatch):
    common = _common()
    monkeypatch.setattr(common, "COMPILED_FOR_INTERPRETER", True)
    assert common.index64(torch.empty(1, 1, 2, 2))


# ---- GPU -------------------------------------------------------------------------------------

def _free_gib():
    return torch.cuda.mem_get_info()[0] / 2 ** 30 if torch.cuda.is_available() else 0.0


needs_big_gpu = pytest.mark.skipif(_free_gib() < 48, reason="needs a CUDA GPU with 48 GiB free")
GPU_BACKENDS = runnable_backends("dwconv_bn_act", "cuda") if torch.cuda.is_available() else []


def _max_abs_diff(a, b):
    """max |a - b| in float32, a few channels at a time (a float32 copy of all is 8.6 GB)."""
    worst = 0.0
    for c0 in range(0, a.shape[1], 8):
        worst = max(worst, (a[:, c0:c0 + 8].float() - b[:, c0:c0 + 8].float()).abs().max().item())
    return worst


def _integer_input(layout, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.empty(SHAPE, dtype=torch.float16, device="cuda", memory_format=layout)
    return x.random_(-2, 3, generator=gen)  # -2..2: every 3x3 sum of x * (-1, 0, 1) is exact


def _synchronized(stage):
    """Fail naming ``stage`` if a kernel launched before this point faulted: CUDA reports
    errors at the next synchronising call, which would otherwise blame a later line."""
    try:
        torch.cuda.synchronize()
    except Exception as exc:  # torch.AcceleratorError (RuntimeError on older torch)
        pytest.fail(f"{stage}: {exc}")


def _params(c, k):
    g = torch.Generator().manual_seed(1)
    weight = torch.randint(-1, 2, (c, 1, k, k), generator=g).half().cuda()
    gamma, beta = (0.5 + torch.rand(c, generator=g)).cuda(), (0.2 * torch.randn(c, generator=g)).cuda()
    return weight, gamma, beta, torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")


@needs_big_gpu
@pytest.mark.parametrize("backend_name", [b for b in GPU_BACKENDS if b != "torch"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_inference_past_2_31_elements(backend_name, layout):
    x = _integer_input(layout)
    weight, gamma, beta, rm, rv = _params(SHAPE[1], 3)
    w1, w2 = torch.randn(16, SHAPE[1], device="cuda").half() / 8, torch.randn(SHAPE[1], 16, device="cuda").half() / 4
    calls = {
        "dwconv_bn_act": lambda: ops.dwconv_bn_act(x, weight, gamma, beta, rm, rv, activation="relu6"),
        "dwconv_act": lambda: ops.dwconv_act(x, weight, beta.half(), stride=2, activation="hswish"),
        "bn_act": lambda: ops.bn_act(x, gamma, beta, rm, rv, activation="silu"),
        "squeeze_excite": lambda: ops.squeeze_excite(x, w1, None, w2, None),
    }
    with torch.no_grad():
        for name, call in calls.items():
            with mobileops.use_backend(backend_name):
                ours = call()
            with mobileops.use_backend("torch"):
                expected = call()
            assert ours.shape == expected.shape and ours.is_contiguous(memory_format=layout)
            # fp16 rounding of values up to ~30 is 1/64; a wrong address costs whole units
            assert _max_abs_diff(ours, expected) <= 0.07, f"{name} ({backend_name}) differs"
            del ours, expected
            torch.cuda.empty_cache()


GROUP = 4  # channels per float64 reference pass: 1.07 GB per tensor, ~30 GB peak in all


def _fused_forward_backward(backend_name, layout, call):
    """(x, dy, y): y = call(x) run forward and backward with dy on ``backend_name``, where x and
    dy are independent integer-valued tensors in ``layout``; a fault fails naming its pass."""
    x = _integer_input(layout, seed=0).requires_grad_(True)
    # independent of x: with dy = x / 4 the weight gradient is ~4e6, past float16's range
    dy = _integer_input(layout, seed=1).mul_(0.25)
    with mobileops.use_backend(backend_name):
        y = call(x)
    _synchronized(f"{backend_name} forward")
    assert y.is_contiguous(memory_format=layout)
    y.backward(dy)
    _synchronized(f"{backend_name} backward")
    return x, dy, y.detach()


def _assert_within_rounding(op, backend_name, worst, scale):
    """max |ours - reference| per result within a few float16 rounding steps of its scale."""
    for what in worst:
        assert worst[what] <= 2e-3 * scale[what], (f"{op} {what} ({backend_name}): max error {worst[what]:.3g} "
                                                   f"at scale {scale[what]:.3g}")


def _channelwise_training(op):
    """(leaf parameters, running statistics or [], call(x, params, stats)) of a per-channel op
    in training: dwconv_bn_act and bn_act with batch statistics, dwconv_act with a bias."""
    weight, gamma, beta, rm, rv = _params(SHAPE[1], 3)
    if op == "dwconv_bn_act":
        return [weight, gamma, beta], [rm, rv], lambda x, p, s: ops.dwconv_bn_act(
            x, *p, *s, activation="silu", training=True, momentum=0.5)
    if op == "bn_act":
        return [gamma, beta], [rm, rv], lambda x, p, s: ops.bn_act(
            x, *p, *s, activation="silu", training=True, momentum=0.5)
    return [weight, beta.half()], [], lambda x, p, s: ops.dwconv_act(x, *p, activation="silu")


@needs_big_gpu
@pytest.mark.parametrize("backend_name", [b for b in GPU_BACKENDS if b != "torch"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("op", ["dwconv_bn_act", "bn_act", "dwconv_act"])
def test_training_forward_and_backward_past_2_31_elements(backend_name, layout, op):
    """Training forward (batch statistics, running-statistic update) and backward of the
    per-channel ops at 2.15e9 elements. The reference is the torch composition in float64, run
    GROUP channels at a time (a depthwise conv and BatchNorm never mix channels), so it needs
    no large-tensor kernel of PyTorch's and no float16 sums. The bounds are a few float16
    rounding steps: a wrong address moves a conv sum by a whole unit, far more. SiLU, which has
    no kinks, keeps float32-vs-float64 rounding from flipping a derivative."""
    params, stats, call = _channelwise_training(op)
    params = [t.requires_grad_(True) for t in params]
    x, dy, y = _fused_forward_backward(backend_name, layout, lambda x: call(x, params, stats))
    worst, scale = {"y": 0.0, "dx": 0.0}, {"y": 0.0, "dx": 0.0}
    names = [f"d{i}" for i in range(len(params))] + ["running_mean", "running_var"][:len(stats)]
    reference = {name: [] for name in names}
    for c0 in range(0, SHAPE[1], GROUP):
        part = slice(c0, c0 + GROUP)
        x64 = x.detach()[:, part].double().requires_grad_(True)
        p64 = [t.detach()[part].double().requires_grad_(True) for t in params]
        s64 = [torch.zeros(GROUP, dtype=torch.float64, device="cuda"),
               torch.ones(GROUP, dtype=torch.float64, device="cuda")][:len(stats)]
        with mobileops.use_backend("torch"):
            y64 = call(x64, p64, s64)
        y64.backward(dy[:, part].double())
        for what, got, want in (("y", y[:, part], y64.detach()), ("dx", x.grad[:, part], x64.grad)):
            worst[what] = max(worst[what], (got.double() - want).abs().max().item())
            scale[what] = max(scale[what], want.abs().max().item())
        for name, want in zip(names, [t.grad for t in p64] + s64):
            reference[name].append(want)
        del x64, y64
    _assert_within_rounding(op, backend_name, worst, scale)
    for name, got in zip(names, [t.grad for t in params] + stats):
        want = torch.cat(reference[name])
        rel = relative_norm_error(got, want)
        assert rel <= 5e-3, (f"{op} {name} ({backend_name}): relative error {rel:.3g}; all finite: "
                             f"{bool(got.isfinite().all())}")


@needs_big_gpu
@pytest.mark.parametrize("backend_name", [b for b in GPU_BACKENDS if b != "torch"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_squeeze_excite_backward_past_2_31_elements(backend_name, layout):
    """SE forward and backward at 2.15e9 elements against the torch composition in float32
    run one sample at a time (SE mixes channels, not samples; the samples' weight gradients
    add up). A float32 reference of a whole sample is 4.3 GB per tensor, where a float64 one
    would not fit beside the float16 operands."""
    c, hidden = SHAPE[1], 16
    g = torch.Generator().manual_seed(2)
    weights = [torch.randn(hidden, c, generator=g) / 8, 0.1 * torch.randn(hidden, generator=g),
               torch.randn(c, hidden, generator=g) / 4, 0.1 * torch.randn(c, generator=g)]
    weights = [w.half().cuda().requires_grad_(True) for w in weights]
    x, dy, y = _fused_forward_backward(backend_name, layout,
                                       lambda x: ops.squeeze_excite(x, *weights, post_act="hswish"))
    worst, scale = {"y": 0.0, "dx": 0.0}, {"y": 0.0, "dx": 0.0}
    grads = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    for n in range(SHAPE[0]):
        x32 = x.detach()[n:n + 1].float().requires_grad_(True)
        w32 = [w.detach().float().requires_grad_(True) for w in weights]
        with mobileops.use_backend("torch"):
            y32 = ops.squeeze_excite(x32, *w32, post_act="hswish")
        y32.backward(dy[n:n + 1].float())
        for what, got, want in (("y", y[n:n + 1], y32.detach()), ("dx", x.grad[n:n + 1], x32.grad)):
            worst[what] = max(worst[what], _max_abs_diff(got, want))
            scale[what] = max(scale[what], want.abs().max().item())
        for total, w in zip(grads, w32):
            total += w.grad
        del x32, y32
        torch.cuda.empty_cache()
    _assert_within_rounding("squeeze_excite", backend_name, worst, scale)
    for i, (w, want) in enumerate(zip(weights, grads)):
        rel = relative_norm_error(w.grad, want)
        assert rel <= 5e-3, f"squeeze_excite weight gradient {i} ({backend_name}): relative error {rel:.3g}"
