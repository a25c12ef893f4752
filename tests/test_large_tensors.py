"""Tensors past 2**31 elements: offsets no longer fit 32-bit integers.

On CPU the index arithmetic is checked by construction: the Triton launchers' choice of 64-bit
offsets (kernels/_common.index64) on shapes and strides of huge tensors that are never
allocated (meta tensors). Under the CPU interpreter every kernel runs with 64-bit offsets and
the interpreter flags any 32-bit overflow, so the other CPU tests cover the 64-bit code itself.
On a GPU with enough free memory the ops run on a real (2, 64, 4100, 4100) float16 tensor
(2.15e9 elements, 4.3 GB) and must agree with the torch backend everywhere, including the
elements whose offsets pass 2**31. That test checks addressing, not rounding (the precision
tests do that): integer-valued data keeps the convolution exact, so a wrong address shows up
as an error of whole units, far above the tolerance. The training test's reference is float64,
computed a few channels at a time. The CUDA kernels' offsets past 2**31 are also checked on CPU,
emulated (tests/test_cuda_emulated.py)."""

import pytest
import torch

import mobileops
from mobileops import backend, ops

from helpers import relative_norm_error, runnable_backends

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


@pytest.mark.parametrize("backend_name", ["triton", "cuda"])
def test_fused_backends_refuse_training_past_2_31_elements(monkeypatch, backend_name):
    """Until the GPU training test below passes, the fused backends refuse such calls instead of
    risking wrong gradients or a memory fault; inference and the torch backend go on."""
    monkeypatch.setattr(backend, "_backend_problem", lambda name, device: None)
    device = torch.device("cuda")
    with mobileops.use_backend(backend_name):
        with pytest.raises(backend.BackendUnavailableError, match="refuses training"):
            backend.resolve("dwconv_bn_act", device, inference=False, numel=LIMIT)
        backend.resolve("dwconv_bn_act", device, inference=False, numel=LIMIT - 1)
        backend.resolve("dwconv_bn_act", device, inference=True, numel=LIMIT)
    with mobileops.use_backend("torch"):
        backend.resolve("dwconv_bn_act", device, inference=False, numel=LIMIT)


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


@needs_big_gpu
@pytest.mark.parametrize("backend_name", [b for b in GPU_BACKENDS if b != "torch"])
def test_training_forward_and_backward_past_2_31_elements(monkeypatch, backend_name):
    """Training forward (batch statistics, running-statistic update) and backward of
    dwconv_bn_act at 2.15e9 elements. The reference is the torch composition in float64, run
    GROUP channels at a time (a depthwise conv and BatchNorm never mix channels), so it needs
    no large-tensor kernel of PyTorch's and no float16 sums. The bounds are a few float16
    rounding steps: a wrong address moves a conv sum by a whole unit, far more. SiLU, which has
    no kinks, keeps float32-vs-float64 rounding from flipping a derivative."""
    monkeypatch.setattr(backend, "UNVERIFIED_TRAINING_ELEMENTS", 2 ** 62)  # measure the kernels themselves
    x = _integer_input(torch.channels_last, seed=0).requires_grad_(True)
    # independent of x: with dy = x / 4 the weight gradient is ~4e6, past float16's range
    dy = _integer_input(torch.channels_last, seed=1).mul_(0.25)
    weight, gamma, beta, rm, rv = _params(SHAPE[1], 3)
    params = [t.requires_grad_(True) for t in (weight, gamma, beta)]
    with mobileops.use_backend(backend_name):
        y = ops.dwconv_bn_act(x, *params, rm, rv, activation="silu", training=True, momentum=0.5)
    _synchronized(f"{backend_name} forward")
    y.backward(dy)
    _synchronized(f"{backend_name} backward")
    y = y.detach()
    worst, scale = {"y": 0.0, "dx": 0.0}, {"y": 0.0, "dx": 0.0}
    reference = {"dweight": [], "dgamma": [], "dbeta": [], "running_mean": [], "running_var": []}
    for c0 in range(0, SHAPE[1], GROUP):
        part = slice(c0, c0 + GROUP)
        x64 = x.detach()[:, part].double().requires_grad_(True)
        w64, g64, b64 = (t.detach()[part].double().requires_grad_(True) for t in params)
        rm64 = torch.zeros(GROUP, dtype=torch.float64, device="cuda")
        rv64 = torch.ones(GROUP, dtype=torch.float64, device="cuda")
        with mobileops.use_backend("torch"):
            y64 = ops.dwconv_bn_act(x64, w64, g64, b64, rm64, rv64, activation="silu", training=True, momentum=0.5)
        y64.backward(dy[:, part].double())
        for what, got, want in (("y", y[:, part], y64.detach()), ("dx", x.grad[:, part], x64.grad)):
            worst[what] = max(worst[what], (got.double() - want).abs().max().item())
            scale[what] = max(scale[what], want.abs().max().item())
        for what, want in zip(reference, (w64.grad, g64.grad, b64.grad, rm64, rv64)):
            reference[what].append(want)
        del x64, y64
    for what in worst:
        assert worst[what] <= 2e-3 * scale[what], (f"{what} ({backend_name}): max error {worst[what]:.3g} "
                                                   f"at scale {scale[what]:.3g}")
    for what, got in zip(reference, (weight.grad, gamma.grad, beta.grad, rm, rv)):
        want = torch.cat(reference[what])
        rel = relative_norm_error(got, want)
        assert rel <= 5e-3, (f"{what} ({backend_name}): relative error {rel:.3g}; all finite: "
                             f"{bool(got.isfinite().all())}")
