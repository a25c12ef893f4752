"""Call plans (mobileops.ops._plan): a repeated call signature skips validation and the backend
choice, and nothing a plan skips can change what a call does."""

import pytest
import torch

import mobileops
from mobileops import backend, ops


def _dw_args(c=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, c, 6, 6, generator=g, dtype=dtype)
    weight = torch.randn(c, 1, 3, 3, generator=g, dtype=dtype)
    bn = [1 + 0.1 * torch.randn(c, generator=g, dtype=dtype), torch.randn(c, generator=g, dtype=dtype)]
    return x, weight, *bn, torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype)


@pytest.fixture
def resolutions(monkeypatch):
    """The (op, inference) of every backend choice made (one per new plan)."""
    seen = []
    real = backend._resolve

    def spy(op, device, inference=False, numel=0):
        seen.append((op, inference))
        return real(op, device, inference, numel)

    monkeypatch.setattr(backend, "_resolve", spy)
    return seen


def test_a_repeated_signature_chooses_once(resolutions):
    x, w, gamma, beta, rm, rv = _dw_args()
    first = ops.dwconv_bn_act(x, w, gamma, beta, rm, rv, activation="relu")
    again = ops.dwconv_bn_act(x.clone(), w, gamma, beta, rm, rv, activation="relu")
    assert torch.equal(first, again)
    assert resolutions == [("dwconv_bn_act", True)]
    ops.dwconv_bn_act(x, w, gamma, beta, rm, rv, activation="relu6")  # another option: another plan
    ops.dwconv_bn_act(x[:1], w, gamma, beta, rm, rv, activation="relu")  # another shape
    ops.dwconv_bn_act(x.contiguous(memory_format=torch.channels_last), w, gamma, beta, rm, rv, activation="relu")
    assert len(resolutions) == 4


def test_grad_mode_and_requires_grad_are_part_of_the_signature(resolutions):
    x, w, gamma, beta, rm, rv = _dw_args()
    ops.bn_act(x, gamma, beta, rm, rv)
    ops.bn_act(x, gamma.requires_grad_(True), beta, rm, rv)
    with torch.no_grad():
        ops.bn_act(x, gamma, beta, rm, rv)
    assert resolutions == [("bn_act", True), ("bn_act", False), ("bn_act", True)]


def test_the_selected_backend_is_part_of_the_signature(resolutions):
    x, w, gamma, beta, rm, rv = _dw_args()
    calls = []
    real = backend._impls["bn_act"]["torch"]
    ops.bn_act(x, gamma, beta, rm, rv)
    with mobileops.use_backend("torch"):
        ops.bn_act(x, gamma, beta, rm, rv)
    assert len(resolutions) == 2
    # registering an implementation forgets the plans holding the one it replaces
    backend.register_impl("bn_act", "torch")(lambda *a, **k: calls.append(1) or real(*a, **k))
    try:
        ops.bn_act(x, gamma, beta, rm, rv)
    finally:
        backend.register_impl("bn_act", "torch")(real)
    assert calls == [1]


def test_values_are_checked_on_every_call():
    x, w, gamma, beta, rm, rv = _dw_args()
    ops.dwconv_bn_act(x, w, gamma, beta, rm, rv, training=True, momentum=0.1)
    with pytest.raises(ValueError, match="momentum"):
        ops.dwconv_bn_act(x, w, gamma, beta, rm, rv, training=True, momentum=1.5)
    with pytest.raises(ValueError, match="eps"):
        ops.bn_act(x, gamma, beta, rm, rv, eps=0.0)
    # same signature, but the running mean now shares memory with x
    with pytest.raises(ValueError, match="share memory"):
        ops.bn_act(x, gamma, beta, x.view(-1)[:4], rv, training=True)


@pytest.mark.parametrize("bad, message", [(dict(stride=2.0), "stride"), (dict(stride=True), "stride"),
                                          (dict(training=1), "training"), (dict(padding=[1]), "padding")])
def test_an_option_equal_to_a_valid_one_is_still_refused(bad, message):
    """2.0 == 2 and True == 1 hash alike, so the key carries each option's type."""
    x, w, gamma, beta, rm, rv = _dw_args()
    ops.dwconv_bn_act(x, w, gamma, beta, rm, rv, stride=2, training=True, padding=1)
    options = {**dict(stride=2, training=True, padding=1), **bad}
    with pytest.raises((TypeError, ValueError), match=message):
        ops.dwconv_bn_act(x, w, gamma, beta, rm, rv, **options)


def test_a_parameter_changed_in_place_gets_a_new_plan():
    """``module.half()`` keeps the Parameter object and swaps its data: the plan of the float64
    signature must not be reused for it."""
    x, w, gamma, beta, rm, rv = _dw_args()
    weight = torch.nn.Parameter(w, requires_grad=False)
    ops.dwconv_bn_act(x, weight, gamma, beta, rm, rv)
    weight.data = weight.data.float()
    with pytest.raises(TypeError, match="weight has dtype torch.float32"):
        ops.dwconv_bn_act(x, weight, gamma, beta, rm, rv)
    weight.data = torch.randn(4, 1, 5, 5, dtype=torch.float64)
    assert ops.dwconv_bn_act(x, weight, gamma, beta, rm, rv, padding=None).shape == x.shape


def test_recording_and_tracing_take_the_full_path(resolutions):
    x, w, gamma, beta, rm, rv = _dw_args()
    ops.bn_act(x, gamma, beta, rm, rv)
    with backend.record_calls() as calls:
        ops.bn_act(x, gamma, beta, rm, rv)
    assert len(calls) == 1 and len(resolutions) == 2
    torch.jit.trace(lambda t: ops.bn_act(t, gamma, beta, rm, rv), (x,), check_trace=False)
    assert len(resolutions) == 3


def test_forget_choices_clears_every_plan(resolutions, monkeypatch):
    x, w, gamma, beta, rm, rv = _dw_args()
    ops.bn_act(x, gamma, beta, rm, rv)
    backend.forget_choices()
    ops.bn_act(x, gamma, beta, rm, rv)
    assert len(resolutions) == 2
    monkeypatch.setenv(backend.ENV_VAR, "quantum")
    ops.bn_act(x, gamma, beta, rm, rv)  # the variable was read before: still auto
    backend.forget_choices()
    with pytest.raises(ValueError, match=backend.ENV_VAR):
        ops.bn_act(x, gamma, beta, rm, rv)


def test_the_autotune_variable_is_read_once_until_forgotten(monkeypatch):
    from mobileops.kernels import _common

    monkeypatch.setenv("MOBILEOPS_AUTOTUNE", "0")
    backend.forget_choices()
    assert not _common.autotune_enabled()
    monkeypatch.setenv("MOBILEOPS_AUTOTUNE", "1")
    assert not _common.autotune_enabled(), "read once per process"
    backend.forget_choices()
    assert _common.autotune_enabled()


def test_a_full_cache_starts_again(monkeypatch):
    from mobileops.ops import _plan

    monkeypatch.setattr(_plan, "MAX_PLANS", 3)
    x, w, gamma, beta, rm, rv = _dw_args()
    cache = ops.bn_act.__globals__["_PLANS"]  # the module is shadowed by the function of its name
    for n in range(1, 6):
        ops.bn_act(torch.randn(n, 4, 3, 3, dtype=torch.float64), gamma, beta, rm, rv)
        assert len(cache) <= 3


def _kernel_backends(op):
    from helpers import runnable_backends

    return [b for b in runnable_backends(op, "cpu") if b != "torch"]


@pytest.mark.parametrize("op", ["dwconv_bn_act", "dwconv_act", "bn_act", "squeeze_excite"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
def test_an_inference_call_is_bound_to_its_plan_and_gives_the_general_calls_bits(op, layout, monkeypatch):
    from helpers import assert_bound_inference_is_general, bind_cases

    backends = _kernel_backends(op)
    if not backends:
        pytest.skip("no kernel backend runs on this CPU (set TRITON_INTERPRET=1)")
    for name in backends:
        assert_bound_inference_is_general(monkeypatch, name, *bind_cases(op, layout))


@pytest.mark.parametrize(("op", "running"), [("dwconv_bn_act", True), ("dwconv_bn_act", False), ("bn_act", True),
                                             ("bn_act", False), ("squeeze_excite", False)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
def test_a_differentiated_call_is_one_autograd_node_with_the_general_calls_bits(op, layout, running, monkeypatch):
    """dwconv_bn_act / bn_act with batch statistics (training with running statistics, or none),
    and squeeze_excite."""
    from helpers import assert_bound_training_is_general

    backends = _kernel_backends(op)
    if not backends:
        pytest.skip("no kernel backend runs on this CPU (set TRITON_INTERPRET=1)")
    for name in backends:
        assert_bound_training_is_general(monkeypatch, name, op, layout, running)


def test_calls_that_need_more_than_the_forward_kernel_are_not_bound():
    """A differentiated call with running statistics and autocast on the conv keep the general
    implementation (the kernel ops' dispatch, autograd and casts)."""
    # (squeeze_excite binds every eager call: it has neither)
    import contextlib

    from helpers import plans_of

    backends = _kernel_backends("dwconv_bn_act")
    if not backends:
        pytest.skip("no kernel backend runs on this CPU (set TRITON_INTERPRET=1)")
    x, w, gamma, beta, rm, rv = _dw_args(dtype=torch.float32)
    none = contextlib.nullcontext
    calls = {
        "a gradient": (none, lambda: ops.bn_act(x, gamma.clone().requires_grad_(True), beta, rm, rv)),
        "autocast": (lambda: torch.autocast("cpu", torch.bfloat16),
                     lambda: ops.dwconv_bn_act(x, w, gamma, beta, rm, rv)),
        "autocast in training": (lambda: torch.autocast("cpu", torch.bfloat16),
                                 lambda: ops.dwconv_bn_act(x, w, gamma, beta, rm, rv, training=True)),
    }
    for name in backends:
        with mobileops.use_backend(name):
            for what, (context, call) in calls.items():
                backend.forget_choices()
                with context():
                    call()
                plans = list(plans_of("bn_act").values()) + list(plans_of("dwconv_bn_act").values())
                assert len(plans) == 1 and plans[0].options != {}, f"{name}: a call with {what} was bound"
