"""The CUDA backend's kernels (csrc/), compiled for the CPU against tests/cuda_emulation/
cuda_shim.h and run through the real Python launchers and custom ops, against the torch
backend in float64. This checks the kernels' arithmetic, indexing, strides, reductions and
running-statistic updates on machines without a GPU; it says nothing about GPU-specific
behaviour (warp scheduling, memory model, speed), which test_cuda_backend.py covers on a GPU.
Every CUDA thread is an OS thread here, so the shapes are tiny."""

import sys
from pathlib import Path

import pytest
import torch
from harness import ARGUMENTS, LAYOUTS, check, inputs
from helpers import (
    assert_bound_inference_is_general,
    assert_bound_training_is_general,
    assert_nan_and_inf_land_as_with_torch,
    bind_cases,
    cuda_backend_on_cpu,
)

import mobileops
from mobileops import codes, ops
from mobileops.cuda import _extension

sys.path.insert(0, str(Path(__file__).parent / "cuda_emulation"))
import build as emulation_build

F64 = torch.float64


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


# The float64 grid of every op, the every-activation, strided-slice and low-precision checks run
# on this backend in test_ops.py (through tests/harness.py); here what only these kernels need.


def _check(op, args, **options):
    """The emulated cuda backend against the torch backend (float64: to 1e-9; else the bound)."""
    dtype = args["x"].dtype
    return check(op, "cuda", args, dtype=dtype, reference="torch", dy_layout="nhwc", **options)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_parameters_reach_the_kernels_intact(cuda_on_cpu, dtype):
    """Half-precision BN and FC tensors (and a non-contiguous conv weight) go to the kernels as
    float32 / contiguous copies. Each copy must outlive its launch: when only its address was
    kept, the next copy reused the freed memory and SE gates came out NaN or wrong."""
    args = {name: None if t is None else t.to(dtype)
            for name, t in inputs("dwconv_bn_act", (2, 6, 5, 5), layout="nhwc", seed=4).items()}
    # a transposed-then-restored view: same values, not contiguous, so the launcher copies it
    args["weight"] = args["weight"].permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    assert not args["weight"].is_contiguous()
    _check("dwconv_bn_act", args, activation="hswish", training=False)
    se = {name: t.to(dtype) for name, t in inputs("squeeze_excite", (2, 6, 5, 5), hidden=3, layout="nhwc",
                                                  seed=5).items()}
    _check("squeeze_excite", se, gate="hsigmoid", post_act="hswish")


def _force_chunks_of_7(monkeypatch):
    from mobileops.cuda import dwconv_bn_act as launcher
    from mobileops.cuda import squeeze_excite as se_launcher

    def chunks_of_7(positions, channels, element, channels_last, samples=1):
        return 7, -(-positions // 7)

    monkeypatch.setattr(launcher, "_chunking", chunks_of_7)
    monkeypatch.setattr(se_launcher, "_chunking", chunks_of_7)  # the SE launcher's reference to it


@pytest.mark.parametrize("layout", LAYOUTS)
def test_many_position_chunks_merge_like_the_reference(cuda_on_cpu, monkeypatch, layout):
    """The reductions split each channel's positions into chunks (Welford partials, gradient
    and weight-gradient partials) merged in chunk order. Tiny test shapes fit one chunk, so the
    chunk length is forced to 7 here: 60 positions make 9 chunks, the last one short."""
    _force_chunks_of_7(monkeypatch)
    args = inputs("dwconv_bn_act", (2, 3, 6, 5), layout=layout, seed=21)
    _check("dwconv_bn_act", args, activation="hswish", training=True, momentum=0.3)
    bn = {name: t for name, t in args.items() if name != "weight"}
    _check("bn_act", bn, activation="relu6", training=True, momentum=0.3)
    # SE: each sample's 60 positions in 9 chunks, the pooled means and the gate gradient merged
    emulation_build.launches(_extension.extension())
    _check("squeeze_excite", inputs("squeeze_excite", (2, 6, 6, 10), layout=layout, seed=22), gate="hsigmoid",
           post_act="hswish")
    assert emulation_build.launches(_extension.extension()).count("se_merge_kernel<A>") == 2


@pytest.mark.parametrize("layout", LAYOUTS)
def test_channel_groups_with_a_partial_last_group(cuda_on_cpu, monkeypatch, layout):
    """37 channels are no multiple of a pack, so in channels_last the reducing kernels take one
    channel per lane, 32 per block (a warp reads one position's neighbouring channels): one full
    group and one of 5 whose other 27 lanes must neither read nor write; NCHW takes one channel
    per block. Several position chunks per group, as above."""
    _force_chunks_of_7(monkeypatch)
    args = inputs("dwconv_bn_act", (2, 37, 5, 4), layout=layout, seed=23)
    _check("dwconv_bn_act", args, stride=2, activation="silu", training=True)
    _check("dwconv_bn_act", args, activation="relu6")  # running statistics: the du sums come from pass 2
    _check("bn_act", {name: t for name, t in args.items() if name != "weight"}, activation="hswish", training=True)
    se = inputs("squeeze_excite", (2, 37, 5, 4), hidden=4, layout=layout, seed=24)
    _check("squeeze_excite", se, gate="sigmoid", post_act="relu6")


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
    g = torch.Generator().manual_seed(seed)
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
    params = inputs("dwconv_bn_act", (1, 3, 1, 1), dtype=torch.float32, seed=14)
    weight, gamma, beta, rm, rv = (params[name] for name in ARGUMENTS["dwconv_bn_act"][1:])
    g = torch.Generator().manual_seed(15)
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


# ---- 16-byte packs of channels -----------------------------------------------------------

PACKED = (", V>", ", VI>")  # how the launch log spells a kernel launched with channel packs
BN_STATS = ("running_mean", "running_var")  # updated in place, not differentiated


def _run_both_ways(op, args, **options):
    """Outputs and gradients of ``op`` on the cuda backend, once with x and dy channels_last and
    once NCHW (the same values), and the kernels each of the two launched."""
    results, logs = [], []
    for layout in (torch.channels_last, torch.contiguous_format):
        tensors = {k: None if v is None else v.detach().clone() for k, v in args.items()}
        x = tensors.pop("x").contiguous(memory_format=layout).requires_grad_(True)
        grads = [t.requires_grad_(True) for k, t in tensors.items() if t is not None and k not in BN_STATS]
        emulation_build.launches(_extension.extension())  # clears the log
        with mobileops.use_backend("cuda"):
            y = getattr(ops, op)(x, *tensors.values(), **options)
            dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(31), dtype=F64).to(y.dtype)
            y.backward(dy.contiguous(memory_format=layout))
        results.append([y.detach(), x.grad] + [t.grad for t in grads])
        logs.append(emulation_build.launches(_extension.extension()))
    return results, logs


def _packed(log):
    """The kernels of a launch log that ran with channel packs, by name."""
    return {k.split("<")[0] for k in log if k.endswith(PACKED)}


#: The kernels of each op's forward + backward that move activations (bn_act's grad_input
#: writes dx itself), with and without batch statistics.
PACKED_KERNELS = {("dwconv_bn_act", False): {"apply_kernel", "grad_input_kernel", "dx_kernel"},
                  ("dwconv_bn_act", True): {"stats_kernel", "apply_kernel", "grad_sums_kernel", "grad_input_kernel",
                                            "dx_kernel"},
                  ("bn_act", False): {"apply_kernel", "grad_input_kernel"},
                  ("bn_act", True): {"stats_kernel", "apply_kernel", "grad_sums_kernel", "grad_input_kernel"},
                  ("squeeze_excite", False): {"se_channel_sum_kernel", "scale_kernel", "dx_kernel"}}


# bf16 packs differ from fp16 ones only in the conversions: one case of it
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("op, options", [
    ("dwconv_bn_act", dict(activation="hswish")),
    ("dwconv_bn_act", dict(activation="relu6", stride=2)),
    ("bn_act", dict(activation="silu")),
    ("dwconv_bn_act", dict(activation="relu6", stride=2, training=True)),
    ("bn_act", dict(activation="silu", training=True)),
    ("squeeze_excite", dict(gate="hsigmoid", post_act="hswish")),
], ids=["dw-eval", "dw-eval-s2", "bn-eval", "dw-train-s2", "bn-train", "se"])
def test_channels_last_packs_agree_with_one_element_per_thread(cuda_on_cpu, op, options, dtype):
    _check_packs(op, options, dtype)


def test_bfloat16_packs_agree_with_one_element_per_thread(cuda_on_cpu):
    _check_packs("dwconv_bn_act", dict(activation="relu6", stride=2), torch.bfloat16)


def _check_packs(op, options, dtype):
    """In channels_last with C a multiple of the pack the kernels take several channels per
    thread with one vector access (elementwise kernels 16 bytes: 4 float32 or 8 fp16/bf16
    channels; reductions 16 bytes or, for the input gradient with its per-tap weight sums, 8 or
    4); NCHW takes one element. Each channel adds its terms in the same order either way, so
    with running statistics (no reduction feeds y or dx) the output and the input gradient agree
    to the last bit; the reductions sum in a layout-dependent order, so the rest agrees to
    rounding. The launch log shows which kernels ran."""
    (packed, single), (packed_log, single_log) = _run_both_ways(op, inputs(op, (2, 16, 5, 6), dtype=dtype, seed=41),
                                                                **options)
    exact = 2 if op != "squeeze_excite" and not options.get("training") else 0
    for i, (a, b) in enumerate(zip(packed, single)):
        if i < exact:
            assert torch.equal(a, b), f"result {i} differs between the packed and the one-element kernels"
        else:
            torch.testing.assert_close(a, b, msg=f"result {i}")
    expected = PACKED_KERNELS[op, bool(options.get("training"))]
    assert _packed(packed_log) == expected and not _packed(single_log), (packed_log, single_log)
    # 12 channels: no multiple of fp16's 8, so one element per thread, except in the 3x3 input
    # gradient's half packs of 4 (float32's 4 divides it, and its input gradient takes 2)
    _, (odd_log, _) = _run_both_ways(op, inputs(op, (2, 12, 5, 6), dtype=dtype, seed=42), **options)
    half_packs = {"grad_input_kernel"} if op == "dwconv_bn_act" else set()
    assert _packed(odd_log) == (expected if dtype == torch.float32 else half_packs), odd_log


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_packed_reductions_over_partial_groups_and_many_chunks(cuda_on_cpu, monkeypatch, dtype):
    """Packed reducing blocks cover up to a 128-byte line of channels: 40 channels in fp16 are
    5 packs in a block of 8 lanes (3 idle), in float32 10 packs over two blocks (the second
    half empty); forced chunks of 7 positions make several partials per channel, merged in
    order. Against the torch backend under the low-precision bound."""
    _force_chunks_of_7(monkeypatch)
    args = inputs("dwconv_bn_act", (2, 40, 5, 6), dtype=dtype, layout="nhwc", seed=44)
    emulation_build.launches(_extension.extension())
    _check("dwconv_bn_act", args, stride=2, activation="hswish", training=True)
    _check("bn_act", {name: t for name, t in args.items() if name != "weight"}, activation="relu6",
           training=True)
    _check("dwconv_bn_act", args, activation="silu")  # running statistics: du sums from grad_input
    se = {name: t.to(dtype) for name, t in inputs("squeeze_excite", (2, 40, 5, 6), hidden=4, layout="nhwc",
                                                  seed=45).items()}
    _check("squeeze_excite", se, gate="sigmoid", post_act="none")
    assert {"stats_kernel", "grad_sums_kernel", "grad_input_kernel", "se_channel_sum_kernel"} <= _packed(
        emulation_build.launches(_extension.extension()))


@pytest.mark.parametrize("element", [2, 4, 8])
@pytest.mark.parametrize("channels_last", [True, False])
def test_the_launchers_reducing_block_is_the_kernels(emulated_extension, element, channels_last):
    # mobileops/cuda/dwconv_bn_act.py sizes the position chunks from its copy of csrc's
    # reduce_shape; the binding exports the original
    from mobileops.cuda.dwconv_bn_act import pack_width, reduce_shape

    for channels in (1, 3, 8, 16, 24, 40, 64, 72, 96, 128, 200, 576):
        for vec in {1, pack_width(element), max(1, pack_width(element) // 2)}:
            if channels_last or vec == 1:
                expected = tuple(emulated_extension.reduce_shape(channels=channels, vec=vec, element=element,
                                                                 channels_last=channels_last))
                assert reduce_shape(channels, vec, element, channels_last) == expected, (channels, vec)


def test_a_misaligned_input_takes_one_element_per_thread(cuda_on_cpu):
    # x one element past a 16-byte boundary (a view into a larger storage): the packs would be
    # misaligned, so the forward falls back; the values are those of an aligned copy
    args = inputs("dwconv_bn_act", (2, 16, 5, 6), dtype=torch.float16, seed=43)
    x = args.pop("x").contiguous(memory_format=torch.channels_last)
    storage = torch.empty(x.numel() + 1, dtype=x.dtype)
    shifted = storage[1:].as_strided(x.shape, x.stride())
    shifted.copy_(x)
    assert shifted.data_ptr() % 16 and shifted.stride() == x.stride()
    results = []
    for view in (x, shifted):
        emulation_build.launches(_extension.extension())
        with mobileops.use_backend("cuda"):
            results.append(ops.dwconv_bn_act(view, *args.values(), activation="relu6"))
        results.append(_packed(emulation_build.launches(_extension.extension())))
    aligned, aligned_packed, misaligned, misaligned_packed = results
    assert aligned_packed == {"apply_kernel"} and misaligned_packed == set()
    assert torch.equal(aligned, misaligned)


@pytest.mark.parametrize("op", ["dwconv_bn_act", "dwconv_act", "bn_act", "squeeze_excite"])
@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_an_inference_call_bound_to_its_plan_gives_the_general_calls_bits(cuda_on_cpu, monkeypatch, op, layout):
    assert_bound_inference_is_general(monkeypatch, "cuda", *bind_cases(op, layout))


@pytest.mark.parametrize(("op", "running"), [("dwconv_bn_act", True), ("dwconv_bn_act", False), ("bn_act", True),
                                             ("bn_act", False), ("squeeze_excite", False)])
def test_a_differentiated_call_bound_to_its_plan_gives_the_general_calls_bits(cuda_on_cpu, monkeypatch, op, running):
    assert_bound_training_is_general(monkeypatch, "cuda", op, "channels_last", running)


W_PACKED = ", kPackW>"  # how the launch log spells an NCHW launch with packs along W


def _off_a_pack(t):
    """The values of ``t`` in the same strides at an address one element past a pack's
    alignment: the kernels then take one element per thread."""
    view = torch.empty(t.numel() + 1, dtype=t.dtype)[1:].view(t.shape)
    return view.copy_(t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("op, options, expected", [
    ("bn_act", dict(activation="hswish"), {"apply_kernel"}),
    ("bn_act", dict(activation="silu", training=True), {"apply_kernel"}),
    ("squeeze_excite", dict(gate="hsigmoid", post_act="hswish"), {"scale_kernel", "dx_kernel"}),
], ids=["bn-eval", "bn-train", "se"])
def test_nchw_packs_along_w_agree_with_one_element_per_thread(cuda_on_cpu, op, options, expected, dtype):
    """In NCHW with W a multiple of the pack (8 fp16, 4 float32) the elementwise kernels without a
    conv take that many columns of one channel per thread (one 16-byte access); the same values
    one element off a pack's alignment take one element per thread. The reductions run in the same
    order either way, so every result agrees to the last bit."""
    args = {name: None if t is None else t.to(dtype) for name, t in inputs(op, (2, 5, 3, 8), seed=46).items()}
    x = args.pop("x")
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(47), dtype=F64).to(dtype)
    stats = [args.pop(name) for name in BN_STATS if name in args]
    params = list(args.values())

    def call(x, *tensors):
        return getattr(ops, op)(x, *tensors, **options)

    results, logs = [], []
    for shift in (lambda t: t, _off_a_pack):
        emulation_build.launches(_extension.extension())  # clears the log
        results.append(_results(call, shift(x), shift(dy), params, stats))
        logs.append(emulation_build.launches(_extension.extension()))
    for i, (a, b) in enumerate(zip(*results)):
        assert torch.equal(a, b), f"result {i} differs between packs along W and one element per thread"
    assert {k.split("<")[0] for k in logs[0] if k.endswith(W_PACKED)} == expected, logs[0]
    assert not any(k.endswith(W_PACKED) for k in logs[1]), logs[1]
