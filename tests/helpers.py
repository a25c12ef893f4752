"""Shared test utilities: BN randomisation and module parity checks (float64)."""

import contextlib

import pytest
import torch
from torch import nn

import mobileops
from mobileops import backend, ops

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def one_error_line(captured) -> str:
    """The one ``error: ...`` line a CLI call printed on stderr (``capsys.readouterr()``), no traceback."""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err, captured.err
    return lines[0]


@contextlib.contextmanager
def cuda_backend_on_cpu(extension):
    """Within the block the ``cuda`` backend takes CPU tensors and runs ``extension`` (the
    emulated build of csrc/ from the ``emulated_extension`` fixture) in place of mobileops._C."""
    from mobileops.cuda import _extension

    real_problem = backend._backend_problem
    saved = _extension.EMULATION
    _extension.EMULATION = extension
    backend._backend_problem = lambda name, device: None if name == "cuda" else real_problem(name, device)
    backend.forget_choices()  # plans made before chose without the emulated backend
    try:
        yield
    finally:
        _extension.EMULATION = saved
        backend._backend_problem = real_problem
        backend.forget_choices()


def count_launches(monkeypatch) -> list[str]:
    """The names of the Triton kernels launched from now on, in order. Every Triton launch of
    mobileops is a prepared one (``mobileops.kernels._common.Prepared``, which on a GPU relaunches
    directly after its first call) or goes through ``mobileops.kernels._common.launch`` (which a
    prepared launch's first call takes too): this counts both, each launch once."""
    from mobileops.kernels import _common

    names, real_launch, real_prepared = [], _common.launch, _common.Prepared.__call__
    inside_prepared = []

    def counting(kernel, *args, **kwargs):
        if not inside_prepared:
            names.append(getattr(kernel, "__name__", type(kernel).__name__))
        return real_launch(kernel, *args, **kwargs)

    def counting_prepared(self, *values):
        names.append(getattr(self.kernel, "__name__", type(self.kernel).__name__))
        inside_prepared.append(True)
        try:
            return real_prepared(self, *values)
        finally:
            inside_prepared.pop()

    monkeypatch.setattr(_common, "launch", counting)
    monkeypatch.setattr(_common.Prepared, "__call__", counting_prepared)
    return names


def runnable_backends(op: str, device: str):
    """Backends that implement ``op`` and can run it on ``device`` in this environment."""
    return [name for name in backend.BACKENDS
            if name in backend._impls.get(op, {}) and backend._backend_problem(name, torch.device(device)) is None]


def backend_params(op: str):
    """pytest params (device, backend) for every backend that can run ``op`` here."""
    return [pytest.param(d, b, id=f"{d}-{b}") for d in DEVICES for b in runnable_backends(op, d)]


def randomize_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm2d non-trivial affine parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(1 + 0.3 * torch.randn(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
    return module


def assert_modules_match(ours: nn.Module, ref: nn.Module, x: torch.Tensor, *, train: bool,
                         steps: int = 1, rtol: float = 1e-9, atol: float = 1e-10) -> None:
    """Outputs, input grads, parameter grads and buffers (running stats) of two modules
    with identical state_dicts agree after ``steps`` forward/backward passes."""
    ours.train(train)
    ref.train(train)
    ours_params = dict(ours.named_parameters())
    ours_buffers = dict(ours.named_buffers())
    for step in range(steps):
        x_ref = x.detach().clone().requires_grad_(True)
        x_ours = x.detach().clone().requires_grad_(True)
        y_ref, y_ours = ref(x_ref), ours(x_ours)
        torch.testing.assert_close(y_ours, y_ref, rtol=rtol, atol=atol,
                                   msg=lambda m, step=step: f"output (step {step}): {m}")
        grad = torch.randn_like(y_ref)
        ref.zero_grad()
        ours.zero_grad()
        y_ref.backward(grad)
        y_ours.backward(grad)
        torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=rtol, atol=atol,
                                   msg=lambda m: f"input grad: {m}")
        for name, p in ref.named_parameters():
            torch.testing.assert_close(ours_params[name].grad, p.grad, rtol=rtol, atol=atol,
                                       msg=lambda m, n=name: f"grad of {n}: {m}")
    for name, b in ref.named_buffers():
        torch.testing.assert_close(ours_buffers[name], b, rtol=rtol, atol=atol,
                                   msg=lambda m, n=name: f"buffer {n}: {m}")


def load_from(ref: nn.Module, ours: nn.Module) -> nn.Module:
    """Load ``ref``'s state_dict into ``ours`` strictly; both end up in float64."""
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.double()
    return ours.double()


def count_bn(module: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in module.modules())


#: Relative error floors per dtype (docs/measuring.md, "The error bound in the tests").
FLOORS = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 1e-2}


def assert_within_bound(out: torch.Tensor, ref64: torch.Tensor, out_torch: torch.Tensor, what: str = "") -> None:
    """The flash-attention rule: ``max|out - ref| <= 2 max|out_torch - ref| + floor * max|ref|``
    with ``ref`` in float64 and ``out_torch`` the torch backend in ``out``'s dtype; no NaN."""
    assert not torch.isnan(out).any(), f"{what}: NaN in output"
    ref64 = ref64.double()
    err = (out.double() - ref64).abs().max().item()
    torch_err = (out_torch.double() - ref64).abs().max().item()
    scale = max(ref64.abs().max().item(), 1.0)
    bound = 2 * torch_err + FLOORS[out.dtype] * scale
    assert err <= bound, f"{what}: max error {err:.3g} > bound {bound:.3g} (torch's own error {torch_err:.3g})"


def relative_norm_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``|out - ref| / |ref|`` (Frobenius norms) in float64: the measure for reductions such as
    weight gradients, whose single elements have no natural scale of their own."""
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_nan_and_inf_land_as_with_torch(device: str, backend_name: str) -> None:
    """All four ops on an input holding a NaN and an Inf: NaN and Inf in the same positions as
    the torch backend's outputs, the finite values equal to float64 precision."""
    from mobileops import ops, use_backend

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64)
    x[0, 1, 2, 3] = float("nan")
    x[1, 2, 0, 0] = float("inf")
    w, w1, w2 = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in [(4, 1, 3, 3), (2, 4), (4, 2)])
    gamma = 1 + 0.2 * torch.randn(4, generator=g, dtype=torch.float64)
    beta, rm, rv = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64), torch.ones(4).double()
    x, w, w1, w2, gamma, beta, rm, rv = (t.to(device) for t in (x, w, w1, w2, gamma, beta, rm, rv))

    def run(name):
        with use_backend(name):
            return [ops.dwconv_bn_act(x, w, gamma, beta, rm, rv, activation="relu6", training=False),
                    ops.dwconv_act(x, w, None, activation="hswish"),
                    ops.bn_act(x, gamma, beta, rm, rv, activation="silu", training=False),
                    ops.squeeze_excite(x, w1, None, w2, None, post_act="relu")]

    for index, (got, want) in enumerate(zip(run(backend_name), run("torch"))):
        assert torch.equal(torch.isnan(got), torch.isnan(want)), f"output {index}: NaN positions differ"
        assert torch.equal(torch.isinf(got), torch.isinf(want)), f"output {index}: Inf positions differ"
        finite = torch.isfinite(want)
        torch.testing.assert_close(got[finite], want[finite], rtol=1e-9, atol=1e-10)


def plans_of(op: str) -> dict:
    """The call-plan cache of the op ``op`` (mobileops.ops._plan)."""
    import importlib

    module = importlib.import_module({"dwconv_act": "mobileops.ops.dwconv_bn_act"}.get(op, f"mobileops.ops.{op}"))
    names = {"dwconv_bn_act": "_DWCONV_BN_ACT_PLANS", "dwconv_act": "_DWCONV_ACT_PLANS"}
    return getattr(module, names.get(op, "_PLANS"))


def bind_cases(op: str, layout: str, dtype=torch.float32):
    """(op, a call of ``op`` needing no gradient, its input x in ``layout``: "nchw",
    "channels_last" or "sliced", a non-dense view of a channels_last tensor)."""
    g = torch.Generator().manual_seed(0)
    c = 8

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    x, w, gamma, beta = rand(2, c, 7, 6), rand(c, 1, 3, 3), 1 + rand(c) / 10, rand(c)
    rm, rv, fc1, fc2 = rand(c) / 10, 1 + rand(c).abs(), rand(2, c), rand(c, 2)
    calls = {
        "dwconv_bn_act": lambda x: ops.dwconv_bn_act(x, w, gamma, beta, rm, rv, stride=2, activation="hswish"),
        "dwconv_act": lambda x: ops.dwconv_act(x, w, beta, activation="relu6"),
        "bn_act": lambda x: ops.bn_act(x, gamma, beta, rm, rv, activation="silu"),
        "squeeze_excite": lambda x: ops.squeeze_excite(x, fc1, None, fc2, beta, post_act="hswish"),
    }
    last = x.contiguous(memory_format=torch.channels_last)
    return op, calls[op], {"nchw": x, "channels_last": last, "sliced": last[:, :, 1:, :-1]}[layout]


def assert_bound_inference_is_general(monkeypatch, backend_name: str, op: str, call, x) -> None:
    """On ``backend_name``, ``call(x)`` (an inference call) is bound to its plan
    (mobileops.ops._plan.bind) and gives the general implementation's values bit for bit, in the
    same strides: the bound call allocates what the general one does and launches the same."""
    from mobileops.ops import _plan

    with mobileops.use_backend(backend_name):
        backend.forget_choices()
        bound = call(x)
        plans = list(plans_of(op).values())
        assert len(plans) == 1 and plans[0].options == {}, f"{backend_name}: the inference plan was not bound"
        again = call(x)  # through the stored plan
        with monkeypatch.context() as m:  # the general implementation for the same call
            m.setattr(_plan, "bind", lambda impl, args, options, in_place=None:
                      _plan.Plan(impl.call, options, in_place))
            backend.forget_choices()
            general = call(x)
            assert list(plans_of(op).values())[0].options != {}
        backend.forget_choices()
    for out in (bound, again):
        assert out.stride() == general.stride() and out.dtype == general.dtype
        assert torch.equal(out, general), f"{backend_name}: the bound call's values differ from the general call's"


#: The autograd node of each op's differentiated call bound to its plan.
BOUND_TRAINING_NODES = {"dwconv_bn_act": "BatchNormTrainingBackward", "bn_act": "BatchNormTrainingBackward",
                        "squeeze_excite": "SqueezeExciteTrainingBackward"}


def assert_bound_training_is_general(monkeypatch, backend_name: str, op: str, layout: str, running: bool) -> None:
    """On ``backend_name``, a differentiated ``op`` call is bound to its plan as one autograd
    node (:data:`BOUND_TRAINING_NODES`), and gives the general implementation's output, running
    statistics and gradients bit for bit: the same launches with the same arguments.
    ``dwconv_bn_act`` and ``bn_act`` run with batch statistics: training with running
    statistics when ``running``, else without any (``squeeze_excite`` ignores ``running``)."""
    from mobileops.ops import _plan

    _, _, x = bind_cases(op, layout)
    g = torch.Generator().manual_seed(1)
    c = x.shape[1]
    w, gamma, beta = (torch.randn(*shape, generator=g) for shape in ((c, 1, 3, 3), (c,), (c,)))
    fc1, fc2 = torch.randn(3, c, generator=g) / 4, torch.randn(c, 3, generator=g) / 4

    def run():
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, gamma, beta)]
        stats = (torch.zeros(c), torch.ones(c)) if running else (None, None)
        if op == "dwconv_bn_act":
            y = ops.dwconv_bn_act(leaves[0], leaves[1], leaves[2], leaves[3], *stats, stride=2, activation="hswish",
                                  training=running)
        elif op == "bn_act":
            del leaves[1]
            y = ops.bn_act(leaves[0], leaves[1], leaves[2], *stats, activation="silu", training=running)
        else:
            stats = ()
            leaves = [leaves[0]] + [t.detach().clone().requires_grad_(True) for t in (fc1, fc2, beta)]
            y = ops.squeeze_excite(leaves[0], leaves[1], None, leaves[2], leaves[3], post_act="hswish")
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(memory_format=torch.channels_last)
        return y, y.grad_fn, stats, torch.autograd.grad(y, leaves, dy)

    with mobileops.use_backend(backend_name):
        backend.forget_choices()
        bound = [run(), run()]  # the first makes the plan, the second runs the stored one
        plans = list(plans_of(op).values())
        assert len(plans) == 1 and plans[0].options == {}, f"{backend_name}: the training plan was not bound"
        with monkeypatch.context() as m:  # the general implementation for the same call
            m.setattr(_plan, "bind", lambda impl, args, options, in_place=None:
                      _plan.Plan(impl.call, options, in_place))
            backend.forget_choices()
            general = run()
        backend.forget_choices()
    for y, grad_fn, stats, grads in bound:
        assert type(grad_fn).__name__ == BOUND_TRAINING_NODES[op], f"{backend_name}: {type(grad_fn).__name__}"
        assert y.stride() == general[0].stride() and torch.equal(y, general[0]), f"{backend_name}: output differs"
        for mine, theirs in zip(stats + grads, general[2] + general[3]):
            assert (mine is None) == (theirs is None)
            if mine is not None:
                assert mine.stride() == theirs.stride() and torch.equal(mine, theirs), \
                    f"{backend_name}: a running statistic or gradient differs from the general call's"
