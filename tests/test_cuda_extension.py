"""The CUDA extension mobileops._C: it is built wherever nvcc is (CI included), imports without
a GPU and says so, checks every argument before a launch, and the Python launchers refuse
tensors they cannot run. GPU parity of the cuda backend is in test_ops.py (every runnable
backend) and test_cuda_backend.py."""

import os
import shutil
from pathlib import Path

import pytest
import torch

import mobileops
from mobileops import backend

CUDA = torch.cuda.is_available()


def _nvcc_here() -> bool:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    return bool(shutil.which("nvcc")) or bool(home and (Path(home) / "bin" / "nvcc").is_file())


def _extension():
    try:
        from mobileops import _C
    except ImportError as exc:
        if _nvcc_here() and os.environ.get("MOBILEOPS_BUILD_CUDA") != "0":
            pytest.fail(f"nvcc is here, so the install must have built mobileops._C: {exc}")
        assert "not built" in backend.backend_status()["cuda"]
        pytest.skip(f"mobileops._C is not built on this machine (no nvcc): {exc}")
    return _C


def test_extension_imports_and_reports_devices():
    ext = _extension()
    assert ext.runtime_version() >= 12000
    count, message = ext.device_count()
    status = mobileops.backend_status()["cuda"]
    if CUDA:
        assert count >= 1 and message == "" and status is None
    else:
        assert count == 0
        assert status is not None and ("no CUDA device" in status or "no usable device" in status), status
        with pytest.raises(mobileops.BackendUnavailableError, match="cuda"):
            mobileops.set_backend("cuda")


def test_extension_implements_what_the_backend_registers():
    ext = _extension()
    assert sorted(ext.implemented_ops()) == backend.implemented_ops("cuda")
    assert set(backend.implemented_ops("cuda")) == {"bn_act", "dwconv_act", "dwconv_bn_act", "squeeze_excite"}


def _forward_args(**change):
    # A well-formed call except for what `change` breaks; nothing is launched when it raises.
    args = dict(dtype=0, k=3, act=2, norm=1, x=1, sx=(72, 9, 3, 1), w=2, gamma=3, beta=4, mean=5, var=6, eps=1e-5,
                y=7, sy=(72, 9, 3, 1), shape=[2, 8, 3, 3, 3, 3, 1, 1], channels_last=False, stream=0)
    args.update(change)
    return list(args.values())


@pytest.mark.parametrize("change, match", [
    (dict(dtype=7), "dtype code"),
    (dict(act=9), "activation code"),
    (dict(norm=5), "norm code"),
    (dict(k=4), "kernel size must be 3, 5 or 7"),
    (dict(shape=[2, 8, 3, 3, 2, 3, 1, 1]), "output size does not match"),
    (dict(shape=[2, 8, 3, 3, 3, 3, 0, 1]), "stride must be >= 1"),
    (dict(shape=[2, 70000, 3, 3, 3, 3, 1, 1]), "at most 65535 channels"),
    (dict(x=0), "must be given"),
    (dict(mean=0), "mean and var"),
    (dict(eps=-1.0), "eps must be >= 0"),
])
def test_binding_checks_every_argument(change, match):
    ext = _extension()
    with pytest.raises(ValueError, match=match):
        ext.dwconv_bn_act_forward(*_forward_args(**change))


def test_binding_checks_statistics_backward_and_se_arguments():
    ext = _extension()
    shape = [1, 4, 1, 1, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="at least 2 values per channel"):
        ext.dwconv_bn_stats(0, 3, 1, (4, 1, 1, 1), 2, shape, 1, 1, 3, 4, 5, 6, 7, 0, 0, 0.1, 1e-5, False, 0)
    with pytest.raises(ValueError, match="chunks must tile"):
        ext.dwconv_bn_stats(0, 3, 1, (36, 9, 3, 1), 2, [1, 4, 3, 3, 3, 3, 1, 1], 4, 1, 3, 4, 5, 6, 7, 0, 0, 0.1,
                            1e-5, False, 0)
    with pytest.raises(ValueError, match="running_mean and running_var come together"):
        ext.dwconv_bn_stats(0, 3, 1, (36, 9, 3, 1), 2, [1, 4, 3, 3, 3, 3, 1, 1], 9, 1, 3, 4, 5, 6, 7, 8, 0, 0.1,
                            1e-5, False, 0)
    strides = (36, 9, 3, 1)
    with pytest.raises(ValueError, match="weight-gradient buffers come together"):
        ext.dwconv_bn_act_backward(0, 3, 0, 1, 1, strides, 2, strides, 3, 0, 0, 4, 5, 1e-5, [1, 4, 3, 3, 3, 3, 1, 1],
                                   9, 1, 6, 7, 8, 9, 10, strides, 11, 0, 12, strides, False, 0)
    with pytest.raises(ValueError, match="gate code"):
        ext.squeeze_excite_forward(0, 2, 0, 1, strides, [1, 4, 3, 3], 2, 2, 0, 3, 0, 4, 5, 6, strides, False, 0)
    with pytest.raises(ValueError, match="shared memory"):
        ext.squeeze_excite_forward(0, 5, 0, 1, strides, [1, 8000, 3, 3], 2000, 2, 0, 3, 0, 4, 5, 6, strides, False, 0)
    with pytest.raises(ValueError, match="a bias and its gradient"):
        ext.squeeze_excite_backward(0, 5, 0, 1, strides, 2, strides, [1, 4, 3, 3], 2, 3, 4, 5, 0, 6, 7, 8, 9, 10, 11,
                                    12, 13, 0, 14, 0, 15, strides, False, 0)


def test_launchers_refuse_cpu_tensors_and_bad_arguments():
    from mobileops.cuda import dwconv_bn_act as dw
    from mobileops.cuda import squeeze_excite as se

    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(ValueError, match="must be on a CUDA device"):
        dw.forward(x, torch.randn(4, 1, 3, 3), None, None, None, None, out=torch.empty_like(x), stride=1, padding=1,
                   activation="relu", norm="none", eps=0.0)
    with pytest.raises(ValueError, match="must be on a CUDA device"):
        se.forward(x, torch.randn(2, 4), None, torch.randn(4, 2), None, out=torch.empty_like(x), gate="hsigmoid",
                   post_act="none")
    with pytest.raises(TypeError, match="unsupported dtype"):
        dw.batch_stats(x.to(torch.int32), None, None, None, stride=1, padding=0, momentum=0.1, eps=1e-5)
