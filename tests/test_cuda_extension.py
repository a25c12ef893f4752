"""The CUDA extension mobileops._C: it is built wherever nvcc is (CI included), imports without
a GPU and says so, and its launch functions take named arguments only and check every argument
before a launch (on the built extension and on the emulated build of csrc/). GPU parity of the
cuda backend is in test_ops.py (every runnable backend) and test_cuda_backend.py."""

import os
import re
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


# A well-formed call of each launch function, with made-up addresses: every test below breaks
# one argument, so the binding refuses the call before anything is launched (in the emulated
# build a launch would dereference these addresses).
_S = (36, 9, 3, 1)
_CALLS = {
    "dwconv_bn_act_forward": dict(
        dtype=0, kernel_size=3, activation=2, norm=1, x=1, x_strides=_S, x_shape=(1, 4, 3, 3), stride=1, padding=1,
        weight=2, gamma=3, beta=4, mean=5, var=6, eps=1e-5, y=7, y_strides=_S, y_shape=(1, 4, 3, 3),
        channels_last=False, stream=0),
    "dwconv_bn_stats": dict(
        dtype=0, kernel_size=3, x=1, x_strides=_S, x_shape=(1, 4, 3, 3), stride=1, padding=1, weight=2, chunk=9,
        chunks=1, part_count=3, part_mean=4, part_m2=5, mean=6, rstd=7, running_mean=8, running_var=9,
        momentum=0.1, eps=1e-5, channels_last=False, stream=0),
    "dwconv_bn_act_backward": dict(
        dtype=0, kernel_size=3, activation=0, norm=1, dy=1, dy_strides=_S, dy_shape=(1, 4, 3, 3), x=2,
        x_strides=_S, x_shape=(1, 4, 3, 3), stride=1, padding=1, weight=3, gamma=0, beta=0, mean=4, var=5,
        eps=1e-5, chunk=9, chunks=1, part_du=6, part_dux=7, sum_du=8, sum_dux=9, dz=10, dz_strides=_S, part_dw=11,
        dw=12, dx=13, dx_strides=_S, channels_last=False, stream=0),
    "squeeze_excite_forward": dict(
        dtype=0, gate=5, post_act=0, x=1, x_strides=_S, x_shape=(1, 4, 3, 3), hidden=2, w1=2, b1=0, w2=3, b2=0,
        chunk=9, chunks=1, part=0, pooled=4, gates=5, y=6, y_strides=_S, channels_last=False, stream=0),
    "squeeze_excite_backward": dict(
        dtype=0, gate=5, post_act=0, dy=1, dy_strides=_S, x=2, x_strides=_S, x_shape=(1, 4, 3, 3), hidden=2, w1=3,
        b1=4, w2=5, b2=0, chunk=9, chunks=1, part=0, pooled=6, gates=7, d_gate=8, d_pre_gate=9, hidden_act=10,
        d_pre_hidden=11, d_pooled=12,
        dw1=13, db1=14, dw2=15, db2=0, dx=16, dx_strides=_S, channels_last=False, stream=0),
}
_OPS = {"dwconv_bn_act_forward": "dwconv_bn_act forward", "dwconv_bn_stats": "dwconv_bn_act batch statistics",
        "dwconv_bn_act_backward": "dwconv_bn_act backward", "squeeze_excite_forward": "squeeze_excite forward",
        "squeeze_excite_backward": "squeeze_excite backward"}


@pytest.fixture(params=["built", "emulated"])
def binding(request):
    """The launch functions of the built mobileops._C (where nvcc built it) and of the emulated
    build of csrc/ (everywhere): both are csrc/binding.cpp, whose checks run before a launch."""
    if request.param == "built":
        return _extension()
    return request.getfixturevalue("emulated_extension")


# (function, the arguments that break the call, what the message must say); the message starts
# with the op and names the argument at fault.
REFUSED = [
    ("dwconv_bn_act_forward", dict(dtype=7), r"dtype must be a code in 0\.\.3, got 7"),
    ("dwconv_bn_act_forward", dict(activation=9), r"activation must be a code in 0\.\.5, got 9"),
    ("dwconv_bn_act_forward", dict(activation=6), r"activation must be a code in 0\.\.5, got 6"),
    ("dwconv_bn_act_forward", dict(norm=5), r"norm must be a code in 0\.\.2, got 5"),
    ("dwconv_bn_act_forward", dict(kernel_size=4), r"kernel_size must be 3, 5 or 7 \(0: no conv\), got 4"),
    ("dwconv_bn_act_forward", dict(kernel_size=7), r"a 7x7 kernel does not fit x_shape \(1, 4, 3, 3\) with padding 1"),
    ("dwconv_bn_act_forward", dict(kernel_size=0), r"without a conv \(kernel_size 0\) stride must be 1 and padding 0"),
    ("dwconv_bn_act_forward", dict(y_shape=(1, 4, 2, 3)), r"y_shape must be \(1, 4, 3, 3\) for x_shape"),
    ("dwconv_bn_act_forward", dict(stride=0), r"stride must be >= 1, got 0"),
    ("dwconv_bn_act_forward", dict(padding=-1), r"padding must be in \[0, 2\*\*29\), got -1"),
    ("dwconv_bn_act_forward", dict(x_shape=(1, 70000, 3, 3), y_shape=(1, 70000, 3, 3)),
     r"x_shape\[1\] \(channels\) must be at most 65535"),
    ("dwconv_bn_act_forward", dict(x_shape=(1, 4, 2 ** 31, 3)), r"x_shape\[2\] must be in \[0, 2\*\*31\)"),
    ("dwconv_bn_act_forward", dict(x_strides=(36, -9, 3, 1)), r"x_strides\[1\] must be >= 0, got -9"),
    ("dwconv_bn_act_forward", dict(y_strides=(36, 0, 3, 1)), r"y_strides\[1\] is 0 on a written tensor of size 4"),
    ("dwconv_bn_act_forward", dict(x=0), r"x is required \(got a null pointer\)"),
    ("dwconv_bn_act_forward", dict(y=0), r"y is required"),
    ("dwconv_bn_act_forward", dict(weight=0), r"weight is required"),
    ("dwconv_bn_act_forward", dict(var=0), r"var is required"),
    ("dwconv_bn_act_forward", dict(eps=-1.0), r"eps must be >= 0"),
    ("dwconv_bn_stats", dict(dtype=-1), r"dtype must be a code in 0\.\.3, got -1"),
    ("dwconv_bn_stats", dict(kernel_size=9), r"kernel_size must be 3, 5 or 7"),
    ("dwconv_bn_stats", dict(x_shape=(1, 4, 1, 1), padding=0, kernel_size=0, stride=1),
     r"batch statistics need at least 2 values per channel, got 1"),
    ("dwconv_bn_stats", dict(chunk=4), r"chunks of chunk positions must tile the 9 positions exactly, got 1 x 4"),
    ("dwconv_bn_stats", dict(chunks=0), r"chunk and chunks must be >= 1"),
    ("dwconv_bn_stats", dict(running_var=0), r"running_mean and running_var must both be given or both be null"),
    ("dwconv_bn_stats", dict(part_m2=0), r"part_m2 is required"),
    ("dwconv_bn_stats", dict(momentum=1.5), r"momentum must be in \[0, 1\]"),
    ("dwconv_bn_act_backward", dict(activation=7), r"activation must be a code in 0\.\.5, got 7"),
    ("dwconv_bn_act_backward", dict(norm=3), r"norm must be a code in 0\.\.2, got 3"),
    ("dwconv_bn_act_backward", dict(kernel_size=1), r"kernel_size must be 3, 5 or 7"),
    ("dwconv_bn_act_backward", dict(dy_shape=(1, 4, 3, 2)), r"dy_shape must be \(1, 4, 3, 3\)"),
    ("dwconv_bn_act_backward", dict(dx_strides=(36, 9, 0, 1)), r"dx_strides\[2\] is 0 on a written tensor"),
    ("dwconv_bn_act_backward", dict(chunks=2),
     r"chunks of chunk positions must tile the 9 positions exactly, got 2 x 9"),
    ("dwconv_bn_act_backward", dict(dw=0), r"part_dw and dw must both be given or both be null"),
    ("dwconv_bn_act_backward", dict(dz=0), r"dz is required"),
    ("dwconv_bn_act_backward", dict(sum_dux=0), r"sum_dux is required"),
    ("squeeze_excite_forward", dict(dtype=4), r"dtype must be a code in 0\.\.3, got 4"),
    ("squeeze_excite_forward", dict(gate=2), r"gate must be the code of hsigmoid \(5\) or sigmoid \(6\), got 2"),
    ("squeeze_excite_forward", dict(post_act=6), r"post_act must be a code in 0\.\.5, got 6"),
    ("squeeze_excite_forward", dict(hidden=0), r"hidden must be >= 1, got 0"),
    ("squeeze_excite_forward", dict(x_shape=(1, 8000, 3, 3), hidden=2000),
     r"x_shape\[1\] \(channels, 8000\) \+ hidden \(2000\) too large for one block's shared memory"),
    ("squeeze_excite_forward", dict(w2=0), r"w2 is required"),
    ("squeeze_excite_backward", dict(gate=0), r"gate must be the code of hsigmoid"),
    ("squeeze_excite_backward", dict(db1=0), r"b1 and db1 must both be given or both be null"),
    ("squeeze_excite_backward", dict(db2=17), r"b2 and db2 must both be given or both be null"),
    ("squeeze_excite_backward", dict(d_pooled=0), r"d_pooled is required"),
    ("squeeze_excite_forward", dict(chunk=4),
     r"chunks of chunk positions must tile the 9 positions exactly, got 1 x 4"),
    ("squeeze_excite_forward", dict(chunk=3, chunks=3), r"part is required"),
    ("squeeze_excite_backward", dict(chunks=0), r"chunk and chunks must be >= 1"),
]


@pytest.mark.parametrize("function, change, match", REFUSED, ids=lambda v: v if isinstance(v, str) else None)
def test_binding_refuses_a_bad_argument_by_name(binding, function, change, match):
    with pytest.raises(ValueError, match=rf"^{_OPS[function]}: {match}"):
        getattr(binding, function)(**{**_CALLS[function], **change})


@pytest.mark.parametrize("function", _CALLS)
def test_binding_takes_named_arguments_only(binding, function):
    """A positional call, a missing keyword and an unknown one are refused before any check:
    the message names the function and lists every keyword it takes."""
    call = getattr(binding, function)
    signature = rf"(?s){function}\(\): incompatible function arguments.*\(\*, dtype: "
    with pytest.raises(TypeError, match=signature):
        call(*_CALLS[function].values())
    missing = {name: value for name, value in _CALLS[function].items() if name != "stream"}
    with pytest.raises(TypeError, match=signature) as refused:
        call(**missing)
    assert "stream: " in str(refused.value) and "stream=" not in str(refused.value)  # expected, not given
    with pytest.raises(TypeError, match=signature):
        call(**_CALLS[function], gama=3)
    assert set(_CALLS[function]) == set(re.findall(r"(\w+): ", call.__doc__.splitlines()[0]))
