"""Backend registry: selection, environment variable, errors that say why."""

import pytest
import torch

import mobileops
from mobileops import backend, ops


def _dw_inputs():
    return (torch.randn(1, 4, 5, 5), torch.randn(4, 1, 3, 3), None, None, None, None)


def test_torch_is_always_available_and_status_explains_the_rest():
    status = mobileops.backend_status()
    assert set(status) == {"torch", "triton", "cuda"}
    assert status["torch"] is None and "torch" in mobileops.available_backends()
    for name, problem in status.items():
        assert (problem is None) == (name in mobileops.available_backends())
        assert problem is None or (isinstance(problem, str) and problem)


def test_default_is_auto_and_auto_on_cpu_uses_torch():
    assert mobileops.get_backend() == "auto"
    assert backend.resolve("dwconv_bn_act", torch.device("cpu")) is backend._impls["dwconv_bn_act"]["torch"]


def test_set_and_use_backend():
    mobileops.set_backend("torch")
    assert mobileops.get_backend() == "torch"
    with mobileops.use_backend("auto"):
        assert mobileops.get_backend() == "auto"
        with mobileops.use_backend("torch"):
            assert mobileops.get_backend() == "torch"
        assert mobileops.get_backend() == "auto"
    assert mobileops.get_backend() == "torch"
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        mobileops.set_backend("tpu")
    with pytest.raises(ValueError, match="unknown backend"):
        with mobileops.use_backend("fast"):
            pass


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("MOBILEOPS_BACKEND", "torch")
    assert mobileops.get_backend() == "torch"
    monkeypatch.setenv("MOBILEOPS_BACKEND", "quantum")
    assert mobileops.get_backend() == "torch", "the variable is read once, at the first choice"
    backend.forget_choices()
    with pytest.raises(ValueError, match="MOBILEOPS_BACKEND"):
        ops.dwconv_bn_act(*_dw_inputs())
    mobileops.set_backend("torch")  # an explicit choice overrides the environment
    assert ops.dwconv_bn_act(*_dw_inputs()).shape == (1, 4, 5, 5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages of a machine without CUDA")
def test_unavailable_backends_raise_with_the_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(mobileops.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        mobileops.set_backend("triton")
    with pytest.raises(mobileops.BackendUnavailableError, match="cuda"):
        mobileops.set_backend("cuda")
    monkeypatch.setenv("MOBILEOPS_BACKEND", "cuda")  # the env var is not checked until an op runs
    with pytest.raises(mobileops.BackendUnavailableError, match="dwconv_bn_act: backend 'cuda' is unavailable"):
        ops.dwconv_bn_act(*_dw_inputs())


def test_explicit_backend_never_falls_back(monkeypatch):
    """A backend that implements some ops but not the one asked for raises instead of
    quietly running another backend; ``auto`` on CPU still picks torch."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []
    # Every op has a triton impl now, so take squeeze_excite's away for this test.
    without_triton = {name: impl for name, impl in backend._impls["squeeze_excite"].items() if name != "triton"}
    monkeypatch.setitem(backend._impls, "squeeze_excite", without_triton)
    monkeypatch.setitem(backend._impls, "bn_act", dict(backend._impls["bn_act"]))
    backend._impls["bn_act"]["triton"] = lambda *a, **k: calls.append("triton")
    mobileops.set_backend("triton")
    with pytest.raises(mobileops.BackendUnavailableError, match="squeeze_excite: backend 'triton' does not implement"):
        ops.squeeze_excite(torch.randn(1, 8, 3, 3), torch.randn(2, 8), None, torch.randn(8, 2), None)
    ops.bn_act(torch.randn(1, 8, 3, 3), None, None, None, None)
    assert calls == ["triton"]
    mobileops.set_backend("auto")
    ops.bn_act(torch.randn(1, 8, 3, 3), None, None, None, None)
    assert calls == ["triton"]


def test_cuda_backend_rejects_cpu_tensors(monkeypatch):
    monkeypatch.setattr(backend, "_cuda_extension_status", lambda: None)
    monkeypatch.setitem(backend._impls, "bn_act", {**backend._impls["bn_act"], "cuda": lambda *a, **k: None})
    with mobileops.use_backend("cuda"):
        with pytest.raises(mobileops.BackendUnavailableError, match="cannot run on cpu tensors"):
            ops.bn_act(torch.randn(1, 8, 3, 3), None, None, None, None)


def test_register_impl_rejects_bad_names():
    with pytest.raises(ValueError, match="unknown backend"):
        backend.register_impl("bn_act", "opencl")
    with pytest.raises(ValueError, match="'auto' is not a backend"):
        backend.register_impl("bn_act", "auto")


def test_auto_order_follows_the_measured_rule(monkeypatch):
    """auto on CUDA tensors: fused kernels only for large inference calls or under graph capture
    (where the H100 benchmark showed them faster); torch for training and small calls."""
    cuda, big = torch.device("cuda"), backend.AUTO_KERNEL_MIN_ELEMENTS
    monkeypatch.setattr(backend, "_capturing", lambda device: False)
    assert backend.auto_order("bn_act", torch.device("cpu"), inference=True, numel=10 * big) == ("torch",)
    assert backend.auto_order("bn_act", cuda, inference=True, numel=big) == ("triton", "torch")
    assert backend.auto_order("bn_act", cuda, inference=True, numel=big - 1) == ("torch",)
    assert backend.auto_order("bn_act", cuda, inference=False, numel=10 * big) == ("torch",)
    monkeypatch.setitem(backend.AUTO_PREFERS_CUDA, "bn_act", "test device")
    assert backend.auto_order("bn_act", cuda, inference=True, numel=big) == ("cuda", "triton", "torch")
    monkeypatch.setattr(backend, "_capturing", lambda device: True)
    assert backend.auto_order("dwconv_bn_act", cuda, inference=True, numel=1) == ("triton", "torch")
    assert backend.auto_order("dwconv_bn_act", cuda, inference=False, numel=1) == ("torch",)


def test_ops_tell_auto_whether_a_call_is_inference(monkeypatch):
    seen = []
    real = backend._resolve

    def spy(op, device, inference=False, numel=0):
        seen.append((op, inference, numel))
        return real(op, device, inference, numel)

    monkeypatch.setattr(backend, "_resolve", spy)
    x, w = torch.randn(2, 3, 4, 4), torch.randn(3, 1, 3, 3)
    stats = [torch.ones(3), torch.zeros(3), torch.zeros(3), torch.ones(3)]
    mobileops.ops.dwconv_bn_act(x, w, *stats, training=False)
    mobileops.ops.dwconv_bn_act(x, w, *stats, training=True)
    mobileops.ops.dwconv_bn_act(x, w.requires_grad_(True), *stats, training=False)
    with torch.no_grad():
        mobileops.ops.bn_act(x, *stats, training=False)
    assert seen == [("dwconv_bn_act", True, 96), ("dwconv_bn_act", False, 96), ("dwconv_bn_act", False, 96),
                    ("bn_act", True, 96)]
