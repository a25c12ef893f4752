"""The triton backend of dwconv_bn_act beyond the backend-generic parity tests of test_ops.py:
block/chunk boundaries, custom-op registration, torch.compile, determinism, gradients of
unusual layouts, poisoned outputs, and (with a GPU) the detectors' real layer shapes in
fp16/bf16/fp32 and CUDA-graph capture. Without a GPU the kernels run in Triton's CPU
interpreter; tests that need a GPU skip with the reason."""

import collections
import functools

import pytest
import torch
from helpers import FLOORS, assert_within_bound, count_launches, relative_norm_error
from torch import nn

import mobileops
from mobileops import ops, yolo

pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
interpreter_only = pytest.mark.skipif(CUDA, reason="checks the CPU interpreter's block configuration")


def _kernels():
    from mobileops.kernels import dwconv_bn_act as kernels

    return kernels


def _common():
    from mobileops.kernels import _common as common

    return common


def _inputs(shape, k, *, dtype=torch.float64, device=DEVICE, layout=torch.contiguous_format, seed=0):
    """x, weight, bn weight, bn bias, running mean, running var (BN tensors in float32, or
    float64 with float64 x)."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    bn_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype).contiguous(memory_format=layout)
    weight = (torch.randn(c, 1, k, k, generator=g, dtype=torch.float64) / k).to(device, dtype)
    bn = [1 + 0.3 * torch.randn(c, generator=g), 0.2 * torch.randn(c, generator=g),
          0.2 * torch.randn(c, generator=g), 0.5 + torch.rand(c, generator=g)]
    return [x, weight] + [t.to(device, bn_dtype) for t in bn]


def _fwd_bwd(backend_name, inputs, dy=None, *, leaves=(0, 1, 2, 3), **kwargs):
    """Run ops.dwconv_bn_act forward and backward on fresh copies of ``inputs`` (running stats
    included); returns outputs, gradients and the updated running statistics by name."""
    tensors = [t.detach().clone(memory_format=torch.preserve_format) for t in inputs]
    for i in leaves:
        tensors[i].requires_grad_(True)
    with mobileops.use_backend(backend_name):
        y = ops.dwconv_bn_act(*tensors, **kwargs)
    if dy is None:
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(y)
    y.backward(dy)
    names = ("dx", "dweight", "dgamma", "dbeta")
    out = {"y": y.detach(), "running_mean": tensors[4], "running_var": tensors[5]}
    out.update({names[i]: tensors[i].grad for i in leaves})
    return out


def _assert_same(ours, ref, rtol=1e-9, atol=1e-10):
    for name, value in ref.items():
        torch.testing.assert_close(ours[name], value, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


# ---- block, tile and chunk boundaries ------------------------------------------------------

@pytest.fixture
def fresh_plans():
    """The launchers cache their block sizes per call signature: a test that changes the block
    configuration starts and ends with no cached plans."""
    _kernels().clear_plans()
    yield
    _kernels().clear_plans()


@interpreter_only
@pytest.mark.parametrize("shape,k,stride,layout,blocks", [
    ((2, 6, 4, 9), 3, 1, torch.channels_last, (8, 4)), ((1, 6, 9, 8), 5, 2, torch.contiguous_format, (8, 4)),
    ((1, 70, 5, 6), 3, 2, torch.channels_last, (8, 64)), ((1, 130, 5, 5), 3, 1, torch.channels_last, (4, 128))],
    ids=["k3-nhwc", "k5-stride2-nchw", "block64", "block128"])
def test_small_blocks_cover_every_boundary(monkeypatch, fresh_plans, shape, k, stride, layout, blocks):
    """Chunks of 20 positions and blocks of 8 positions x 4 channels: several channel blocks
    (the last partial), several tiles per chunk (the last partial) and several chunks per
    sample, in every kernel. Channel blocks of 64 and 128 make the last program of a block
    merge its statistics and sums in several steps (32 and 64 channels at a time)."""
    monkeypatch.setattr(_common(), "INTERPRETER_META", dict(BLOCK_P=blocks[0], BLOCK_C=blocks[1]))
    monkeypatch.setattr(_common(), "INTERPRETER_CHUNK", 20)
    inputs = _inputs(shape, k, layout=layout)
    for training in (True, False):
        kwargs = dict(stride=stride, activation="hswish", training=training, momentum=0.3, eps=1e-3)
        _assert_same(_fwd_bwd("triton", inputs, **kwargs), _fwd_bwd("torch", inputs, **kwargs))


# ---- launches per call, reused scratch and plans ---------------------------------------------

@pytest.fixture
def launches(monkeypatch):
    """The names of the kernels launched, in order."""
    return count_launches(monkeypatch)


def _ticket_counters_are_zero():
    counters = _common()._TICKET_COUNTERS.get((torch.device(DEVICE), 0))
    return counters is not None and not counters.any()


def _record_zero_fills(monkeypatch):
    """The torch zero fills called from now on (torch.zeros, torch.zeros_like, Tensor.zero_)."""
    fills = []

    def recording(name, real):
        def fill(*args, **kwargs):
            fills.append(name)
            return real(*args, **kwargs)
        return fill

    for name in ("zeros", "zeros_like"):
        monkeypatch.setattr(torch, name, recording(name, getattr(torch, name)))
    monkeypatch.setattr(torch.Tensor, "zero_", recording("zero_", torch.Tensor.zero_))
    return fills


@pytest.mark.parametrize("conv", [True, False], ids=["dwconv_bn_act", "bn_act"])
def test_launches_per_call(monkeypatch, launches, conv):
    """Inference: 1 launch; training forward: 2 (statistics, normalise); training backward: 3
    with a conv (du sums, main pass, transposed conv), 2 for bn_act; eval-mode backward one
    fewer. No zero fills once a first call has allocated the ticket counters."""
    x, w, gamma, beta, rm, rv = _inputs((2, 20, 9, 7), 3, layout=torch.channels_last)

    def call(training):
        xi = x.clone().requires_grad_(True)
        with mobileops.use_backend("triton"):
            launches.clear()
            if conv:
                y = ops.dwconv_bn_act(xi, w.clone().requires_grad_(True), gamma, beta, rm, rv, activation="relu6",
                                      training=training)
            else:
                y = ops.bn_act(xi, gamma, beta, rm, rv, activation="relu6", training=training)
            forward = list(launches)
            launches.clear()
            y.backward(torch.ones_like(y))
        return forward, list(launches)

    call(True)
    fills = _record_zero_fills(monkeypatch)
    forward, backward = call(True)
    assert (len(forward), len(backward)) == (2, 3 if conv else 2), (forward, backward)
    forward, backward = call(False)
    assert (len(forward), len(backward)) == (1, 2 if conv else 1), (forward, backward)
    assert fills == []
    assert _ticket_counters_are_zero()


def test_repeated_calls_reuse_plans_and_counters():
    """Calls with one signature share a cached plan and the ticket counters: each one still
    matches the torch backend when the values, eps and momentum change, the counters are all
    zeros after every call, and the running statistics move once per training call."""
    inputs = _inputs((2, 20, 9, 7), 3, layout=torch.channels_last)
    for call, (eps, momentum) in enumerate(((1e-5, 0.1), (1e-2, 0.5), (1e-5, 0.1))):
        inputs = [t * (1 + call) for t in inputs[:2]] + inputs[2:]
        kwargs = dict(stride=1, activation="hswish", training=True, momentum=momentum, eps=eps)
        _assert_same(_fwd_bwd("triton", inputs, **kwargs), _fwd_bwd("torch", inputs, **kwargs))
        assert _ticket_counters_are_zero()
    x, w, gamma, beta, rm, rv = (t.clone() for t in inputs)
    expected_rm, expected_rv = rm.clone(), rv.clone()
    for _ in range(3):
        with mobileops.use_backend("triton"):
            ops.dwconv_bn_act(x, w, gamma, beta, rm, rv, activation="relu", training=True, momentum=0.25)
        with mobileops.use_backend("torch"):
            ops.dwconv_bn_act(x, w, gamma, beta, expected_rm, expected_rv, activation="relu", training=True,
                              momentum=0.25)
        torch.testing.assert_close(rm, expected_rm, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rv, expected_rv, rtol=1e-12, atol=1e-12)


@interpreter_only
def test_autotuning_updates_the_running_statistics_once(monkeypatch, fresh_plans):
    """While the statistics kernel is tuned every candidate runs several times, each one
    updating the running statistics; the tuner restores them, so only the launch after the
    tuning counts. Here the interpreter tunes two configurations with a stand-in benchmark
    that runs each three times."""
    import torch.nn.functional as F
    import triton

    kernels, common = _kernels(), _common()
    fixed_meta = common.fixed_meta
    monkeypatch.setattr(common, "fixed_meta", lambda x, reduction, **kwargs: None if reduction else
                        fixed_meta(x, reduction, **kwargs))
    tuned = kernels._stats_tuned
    monkeypatch.setattr(tuned, "configs", [triton.Config(dict(BLOCK_P=8, BLOCK_C=4)),
                                           triton.Config(dict(BLOCK_P=16, BLOCK_C=8))])
    monkeypatch.setattr(tuned, "cache", {})
    benchmarked = []

    def bench(kernel_call, quantiles):
        for _ in range(3):
            kernel_call()
        benchmarked.append(1)
        return [float(len(benchmarked))] * len(quantiles)

    # An instance attribute: triton 3.9 makes do_bench a cached_property whose getter needs a GPU driver.
    monkeypatch.setitem(vars(tuned), "do_bench", bench)
    x, w, _, _, rm, rv = _inputs((2, 10, 6, 7), 3, layout=torch.channels_last)
    z = F.conv2d(x, w, padding=1, groups=10)
    expected_rm = 0.7 * rm + 0.3 * z.mean((0, 2, 3))
    expected_rv = 0.7 * rv + 0.3 * z.var((0, 2, 3), unbiased=True)
    mean, rstd = kernels.batch_stats(x, w, rm, rv, stride=1, padding=1, momentum=0.3, eps=1e-5)
    assert len(benchmarked) == 2, "both configurations were benchmarked"
    torch.testing.assert_close(rm, expected_rm, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rv, expected_rv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mean, z.mean((0, 2, 3)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rstd, (z.var((0, 2, 3), unbiased=False) + 1e-5).rsqrt(), rtol=1e-12, atol=1e-12)
    assert _ticket_counters_are_zero()


# ---- registration, compile, determinism ----------------------------------------------------

def _opcheck_cases():
    x, w, gamma, beta, rm, rv = _inputs((2, 5, 6, 7), 3)
    mean, rstd = torch.ops.mobileops.dwconv_bn_stats_triton(x, w, None, None, 1, 1, 0.1, 1e-5)
    fwd = torch.ops.mobileops.dwconv_bn_act_triton.default
    x, w, gamma = (t.requires_grad_(True) for t in (x, w, gamma))
    return [
        (torch.ops.mobileops.dwconv_bn_stats_triton.default, (x.detach(), w.detach(), rm, rv, 1, 1, 0.1, 1e-5)),
        (fwd, (x, w, gamma, beta, mean, rstd, 1, 1, "relu6", "batch", 1e-5)),
        (fwd, (x, w, None, beta, rm, rv, 2, 1, "silu", "running", 1e-3)),
        (fwd, (x, w, None, None, None, None, 1, 1, "hswish", "none", 0.0)),
        (torch.ops.mobileops.dwconv_bn_act_triton_backward.default,
         (torch.randn(2, 5, 6, 7, dtype=x.dtype, device=x.device), x.detach(), w.detach(), gamma.detach(),
          beta, mean, rstd, 1, 1, "hsigmoid", "batch", 1e-5, True)),
        # bn_act: no convolution
        (torch.ops.mobileops.dwconv_bn_stats_triton.default, (x.detach(), None, rm, rv, 1, 0, 0.1, 1e-5)),
        (fwd, (x, None, gamma, beta, rm, rv, 1, 0, "silu", "running", 1e-3)),
        (torch.ops.mobileops.dwconv_bn_act_triton_backward.default,
         (torch.randn(2, 5, 6, 7, dtype=x.dtype, device=x.device), x.detach(), None, gamma.detach(),
          beta, mean, rstd, 1, 0, "relu", "batch", 1e-5, False)),
    ]


@pytest.mark.parametrize("case", range(8))
def test_custom_ops_pass_opcheck(case):
    """Schema (mutations declared), fake implementations, autograd registration and AOT
    dispatch agree with the real kernels."""
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def _dw_stack():
    torch.manual_seed(0)
    model = nn.Sequential(mobileops.nn.Conv(8, 8, 3, 1, g=8), mobileops.nn.Conv(8, 8, 5, 2, g=8)).double()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return model.to(DEVICE)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_compile_fullgraph(training):
    """fullgraph=True fails on any graph break; outputs, gradients and running statistics of
    the compiled module match eager."""
    import copy

    eager = _dw_stack().train(training)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, backend="inductor" if CUDA else "aot_eager")
    x = torch.randn(2, 8, 11, 9, dtype=torch.float64, device=DEVICE)
    with mobileops.use_backend("triton"):
        results = []
        for model in (eager, compiled):
            xi = x.clone().requires_grad_(True)
            y = model(xi)
            y.square().sum().backward()
            results.append((y.detach(), xi.grad, [p.grad for p in model.parameters()], list(model.buffers())))
    (y0, dx0, grads0, bufs0), (y1, dx1, grads1, bufs1) = results
    torch.testing.assert_close(y1, y0, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(dx1, dx0, rtol=1e-9, atol=1e-10)
    for a, b in zip(grads1 + bufs1, grads0 + bufs0):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_deterministic_mode_gives_bit_identical_results():
    dtype = torch.float32 if CUDA else torch.float64
    shape = (4, 24, 40, 40) if CUDA else (2, 6, 9, 9)
    inputs = _inputs(shape, 3, dtype=dtype)
    saved = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [_fwd_bwd("triton", inputs, stride=1, activation="relu6", training=True) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(saved)
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name


# ---- gradients and outputs of unusual layouts ------------------------------------------------

def test_frozen_weights_and_unusual_output_gradients():
    """No weight gradient when the conv weight is frozen; an expanded (stride 0) and a
    transposed output gradient are read correctly."""
    inputs = _inputs((2, 7, 8, 6), 3, layout=torch.channels_last)
    kwargs = dict(stride=1, activation="silu", training=True, momentum=0.1, eps=1e-5)
    frozen = _fwd_bwd("triton", inputs, leaves=(0, 2, 3), **kwargs)
    _assert_same(frozen, _fwd_bwd("torch", inputs, leaves=(0, 2, 3), **kwargs))
    expanded = torch.ones(1, 1, 1, 1, dtype=torch.float64, device=DEVICE).expand(2, 7, 8, 6)
    transposed = torch.randn(2, 7, 6, 8, dtype=torch.float64, device=DEVICE).transpose(2, 3)
    for dy in (expanded, transposed):
        _assert_same(_fwd_bwd("triton", inputs, dy, **kwargs), _fwd_bwd("torch", inputs, dy, **kwargs))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_forward_writes_every_output_element(layout):
    """Poisoned (NaN) output buffers are fully overwritten."""
    x, w, gamma, beta, rm, rv = _inputs((3, 13, 7, 9), 5, layout=layout)
    out = torch.full((3, 13, 4, 5), float("nan"), dtype=x.dtype, device=x.device).contiguous(memory_format=layout)
    _kernels().forward(x, w, gamma, beta, rm, rv, out=out, stride=2, padding=2, activation="relu",
                       norm="running", eps=1e-5)
    with mobileops.use_backend("torch"):
        expected = ops.dwconv_bn_act(x, w, gamma, beta, rm, rv, stride=2, activation="relu")
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_every_allocation_is_fully_written(monkeypatch, training):
    """Every buffer the op allocates (outputs, gradients, partial sums, scratch) starts as NaN:
    an element a kernel forgets to write shows up in the results."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(make):
        def allocate(*args, **kwargs):
            t = make(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t
        return allocate

    inputs = _inputs((2, 7, 6, 5), 3, layout=torch.channels_last)
    kwargs = dict(stride=2, activation="relu6", training=training, momentum=0.1, eps=1e-5)
    expected = _fwd_bwd("torch", inputs, **kwargs)
    monkeypatch.setattr(torch, "empty", poisoned(real_empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(real_empty_like))
    _assert_same(_fwd_bwd("triton", inputs, **kwargs), expected)


def test_batch_statistics_need_two_values_per_channel():
    x, w, gamma, beta, rm, rv = _inputs((1, 4, 1, 1), 3)
    for backend_name in ("torch", "triton"):
        with mobileops.use_backend(backend_name), pytest.raises(ValueError, match="more than one value per channel"):
            ops.dwconv_bn_act(x, w, gamma, beta, rm, rv, training=True)
    with mobileops.use_backend("triton"):  # eval with running statistics is fine
        assert ops.dwconv_bn_act(x, w, gamma, beta, rm, rv).shape == (1, 4, 1, 1)


def test_kernels_refuse_the_wrong_device_for_how_they_were_defined(monkeypatch):
    kernels = _kernels()
    x, w, *_ = _inputs((1, 2, 4, 4), 3, device="cpu")
    out = torch.empty_like(x)
    monkeypatch.setattr(_common(), "COMPILED_FOR_INTERPRETER", False)
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1 before"):
        kernels.forward(x, w, None, None, None, None, out=out, stride=1, padding=1, activation="none",
                        norm="none", eps=0.0)
    if CUDA:
        monkeypatch.setattr(_common(), "COMPILED_FOR_INTERPRETER", True)
        with pytest.raises(RuntimeError, match="unset TRITON_INTERPRET"):
            kernels.forward(x.cuda(), w.cuda(), None, None, None, None, out=out.cuda(), stride=1, padding=1,
                            activation="none", norm="none", eps=0.0)


# ---- GPU: the detectors' real layer shapes, low precision, CUDA graphs -----------------------

@functools.cache
def _detector_layers():
    """Unique (C, H, W, K, stride, activation) of every dwconv_bn_act of both detectors at 640."""
    layers = collections.OrderedDict()
    for cfg in ("yolov5n-c3uib", "yolov5-mobilenetv3"):
        for call in yolo.fused_op_calls(yolo.build(cfg), (1, 3, 640, 640)):
            if call["op"] == "dwconv_bn_act":
                (_, c, h, w), _ = call["inputs"][0]
                k = call["inputs"][1][0][-1]
                layers[(c, h, w, k, call["options"]["stride"], call["options"]["activation"])] = None
    return list(layers)


def test_detector_layer_list_covers_the_spec():
    layers = _detector_layers()
    assert {k for _, _, _, k, _, _ in layers} == {3, 5}
    assert {s for *_, s, _ in layers} == {1, 2}
    assert {c for c, *_ in layers} >= {16, 960}
    assert {a for *_, a in layers} >= {"none", "relu6", "relu", "hswish"}


#: Where each activation's derivative jumps.
KINKS = {"relu": (0.0,), "relu6": (0.0, 6.0), "hswish": (-3.0, 3.0), "hsigmoid": (-3.0, 3.0)}


def _zero_near_kinks(dy, inputs, inputs64, *, activation, **kwargs):
    """``dy`` with zeros at the outputs whose pre-activation lies within rounding reach of a
    kink. There two correct implementations may round onto opposite sides and their input
    gradients then differ by a whole weight x dy term, far beyond any error bound (seen on an
    H100: one such output of 3.7 million in fp32 relu). The margin is the forward error bound
    itself (twice the torch backend's own error plus the dtype's floor): anything closer to a
    kink than that may land on either side."""
    kinks = KINKS.get(activation, ())
    if not kinks:
        return dy

    def pre_activation(tensors):
        tensors = [t.clone(memory_format=torch.preserve_format) for t in tensors]
        with torch.no_grad(), mobileops.use_backend("torch"):
            return ops.dwconv_bn_act(*tensors, activation="none", **kwargs).double()

    z64 = pre_activation(inputs64)
    low = pre_activation(inputs)
    margin = 2 * (low - z64).abs().max().item() + FLOORS[inputs[0].dtype] * max(
        z64.abs().max().item(), 1.0)
    near = torch.zeros_like(z64, dtype=torch.bool)
    for kink in kinks:
        near |= (z64 - kink).abs() <= margin
    assert near.double().mean() < 0.2, "the margin must leave most outputs in the comparison"
    return dy.masked_fill(near, 0.0)


def _check_low_precision(shape, k, stride, activation, dtype, layout, backend_name="triton"):
    """Forward and every gradient in train and eval, against float64, within twice the torch
    backend's own error in the same dtype (weight/BN grads and running stats: relative to
    their norm)."""
    batch, c, h, w = shape
    inputs = _inputs(shape, k, dtype=dtype, layout=layout)
    inputs64 = [t.double() for t in inputs]
    out_hw = [(s + 2 * ((k - 1) // 2) - k) // stride + 1 for s in (h, w)]
    dy = torch.randn(batch, c, *out_hw, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEVICE)
    for training in (True, False):
        what = f"{shape} k{k} s{stride} {activation} {dtype} train={training}"
        kwargs = dict(stride=stride, activation=activation, training=training, momentum=0.03, eps=1e-3)
        dy_here = _zero_near_kinks(dy, inputs, inputs64, **kwargs)
        ref = _fwd_bwd("torch", inputs64, dy_here, **kwargs)
        base = _fwd_bwd("torch", inputs, dy_here.to(dtype), **kwargs)
        ours = _fwd_bwd(backend_name, inputs, dy_here.to(dtype), **kwargs)
        assert ours["y"].dtype == dtype and ours["y"].is_contiguous(memory_format=layout)
        assert_within_bound(ours["y"], ref["y"], base["y"], f"y {what}")
        assert_within_bound(ours["dx"], ref["dx"], base["dx"], f"dx {what}")
        for name in ("dweight", "dgamma", "dbeta", "running_mean", "running_var"):
            err = relative_norm_error(ours[name], ref[name])
            base_err = relative_norm_error(base[name], ref[name])
            assert err <= 2 * base_err + FLOORS[dtype], f"{name} {what}: error {err:.3g}, torch's {base_err:.3g}"


@pytest.mark.parametrize("dtype,layout", [
    (torch.float16, torch.channels_last), (torch.bfloat16, torch.contiguous_format),
    (torch.float32, torch.channels_last)], ids=["fp16-nhwc", "bf16-nchw", "fp32-nhwc"])
def test_low_precision_within_the_error_bound(dtype, layout):
    _check_low_precision((2, 12, 9, 9), 3, 2, "hswish", dtype, layout)


@needs_cuda
@pytest.mark.parametrize("backend_name", ["triton", "cuda"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("layer", _detector_layers() if CUDA else [None], ids=str)
def test_real_layer_shapes_within_the_error_bound(monkeypatch, layer, dtype, layout, backend_name):
    """Both GPU backends (the CUDA extension shares this test with the Triton kernels)."""
    monkeypatch.setenv("MOBILEOPS_AUTOTUNE", "0")  # tuning every shape would take minutes
    mobileops.backend.forget_choices()  # (conftest forgets again after the test)
    c, h, w, k, stride, activation = layer
    _check_low_precision((2 if h * w >= 160 * 160 else 8, c, h, w), k, stride, activation, dtype, layout,
                         backend_name)


@needs_cuda
@pytest.mark.parametrize("backend_name", ["triton", "cuda"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cuda_graph_capture(training, backend_name):
    """No host synchronisation: forward (and running-stat update) replays from a CUDA graph."""
    x, w, gamma, beta, rm, rv = _inputs((8, 64, 40, 40), 3, dtype=torch.float16, layout=torch.channels_last)
    static_x = x.clone()
    with mobileops.use_backend(backend_name):
        for _ in range(2):  # warm up: autotuning benchmarks outside the capture
            ops.dwconv_bn_act(static_x, w, gamma, beta, rm.clone(), rv.clone(), training=training, activation="relu6")
        rm_graph, rv_graph = rm.clone(), rv.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = ops.dwconv_bn_act(static_x, w, gamma, beta, rm_graph, rv_graph, training=training,
                                         activation="relu6")
        rm_graph.copy_(rm)
        rv_graph.copy_(rv)
        static_x.copy_(torch.randn_like(x))
        graph.replay()
        rm_eager, rv_eager = rm.clone(), rv.clone()
        expected = ops.dwconv_bn_act(static_x, w, gamma, beta, rm_eager, rv_eager, training=training,
                                     activation="relu6")
    torch.cuda.synchronize()
    torch.testing.assert_close(static_y, expected)
    torch.testing.assert_close(rm_graph, rm_eager)
    torch.testing.assert_close(rv_graph, rv_eager)


@needs_cuda
def test_every_autotune_configuration_is_correct():
    """Whichever configuration the tuner picks gives the same results."""
    kernels = _kernels()
    x, w, gamma, beta, rm, rv = _inputs((2, 37, 23, 19), 5, dtype=torch.float32, layout=torch.channels_last)
    with mobileops.use_backend("torch"):
        expected = ops.dwconv_bn_act(x, w, gamma, beta, rm, rv, stride=2, activation="hswish")
    for config in kernels._forward_tuned.configs:
        out = torch.full_like(expected, float("nan"))
        meta = dict(config.kwargs, num_warps=config.num_warps)
        args = dict(x_ptr=x, w_ptr=w, gamma_ptr=gamma, beta_ptr=beta, mean_ptr=rm, var_ptr=rv, y_ptr=out,
                    C=37, H=23, W=19, HO=12, WO=10, **_common().strides("sx", x), **_common().strides("sy", out),
                    eps_hi=1e-5, eps_lo=0.0, K=5, STRIDE=2, PAD=2, ACT=3, NORM=1, HAS_GAMMA=True,
                    HAS_BETA=True, INDEX64=False, ACC=kernels.tl.float32)
        _common().launch(kernels._forward_kernel, None,
                         lambda m: (2 * kernels.triton.cdiv(120, m["BLOCK_P"]), kernels.triton.cdiv(37, m["BLOCK_C"])),
                         args, meta)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4, msg=lambda m, c=config: f"{c}: {m}")


def test_kernels_compile_for_sm80_and_sm90():
    """The interpreter accepts code the Triton compiler rejects: compile every kernel launch
    (one dtype and kernel size) to cubins for sm_80 and sm_90, no GPU needed."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("compile_triton_kernels.py")
    proc = subprocess.run([sys.executable, str(script), "--quick", "80", "90"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"compiled \d+ kernel variants for sm_80, sm_90", proc.stdout), proc.stdout


# ---- bn_act: the same kernels without the convolution ---------------------------------------

@pytest.mark.parametrize("dtype,layout", [
    (torch.float16, torch.channels_last), (torch.bfloat16, torch.contiguous_format)], ids=["fp16-nhwc", "bf16-nchw"])
def test_bn_act_low_precision_within_the_error_bound(monkeypatch, dtype, layout):
    """bn_act forward, input and BN gradients and running stats against float64, in train and
    eval; every allocation poisoned."""
    _, _, gamma, beta, rm, rv = _inputs((1, 6, 1, 1), 1, dtype=dtype)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 6, 7, 5, generator=g, dtype=torch.float64).to(DEVICE)
    dy = torch.randn(3, 6, 7, 5, generator=g, dtype=torch.float64).to(DEVICE)
    real_empty = torch.empty

    def run(backend_name, xin, params, grad, training, poison=False):
        leaves = [xin.detach().to(memory_format=layout).requires_grad_(True)]
        leaves += [p.detach().clone().requires_grad_(True) for p in params[:2]]
        stats = [p.clone() for p in params[2:]]
        with mobileops.use_backend(backend_name):
            if poison:
                monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
            y = ops.bn_act(leaves[0], *leaves[1:], *stats, activation="hswish", training=training, momentum=0.1)
            y.backward(grad)
            monkeypatch.setattr(torch, "empty", real_empty)
        return [y.detach()] + [t.grad for t in leaves] + stats

    params = [gamma, beta, rm, rv]
    for training in (True, False):
        ref = run("torch", x, [p.double() for p in params], dy, training)
        base = run("torch", x.to(dtype), params, dy.to(dtype), training)
        ours = run("triton", x.to(dtype), params, dy.to(dtype), training, poison=True)
        assert ours[0].dtype == dtype and ours[0].is_contiguous(memory_format=layout)
        for name, o, r, b in zip(("y", "dx"), ours, ref, base):
            assert_within_bound(o, r, b, f"bn_act {name} {dtype} train={training}")
        for name, o, r, b in zip(("dgamma", "dbeta", "running_mean", "running_var"), ours[2:], ref[2:], base[2:]):
            err, base_err = relative_norm_error(o, r), relative_norm_error(b, r)
            assert err <= 2 * base_err + FLOORS[dtype], f"bn_act {name}: error {err:.3g}, torch's {base_err:.3g}"


@pytest.mark.parametrize("k", [3, 5])
def test_stride_two_dx_loads_only_the_taps_that_reach_an_output(monkeypatch, k):
    """At stride 2 an input position receives from about K*K/4 of the K*K taps; the dx kernel
    runs per output phase, so its dz loads are the valid taps (masked only at the borders),
    not all K*K with three quarters masked off."""
    from triton.runtime import interpreter

    kernels, common = _kernels(), _common()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 13, 13, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, 1, k, k, generator=g)
    stat = torch.ones(16)
    dy = torch.randn(2, 16, 7, 7, generator=g).contiguous(memory_format=torch.channels_last)
    captured = []
    real_launch = common.launch
    monkeypatch.setattr(common, "launch", lambda *launch: captured.append(launch) or real_launch(*launch))
    dx, *_ = kernels.backward(dy, x, w, stat, stat, stat, stat, stride=2, padding=(k - 1) // 2, activation="relu",
                              norm="batch", eps=1e-5, weight_grad=True, memory_format=torch.channels_last)
    dx_launch = [launch for launch in captured if launch[0] is kernels._dx_kernel]
    assert len(dx_launch) == 1
    lanes = []
    real_load = interpreter.InterpreterBuilder.create_masked_load

    def counting_load(self, ptrs, mask, other, cache_policy, is_volatile):
        if mask.data.ndim == 2:  # the dz tiles ([BLOCK_P, BLOCK_C]); weights are [BLOCK_C]
            lanes.append((mask.data.size, int(mask.data.sum())))
        return real_load(self, ptrs, mask, other, cache_policy, is_volatile)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", counting_load)
    again = torch.full_like(dx, float("nan"))
    real_launch(*dx_launch[0][:3], dict(dx_launch[0][3], dx_ptr=again), dx_launch[0][4])
    torch.testing.assert_close(again, dx, rtol=0, atol=0)  # the same kernel, the same result
    issued, valid = map(sum, zip(*lanes))
    # Each input position of a 13x13 map at stride 2 receives ceil(k/2) or floor(k/2) taps per
    # dimension; the phases' tiles (ceil(13/2)**2 = 49 positions) are mostly full tiles here.
    loads_per_position = len(lanes) * dx_launch[0][4]["BLOCK_P"] * (16 // dx_launch[0][4]["BLOCK_C"]) / (2 * 13 * 13)
    assert loads_per_position < k * k / 2, f"{loads_per_position:.1f} dz tile loads per position: all taps issued"
    assert valid / issued > 0.5, f"only {valid / issued:.0%} of the dz lanes loaded were needed"


@interpreter_only
def test_batch_statistics_do_not_cancel_on_a_large_mean(monkeypatch, fresh_plans):
    """Values 1e4 with a spread of 1e-1 in float32: a sum-of-squares variance would lose every
    digit (E[x^2] is 1e8, its float32 ulp 8, the variance 1e-2); the per-lane Welford sums and
    Chan merges keep it to the rounding of the deviations (the mean's ulp, 1e-3, against a
    spread of 0.1: about 1%). Small tiles and chunks: several tiles per chunk (the last
    partial), several chunks per sample."""
    monkeypatch.setattr(_common(), "INTERPRETER_META", dict(BLOCK_P=8, BLOCK_C=4))
    monkeypatch.setattr(_common(), "INTERPRETER_CHUNK", 20)
    kernels = _kernels()
    g = torch.Generator().manual_seed(0)
    x = (1e4 + 0.1 * torch.randn(3, 6, 7, 9, generator=g)).contiguous(memory_format=torch.channels_last)
    mean, rstd = kernels.batch_stats(x, None, None, None, stride=1, padding=0, momentum=0.1, eps=0.0)
    x64 = x.double()
    var64 = x64.var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean.double(), x64.mean(dim=(0, 2, 3)), rtol=4e-7, atol=0)  # a few ulps
    torch.testing.assert_close((1 / rstd.double() ** 2), var64, rtol=1e-2, atol=0)
