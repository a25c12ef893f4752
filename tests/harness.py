"""One parity harness for the fused ops: input builders, one forward+backward runner, the error
rule of docs/measuring.md ("The error bound in the tests") and the (device, backend) targets
that can run an op here. A new op is a builder and an eager composition here; a new backend is
one more target.

Usage::

    @over_targets("bn_act")
    def test_x(target):
        args = inputs("bn_act", (2, 3, 5, 5))
        check("bn_act", target, args, training=True, activation="relu")

``target`` is the fixture below (``target_fixture``, imported into the test module); for the CUDA backend on a
machine without a GPU it runs the emulated build of csrc/ (``cuda_backend_on_cpu``)."""

import contextlib
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICES, FLOORS, assert_within_bound, cuda_backend_on_cpu, relative_norm_error, runnable_backends
from torch import nn

import mobileops
from mobileops import backend, ops
from mobileops import reference as ref_blocks

F64 = torch.float64
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
ACTIVATIONS = ("none", "relu", "relu6", "hswish", "silu", "hsigmoid")
ACT_MODULES = {
    "none": nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6, "hswish": ref_blocks.RefHSwish,
    "silu": nn.SiLU, "hsigmoid": ref_blocks.RefHSigmoid, "sigmoid": nn.Sigmoid,
}
#: Positional tensor arguments of each op, in call order.
ARGUMENTS = {
    "dwconv_bn_act": ("x", "weight", "bn_weight", "bn_bias", "running_mean", "running_var"),
    "dwconv_act": ("x", "weight", "bias"),
    "bn_act": ("x", "bn_weight", "bn_bias", "running_mean", "running_var"),
    "squeeze_excite": ("x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"),
}
#: Arguments an op updates in place instead of differentiating.
BUFFERS = ("running_mean", "running_var")
#: Arguments that stay float32 under a low-precision x, as in nn.BatchNorm2d under autocast.
BN_TENSORS = ("bn_weight", "bn_bias", "running_mean", "running_var")
#: The reference implementation: the plain PyTorch composition of each op (nn.functional and
#: mobileops.reference), independent of every mobileops backend.
EAGER = "eager"


class Target(NamedTuple):
    device: str
    backend: str
    #: True where the backend is slow here (Triton's CPU interpreter, the emulated CUDA kernels):
    #: such targets take a thinned grid.
    slow: bool


def targets(op: str, *, emulated: bool = True) -> list:
    """pytest params, one Target per (device, backend) that runs ``op`` here, the torch backend
    included; with ``emulated`` the CUDA backend on the CPU too where no GPU has it."""
    params = []
    for device in DEVICES:
        names = runnable_backends(op, device)
        if emulated and device == "cpu" and _emulated_cuda_needed(op):
            names.append("cuda")
        for name in names:
            slow = device == "cpu" and name != "torch"
            params.append(pytest.param(Target(device, name, slow), id=f"{device}-{name}"))
    return params


def _emulated_cuda_needed(op: str) -> bool:
    """The CUDA backend implements ``op`` but cannot run it on a GPU here."""
    return "cuda" in backend._impls.get(op, {}) and not ("cuda" in DEVICES and "cuda" in runnable_backends(op, "cuda"))


def over_targets(op: str, *, emulated: bool = True):
    """Parametrize the ``target`` fixture over :func:`targets`."""
    return pytest.mark.parametrize("target", targets(op, emulated=emulated), indirect=True)


@pytest.fixture(name="target")
def target_fixture(request):
    """The parametrized Target; the emulated CUDA backend is switched on for the whole test.
    Test modules import it (``from harness import target_fixture``) for pytest to find it."""
    t = request.param
    emulate = t.backend == "cuda" and t.device == "cpu"
    extension = request.getfixturevalue("emulated_extension") if emulate else None
    with cuda_backend_on_cpu(extension) if emulate else contextlib.nullcontext():
        yield t


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def inputs(op: str, shape, *, k: int = 3, hidden: int | None = None, biases: bool = True, stats: bool = True,
           dtype=F64, layout: str = "nchw", seed: int = 0, device: str = "cpu", scale: float = 1.0) -> dict:
    """The tensor arguments of ``op`` on an input of ``shape`` (N, C, H, W), by name: a KxK depthwise
    weight, BatchNorm parameters and running statistics (``stats=False``: none) with non-trivial
    values, SE weights of ``hidden`` (default C // 4, at least 1) units; ``biases=False`` leaves
    the conv and FC biases out. Drawn in float64 and converted with :func:`cast`. ``scale``
    multiplies x (reaching both sides of every activation's kinks)."""
    g = _gen(seed)
    n, c, h, w = shape

    def rand(*size, mul=1.0, add=0.0, uniform=False):
        return add + mul * (torch.rand if uniform else torch.randn)(*size, generator=g, dtype=F64)

    x = rand(n, c, h, w, mul=scale)
    if op == "squeeze_excite":
        r = hidden or max(c // 4, 1)
        t = dict(x=x, fc1_weight=rand(r, c, mul=c ** -0.5), fc1_bias=rand(r) if biases else None,
                 fc2_weight=rand(c, r, mul=r ** -0.5), fc2_bias=rand(c) if biases else None)
    else:
        t = dict(x=x)
        if op != "bn_act":
            t["weight"] = rand(c, 1, k, k, mul=1 / k)
        if op == "dwconv_act":
            t["bias"] = rand(c, mul=0.2) if biases else None
        else:
            t |= dict(bn_weight=rand(c, mul=0.3, add=1), bn_bias=rand(c, mul=0.2))
            t |= dict(running_mean=rand(c, mul=0.2), running_var=rand(c, add=0.5, uniform=True)) if stats else \
                dict(running_mean=None, running_var=None)
    return cast(t, dtype, layout=layout, device=device)


def bn_dtype(dtype):
    """BatchNorm parameters and statistics stay float32 under low precision, as in nn modules."""
    return F64 if dtype == F64 else torch.float32


def cast(args: dict, dtype, *, layout: str | None = None, device: str | None = None) -> dict:
    """``args`` in ``dtype`` (BatchNorm tensors in bn_dtype), x in ``layout`` (None: as it is)."""
    out = {}
    for name, t in args.items():
        if t is not None:
            t = t.detach().to(device=device or t.device, dtype=bn_dtype(dtype) if name in BN_TENSORS else dtype)
            if name == "x" and layout is not None:
                t = t.contiguous(memory_format=LAYOUTS[layout])
        out[name] = t
    return out


def _eager(op, t, *, stride=1, padding=None, activation="none", training=False, momentum=0.1, eps=1e-5,
           gate="hsigmoid", post_act="none"):
    if op == "squeeze_excite":
        hidden = F.relu(F.linear(t["x"].mean((2, 3)), t["fc1_weight"], t["fc1_bias"]))
        gates = ACT_MODULES[gate]()(F.linear(hidden, t["fc2_weight"], t["fc2_bias"]))
        return ACT_MODULES[post_act]()(t["x"] * gates[:, :, None, None])
    y = t["x"]
    if op != "bn_act":
        k = t["weight"].shape[-1]
        y = F.conv2d(y, t["weight"], t.get("bias"), stride, (k - 1) // 2 if padding is None else padding, 1,
                     y.shape[1])
    if op != "dwconv_act":
        use_batch = training or t["running_mean"] is None
        y = F.batch_norm(y, t["running_mean"], t["running_var"], t["bn_weight"], t["bn_bias"], use_batch,
                         momentum, eps)
    return ACT_MODULES[activation]()(y)


def _copy(t):
    """A copy of ``t`` with ``t``'s strides: clone would make a strided view (a slice) dense, and
    the op would never see it."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t.detach())


def run(op: str, backend: str, args: dict, *, dy=None, dy_layout: str | None = None, seed: int = 7,
        **options) -> dict:
    """``op`` on ``backend`` (a backend name or :data:`EAGER`) with fresh copies of ``args``:
    forward, then backward of ``dy`` (default: drawn from ``seed`` in float64, then taken to y's
    dtype and, with ``dy_layout``, to that layout). ``options``: the op's keyword arguments.
    Returns the output, the gradient of every differentiable input and the running statistics
    after the call, by name (``y``, ``d<argument>``, ``running_mean``, ``running_var``)."""
    leaves = {name: None if t is None else _copy(t) for name, t in args.items()}
    for name, t in leaves.items():
        if t is not None and name not in BUFFERS:
            t.requires_grad_(True)
    if backend == EAGER:
        y = _eager(op, leaves, **options)
    else:
        with mobileops.use_backend(backend):
            y = getattr(ops, op)(*(leaves[name] for name in ARGUMENTS[op]), **options)
    if dy is None:
        dy = torch.randn(y.shape, generator=_gen(seed), dtype=F64).to(y.device, y.dtype)
        if dy_layout is not None:
            dy = dy.contiguous(memory_format=LAYOUTS[dy_layout])
    y.backward(dy.to(y.dtype))
    out = {"y": y.detach()}
    out |= {f"d{name}": t.grad for name, t in leaves.items() if t is not None and name not in BUFFERS}
    out |= {name: leaves[name] for name in BUFFERS if leaves.get(name) is not None}
    return out


def assert_parity(result: dict, reference: dict, base: dict | None = None, *, by_norm=(), what="") -> None:
    """The rule of docs/measuring.md on every tensor of ``result``. Without ``base`` (float64):
    outputs and gradients to rtol 1e-9 / atol 1e-10, running statistics to 1e-12. With ``base``
    (the torch backend in result's dtype): no NaN, and within twice base's error against the
    float64 ``reference`` plus the dtype's floor; the names in ``by_norm`` (weight gradients of
    large reductions) by relative norm instead of largest element."""
    assert result.keys() == reference.keys(), f"{what}: {list(result)} vs {list(reference)}"
    for name, got in result.items():
        want = reference[name]
        where = f"{what} {name}".strip()
        if base is None:
            tol = 1e-12 if name in BUFFERS else 1e-9, 1e-12 if name in BUFFERS else 1e-10
            torch.testing.assert_close(got.cpu(), want.cpu(), rtol=tol[0], atol=tol[1],
                                       msg=lambda m, where=where: f"{where}: {m}")
        elif name in by_norm:
            err, base_err = relative_norm_error(got, want), relative_norm_error(base[name], want)
            assert err <= 2 * base_err + FLOORS[got.dtype], f"{where}: error {err:.3g}, torch's {base_err:.3g}"
        else:
            assert_within_bound(got.cpu(), want.cpu(), base[name].cpu(), where)


def check(op: str, target: Target | str, args: dict, *, dtype=F64, reference: str = EAGER, by_norm=(),
          dy_layout: str | None = None, **options) -> dict:
    """``op`` on ``target`` against the reference, under the rule for ``dtype``; returns the
    target's result. float64: ``reference`` (default the eager composition) on ``args``. Lower
    precision: the torch backend in float64 on ``args`` rounded to ``dtype`` (BatchNorm tensors
    to float32, unless x already is in ``dtype``: then all as they are) and then widened, so the
    reference does not also measure the inputs' rounding; the torch backend in ``dtype`` as the
    base."""
    backend = target if isinstance(target, str) else target.backend
    what = f"{op} {backend} {dtype}"
    if dtype == F64:
        ref = run(op, reference, args, dy_layout=dy_layout, **options)
        ours = run(op, backend, args, dy_layout=dy_layout, **options)
        assert_parity(ours, ref, what=what)
        return ours
    # args already in dtype go as they are (BatchNorm tensors in half precision included)
    low = args if args["x"].dtype == dtype else cast(args, dtype)
    ours = run(op, backend, low, dy_layout=dy_layout, **options)
    dy = torch.randn(ours["y"].shape, generator=_gen(7), dtype=F64).to(dtype).double()  # run's default dy, widened
    ref = run(op, "torch", cast(low, F64), dy=dy.to(ours["y"].device), **options)
    base = run(op, "torch", low, dy_layout=dy_layout, **options)
    assert ours["y"].dtype == dtype
    assert_parity(ours, ref, base, by_norm=by_norm, what=what)
    return ours

