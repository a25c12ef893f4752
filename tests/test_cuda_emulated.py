"""The CUDA backend's kernels (csrc/), compiled for the CPU against tests/cuda_emulation/
cuda_shim.h and run through the real Python launchers and custom ops, against the torch
backend in float64. This checks the kernels' arithmetic, indexing, strides, reductions and
running-statistic updates on machines without a GPU; it says nothing about GPU-specific
behaviour (warp scheduling, memory model, speed), which test_cuda_backend.py covers on a GPU.
Every CUDA thread is an OS thread here, so the shapes are tiny."""

import pytest
import torch
from helpers import assert_nan_and_inf_land_as_with_torch, assert_within_bound, cuda_backend_on_cpu

import mobileops
from mobileops import codes, ops
from mobileops.cuda import _extension

F64 = torch.float64
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
ACTIVATIONS = ["none", "relu", "relu6", "hswish", "silu", "hsigmoid"]


@pytest.fixture
def cuda_on_cpu(emulated_extension):
    """Select the cuda backend for CPU tensors, running the emulated kernels."""
    with cuda_backend_on_cpu(emulated_extension):
        yield


def test_csrc_codes_are_the_python_table(emulated_extension):
    # csrc/ops.h's enums, as the compiled binding exports them, against mobileops/codes.py,
    # the table the Triton kernels and the CUDA launchers read.
    assert emulated_extension.codes() == {"activation": codes.ACTIVATION_CODES, "norm": codes.NORM_CODES,
                                          "dtype": codes.DTYPE_CODES}
    assert set(ops.ACTIVATIONS) | set(ops.GATES) <= set(codes.ACTIVATION_CODES)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _dw_inputs(n, c, h, w, k, layout, seed=0):
    g = _gen(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=F64).contiguous(memory_format=layout)
    weight = torch.randn(c, 1, k, k, generator=g, dtype=F64) / k
    bn = [1 + 0.3 * torch.randn(c, generator=g, dtype=F64), 0.2 * torch.randn(c, generator=g, dtype=F64),
          0.2 * torch.randn(c, generator=g, dtype=F64), 0.5 + torch.rand(c, generator=g, dtype=F64)]
    return [x, weight] + bn


def _run(backend_name, fn, inputs, grads, seed=7):
    """fn(*leaves) on fresh copies; returns output, input gradients and the mutated buffers."""
    leaves = [t.detach().clone().requires_grad_(i in grads) for i, t in enumerate(inputs)]
    with mobileops.use_backend(backend_name):
        y = fn(*leaves)
    dy = torch.randn(y.shape, generator=_gen(seed), dtype=y.dtype).contiguous(memory_format=torch.channels_last)
    y.backward(dy)  # a channels_last output gradient whatever y's layout: strides must not matter
    return [y] + [leaves[i].grad for i in grads] + [t for i, t in enumerate(leaves) if i not in grads]


def _assert_same(got, want, rtol=1e-10, atol=1e-12):
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, i=i: f"result {i}: {m}")


# (N, C, H, W, K, stride): odd sizes, H or W of 1, stride 2 on odd sizes, every kernel size.
DW_CASES = [(2, 5, 7, 6, 3, 2), (1, 3, 9, 9, 5, 1), (2, 4, 5, 7, 7, 2), (3, 2, 1, 5, 3, 1)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", range(len(DW_CASES)))
def test_dwconv_bn_act_matches_torch(cuda_on_cpu, case, training, layout):
    n, c, h, w, k, stride = DW_CASES[case]
    activation = ACTIVATIONS[(case * 2 + training) % len(ACTIVATIONS)]
    inputs = _dw_inputs(n, c, h, w, k, LAYOUTS[layout], seed=case)

    def fn(x, weight, gamma, beta, rm, rv):
        return ops.dwconv_bn_act(x, weight, gamma, beta, rm, rv, stride=stride, activation=activation,
                                 training=training, momentum=0.1, eps=1e-3)

    got, want = _run("cuda", fn, inputs, (0, 1, 2, 3)), _run("torch", fn, inputs, (0, 1, 2, 3))
    assert got[0].is_contiguous(memory_format=LAYOUTS[layout])
    _assert_same(got, want)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_forward_and_backward(cuda_on_cpu, activation):
    inputs = _dw_inputs(2, 3, 5, 5, 3, torch.contiguous_format, seed=11)
    inputs[0] = inputs[0] * 4  # reach both sides of every kink

    def fn(x, weight, gamma, beta, rm, rv):
        return ops.dwconv_bn_act(x, weight, gamma, beta, rm, rv, activation=activation, training=True)

    _assert_same(_run("cuda", fn, inputs, (0, 1, 2, 3)), _run("torch", fn, inputs, (0, 1, 2, 3)))


def test_strided_slices_no_running_stats_and_folded_form(cuda_on_cpu):
    big = torch.randn(3, 10, 11, 12, generator=_gen(3), dtype=F64)
    x = big[:, 1:8:2, 1:, ::2]  # non-contiguous in every dimension
    weight, gamma, beta = (torch.randn(4, 1, 3, 3, generator=_gen(4), dtype=F64),
                           torch.rand(4, dtype=F64) + 0.5, torch.randn(4, dtype=F64))

    def no_stats(x, weight, gamma, beta):
        return ops.dwconv_bn_act(x, weight, gamma, beta, None, None, stride=2, activation="relu6")

    _assert_same(_run("cuda", no_stats, [x, weight, gamma, beta], (0, 1, 2, 3)),
                 _run("torch", no_stats, [x, weight, gamma, beta], (0, 1, 2, 3)))

    def folded(x, weight, bias):
        return ops.dwconv_act(x, weight, bias, activation="silu")

    _assert_same(_run("cuda", folded, [x, weight, beta], (0, 1, 2)),
                 _run("torch", folded, [x, weight, beta], (0, 1, 2)))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bn_act_matches_torch(cuda_on_cpu, training, layout):
    x, _, gamma, beta, rm, rv = _dw_inputs(2, 6, 5, 3, 3, LAYOUTS[layout], seed=5)

    def fn(x, gamma, beta, rm, rv):
        return ops.bn_act(x, gamma, beta, rm, rv, activation="hswish", training=training, momentum=0.2, eps=1e-3)

    _assert_same(_run("cuda", fn, [x, gamma, beta, rm, rv], (0, 1, 2)),
                 _run("torch", fn, [x, gamma, beta, rm, rv], (0, 1, 2)))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("gate, post_act, biases", [("hsigmoid", "hswish", True), ("sigmoid", "relu", False),
                                                   ("hsigmoid", "none", True)])
def test_squeeze_excite_matches_torch(cuda_on_cpu, layout, gate, post_act, biases):
    g = _gen(9)
    x = torch.randn(3, 12, 5, 4, generator=g, dtype=F64).contiguous(memory_format=LAYOUTS[layout])
    params = [torch.randn(3, 12, generator=g, dtype=F64) / 3, torch.randn(3, generator=g, dtype=F64) / 3,
              torch.randn(12, 3, generator=g, dtype=F64) / 2, torch.randn(12, generator=g, dtype=F64) / 3]
    if not biases:
        params[1] = params[3] = None
    present = [i for i, t in enumerate([x] + params) if t is not None]
    inputs = [t for t in [x] + params if t is not None]

    def fn(*leaves):
        full = [None] * 5
        for i, t in zip(present, leaves):
            full[i] = t
        return ops.squeeze_excite(*full, gate=gate, post_act=post_act)

    grads = tuple(range(len(inputs)))
    _assert_same(_run("cuda", fn, inputs, grads), _run("torch", fn, inputs, grads))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_low_precision_paths(cuda_on_cpu, dtype):
    """fp16/bf16/fp32 storage with float accumulation, within the bound of docs/measuring.md: no
    worse than twice the torch backend's own error in that dtype (the emulated conversions round
    to nearest even like the device intrinsics)."""
    inputs = _dw_inputs(2, 4, 6, 6, 3, torch.channels_last, seed=2)
    low = [inputs[0].to(dtype), inputs[1].to(dtype)] + [t.float() for t in inputs[2:]]

    def fn(x, weight, gamma, beta, rm, rv):
        return ops.dwconv_bn_act(x, weight, gamma, beta, rm, rv, activation="relu6", training=True)

    ref = _run("torch", fn, [t.double() for t in low], (0, 1, 2, 3))
    base, got = _run("torch", fn, low, (0, 1, 2, 3)), _run("cuda", fn, low, (0, 1, 2, 3))
    assert got[0].dtype == dtype and got[0].is_contiguous(memory_format=torch.channels_last)
    for name, a, b, r in zip(("y", "dx", "dweight", "dgamma", "dbeta", "running_mean", "running_var"), got, base, ref):
        assert_within_bound(a, r, b, f"{name} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_parameters_reach_the_kernels_intact(cuda_on_cpu, dtype):
    """Half-precision BN and FC tensors (and a non-contiguous conv weight) go to the kernels as
    float32 / contiguous copies. Each copy must outlive its launch: when only its address was
    kept, the next copy reused the freed memory and SE gates came out NaN or wrong."""
    inputs = _dw_inputs(2, 6, 5, 5, 3, torch.channels_last, seed=4)
    g = _gen(5)
    se = [torch.randn(3, 6, generator=g, dtype=F64) * 0.4, torch.randn(3, generator=g, dtype=F64),
          torch.randn(6, 3, generator=g, dtype=F64) * 0.5, torch.randn(6, generator=g, dtype=F64)]
    low = [t.to(dtype) for t in inputs + se]
    # a transposed-then-restored view: same values, not contiguous, so the launcher copies it
    low[1] = low[1].permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)

    def fn(x, weight, gamma, beta, rm, rv, w1, b1, w2, b2):
        y = ops.dwconv_bn_act(x, weight, gamma, beta, rm, rv, activation="hswish", training=False)
        return ops.squeeze_excite(y, w1, b1, w2, b2, gate="hsigmoid", post_act="hswish")

    grads = (0, 1, 2, 3, 6, 7, 8, 9)
    ref = _run("torch", fn, [t.double() for t in low], grads)
    base, got = _run("torch", fn, low, grads), _run("cuda", fn, low, grads)
    names = ("y", "dx", "dweight", "dgamma", "dbeta", "dfc1_weight", "dfc1_bias", "dfc2_weight", "dfc2_bias")
    for name, a, b, r in zip(names, got, base, ref):
        assert_within_bound(a, r, b, f"{name} {dtype}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_many_position_chunks_merge_like_the_reference(cuda_on_cpu, monkeypatch, layout):
    """The reductions split each channel's positions into chunks (Welford partials, gradient
    and weight-gradient partials) merged in chunk order. Tiny test shapes fit one chunk, so the
    chunk length is forced to 7 here: 60 positions make 9 chunks, the last one short."""
    from mobileops.cuda import dwconv_bn_act as launcher

    monkeypatch.setattr(launcher, "_chunking", lambda positions, channels, channels_last: (7, -(-positions // 7)))
    inputs = _dw_inputs(2, 3, 6, 5, 3, LAYOUTS[layout], seed=21)

    def conv(x, weight, gamma, beta, rm, rv):
        return ops.dwconv_bn_act(x, weight, gamma, beta, rm, rv, activation="hswish", training=True, momentum=0.3)

    def bn(x, weight, gamma, beta, rm, rv):
        return ops.bn_act(x, gamma, beta, rm, rv, activation="relu6", training=True, momentum=0.3)

    for fn, grads in ((conv, (0, 1, 2, 3)), (bn, (0, 2, 3))):
        _assert_same(_run("cuda", fn, inputs, grads), _run("torch", fn, inputs, grads))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_channel_groups_with_a_partial_last_group(cuda_on_cpu, monkeypatch, layout):
    """In channels_last the reducing kernels take 32 channels per block (a warp reads one
    position's neighbouring channels), so 37 channels make one full group and one of 5 whose
    other 27 lanes must neither read nor write; NCHW takes one channel per block. Several
    position chunks per group, as above."""
    from mobileops.cuda import dwconv_bn_act as launcher

    monkeypatch.setattr(launcher, "_chunking", lambda positions, channels, channels_last: (7, -(-positions // 7)))
    inputs = _dw_inputs(2, 37, 5, 4, 3, LAYOUTS[layout], seed=23)

    def conv(x, weight, gamma, beta, rm, rv):
        return ops.dwconv_bn_act(x, weight, gamma, beta, rm, rv, stride=2, activation="silu", training=True)

    def conv_eval(x, weight, gamma, beta, rm, rv):  # running statistics: the du sums come from pass 2
        return ops.dwconv_bn_act(x, weight, gamma, beta, rm, rv, activation="relu6")

    def bn(x, weight, gamma, beta, rm, rv):
        return ops.bn_act(x, gamma, beta, rm, rv, activation="hswish", training=True)

    for fn, grads in ((conv, (0, 1, 2, 3)), (conv_eval, (0, 1, 2, 3)), (bn, (0, 2, 3))):
        _assert_same(_run("cuda", fn, inputs, grads), _run("torch", fn, inputs, grads))
    g = _gen(24)
    se_inputs = [inputs[0], torch.randn(4, 37, generator=g, dtype=F64) / 4, torch.randn(4, generator=g, dtype=F64),
                 torch.randn(37, 4, generator=g, dtype=F64) / 2, torch.randn(37, generator=g, dtype=F64)]

    def se(*leaves):
        return ops.squeeze_excite(*leaves, gate="sigmoid", post_act="relu6")

    _assert_same(_run("cuda", se, se_inputs, range(5)), _run("torch", se, se_inputs, range(5)))


def test_nan_and_inf_land_where_pytorch_puts_them(cuda_on_cpu):
    # A NaN in the SE hidden layer once became 0 in the CUDA ReLU (a plain comparison drops it).
    assert_nan_and_inf_land_as_with_torch("cpu", "cuda")


@pytest.mark.parametrize("training, launch", [(True, "batch statistics"), (False, "forward")], ids=["train", "eval"])
@pytest.mark.parametrize("k", [1, 4, 9])
def test_unsupported_kernel_sizes_are_refused(cuda_on_cpu, k, training, launch):
    # The op accepts any K (the torch and triton backends run it); the CUDA binding refuses
    # what its kernels were not compiled for, naming its argument, before anything launches.
    x = torch.randn(1, 3, 9, 9, dtype=F64)
    stats = (torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64))
    with mobileops.use_backend("cuda"), pytest.raises(
            ValueError, match=rf"^dwconv_bn_act {launch}: kernel_size must be 3, 5 or 7 \(0: no conv\), got {k}$"):
        ops.dwconv_bn_act(x, torch.randn(3, 1, k, k, dtype=F64), None, None, *stats, training=training)


# ---- offsets past 2**31 elements ---------------------------------------------------------

FAR = 2 ** 31


def _far_pair(shape, layout, seed):
    """An input and an output gradient as float32 (N, C, H, W) views with a batch stride of
    2**31 elements: every image after the first lies past 2**31 elements from the base pointer.
    They share one 8.6 GB storage that is never touched outside the viewed elements, so the OS
    commits only those pages."""
    n, c, h, w = shape
    inner = (1, w * c, c) if layout == "nhwc" else (h * w, w, 1)
    storage = torch.empty((n - 1) * FAR + 2 * c * h * w, dtype=torch.float32)
    views = [storage.as_strided(shape, (FAR,) + inner, offset) for offset in (0, c * h * w)]
    g = _gen(seed)
    for view in views:
        view.copy_(torch.randn(shape, generator=g))
    return views


def _results(fn, x, dy, grad_params, buffers):
    x = x.detach().requires_grad_(True)  # detach keeps the strides (clone would make x dense)
    leaves = [p.detach().clone().requires_grad_(True) for p in grad_params]
    buffers = [b.clone() for b in buffers]
    with mobileops.use_backend("cuda"):
        y = fn(x, *leaves, *buffers)
    y.backward(dy)
    return [y, x.grad] + [p.grad for p in leaves] + buffers


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", ["dwconv_bn_act_train", "dwconv_bn_act_eval", "bn_act_train", "squeeze_excite"])
def test_offsets_past_2_31_elements_read_the_same_values(cuda_on_cpu, monkeypatch, op, layout):
    """The kernels' 64-bit offsets, by construction: x and dy whose second image lies past 2**31
    elements give bit for bit the results of dense copies of the same values (a 32-bit offset
    would wrap to another address and read other values, or fault)."""
    shape = (2, 3, 5, 4)
    far_x, far_dy = _far_pair(shape, layout, seed=13)
    near_x, near_dy = (t.contiguous(memory_format=LAYOUTS[layout]) for t in (far_x, far_dy))
    _, weight, gamma, beta, rm, rv = (t.float() for t in _dw_inputs(1, 3, 1, 1, 3, torch.contiguous_format, seed=14))
    g = _gen(15)
    fc = [torch.randn(2, 3, generator=g) / 2, torch.randn(2, generator=g), torch.randn(3, 2, generator=g) / 2,
          torch.randn(3, generator=g)]
    calls = {
        "dwconv_bn_act_train": (lambda x, w, a, b, m, v: ops.dwconv_bn_act(
            x, w, a, b, m, v, activation="hswish", training=True, momentum=0.3), [weight, gamma, beta], [rm, rv]),
        "dwconv_bn_act_eval": (lambda x, w, a, b, m, v: ops.dwconv_bn_act(
            x, w, a, b, m, v, activation="relu6"), [weight, gamma, beta], [rm, rv]),
        "bn_act_train": (lambda x, a, b, m, v: ops.bn_act(x, a, b, m, v, activation="silu", training=True),
                         [gamma, beta], [rm, rv]),
        "squeeze_excite": (lambda x, w1, b1, w2, b2: ops.squeeze_excite(x, w1, b1, w2, b2, post_act="hswish"), fc, []),
    }
    fn, grad_params, buffers = calls[op]
    seen = []
    real_strides = _extension.strides
    monkeypatch.setattr(_extension, "strides", lambda t: seen.append(real_strides(t)) or real_strides(t))
    far = _results(fn, far_x, far_dy, grad_params, buffers)
    assert max(s[0] for s in seen) == FAR, "the kernels were not given the far views"
    near = _results(fn, near_x, near_dy, grad_params, buffers)
    for i, (a, b) in enumerate(zip(far, near)):
        assert torch.equal(a, b), f"result {i} differs between the far views and their dense copies"
