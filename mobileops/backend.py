"""Backend registry: which implementation (torch, triton, cuda) runs each fused op.

Selection, from strongest to weakest: :func:`use_backend` (a context manager),
:func:`set_backend`, the environment variable ``MOBILEOPS_BACKEND``, then ``"auto"``.
``auto`` picks, per call, the backend measured fastest for it that is available and
implements the op, and never fails: see :func:`auto_order` (on CUDA tensors the fused kernels
only for inference on very large tensors or under CUDA-graph capture; torch otherwise). An
explicitly requested backend that cannot run raises :class:`BackendUnavailableError` saying
why; it never falls back silently.

The selection is process-wide (a plain module global, so ``torch.compile`` can trace it).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch


class Backend(NamedTuple):
    """One backend: its name, the device types its kernels take (empty: any), and the package
    that holds one launcher module per fused op (None: the ops' own torch code)."""

    name: str
    device_types: tuple[str, ...]
    launcher_package: str | None


#: Every backend, by name: the one place backend names are defined.
REGISTRY: dict[str, Backend] = {b.name: b for b in (
    Backend("torch", (), None),  # no limit: whatever device PyTorch itself runs on
    # CPU (and meta) tensors only under TRITON_INTERPRET=1, Triton's interpreter (tests): _find_problem
    Backend("triton", ("cuda",), "mobileops.kernels"),
    Backend("cuda", ("cuda",), "mobileops.cuda"),
)}
BACKENDS = tuple(REGISTRY)
CHOICES = ("auto",) + BACKENDS

#: Ops for which ``auto`` tries the CUDA extension before Triton on CUDA tensors. It stays empty
#: until a GPU benchmark (``pytest benchmarks``) has shown the extension faster; the entry then
#: names the device it was measured on. An explicit ``set_backend("cuda")`` works regardless.
AUTO_PREFERS_CUDA: dict[str, str] = {}

#: Inference calls on CUDA tensors with at least this many elements take the fused kernels
#: under ``auto``. Measured on an H100 (benchmarks/results/nvidia-h100-80gb-hbm3-2026-11-22.json,
#: fp16, batch 32, channels_last): Triton dwconv_bn_act / bn_act inference ran 2.0x / 3.2x
#: faster than eager at 210M elements, but slower at 1.6M to 52M, where each call's host time
#: (about 0.15-0.3 ms there) exceeds the kernel time saved; every training-mode case was slower.
AUTO_KERNEL_MIN_ELEMENTS = 2 ** 27
ENV_VAR = "MOBILEOPS_BACKEND"

_impls: dict[str, dict[str, Callable]] = {}
_selected: str | None = None
_override_stack: list[str] = []
_recorders: list[list[dict]] = []
# MOBILEOPS_BACKEND as read at the first op call (reading the environment costs microseconds).
_env_choice: str | None = None
# (backend, device type or None, TRITON_INTERPRET) -> the reason the backend cannot run, or None.
_problems: dict[tuple, str | None] = {}
# Every op's call plans (mobileops.ops._plan): they hold a backend choice, so they go together.
_plan_caches: list[dict] = []


def plan_cache() -> dict:
    """A new, empty cache of call plans that :func:`forget_choices` clears (one per op)."""
    cache: dict = {}
    _plan_caches.append(cache)
    return cache


def forget_choices() -> None:
    """Forget every decision cached from the environment: the ``MOBILEOPS_BACKEND`` and
    ``MOBILEOPS_AUTOTUNE`` values, each backend's availability and every op's call plans
    (validated arguments, chosen implementation). Call it after changing what those depend on
    within a process (setting ``MOBILEOPS_BACKEND``, ``MOBILEOPS_AUTOTUNE`` or
    ``TRITON_INTERPRET``, building the CUDA extension); selecting a
    backend with :func:`set_backend` or :func:`use_backend` needs no call."""
    global _env_choice
    _env_choice = None
    _problems.clear()
    for cached in (_import_error, _cuda_extension_status):
        if hasattr(cached, "cache_clear"):  # tests replace them with plain functions
            cached.cache_clear()
    for cache in _plan_caches:
        cache.clear()


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run the requested op here."""


def _check_choice(name, source: str) -> str:
    if not isinstance(name, str) or name.strip().lower() not in CHOICES:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {', '.join(CHOICES)}")
    return name.strip().lower()


def register_impl(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator registering ``fn`` as ``backend``'s implementation of the fused op ``op``.
    ``fn`` may be a :class:`mobileops.ops._plan.Implementation`, which call plans bind to
    each call signature they can."""
    _check_choice(backend, "register_impl")
    if backend == "auto":
        raise ValueError("register_impl: 'auto' is not a backend")

    def decorate(fn: Callable) -> Callable:
        _impls.setdefault(op, {})[backend] = fn
        forget_choices()  # a plan may hold the implementation this one replaces
        return fn

    return decorate


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _import_error(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as exc:  # any import failure makes the backend unavailable
        return f"{type(exc).__name__}: {exc}"
    return None


# Asked on every op call: the answer (extension loads, runtime sees a device) is fixed for the
# life of the process, and asking the runtime each time costs host time.
@functools.cache
def _cuda_extension_status() -> str | None:
    err = _import_error("mobileops._C")
    if err is not None:
        return f"the CUDA extension mobileops._C is not built or does not load ({err})"
    from mobileops import _C  # type: ignore[attr-defined]

    count, message = _C.device_count()
    if message:
        return f"the CUDA runtime reports no usable device ({message})"
    if count == 0:
        return "no CUDA device"
    if not _C.implemented_ops():
        return "the CUDA extension was built without kernels (rebuild it: python -m mobileops build)"
    return None


# torch.compile evaluates this once while tracing and keeps the answer (it imports modules and
# asks the CUDA runtime, which cannot be traced).
@torch.compiler.assume_constant_result
def _backend_problem(backend: str, device: torch.device | None) -> str | None:
    """Why ``backend`` cannot run on ``device`` (None: on any device here), or None. Asked once
    per (backend, device type, ``TRITON_INTERPRET``) until :func:`forget_choices`."""
    key = (backend, None if device is None else device.type, os.environ.get("TRITON_INTERPRET"))
    if key not in _problems:
        _problems[key] = _find_problem(backend, device)
    return _problems[key]


def _find_problem(backend: str, device: torch.device | None) -> str | None:
    if backend == "torch":
        return None
    if backend == "triton":
        err = _import_error("triton")
        if err is not None:
            return f"triton is not importable ({err})"
        on_cuda = torch.cuda.is_available() if device is None else device.type in REGISTRY["triton"].device_types
        if not on_cuda and not _interpreter_on():
            if device is not None and device.type != "cpu":
                return f"triton kernels cannot run on {device.type} tensors"
            return "no CUDA device; set TRITON_INTERPRET=1 to run it on the CPU for testing"
    if backend == "cuda":
        problem = _cuda_extension_status()
        if problem is not None:
            return problem
        if device is not None and device.type not in REGISTRY["cuda"].device_types:
            return f"the CUDA extension cannot run on {device.type} tensors"
    if not any(backend in table for table in _impls.values()):
        return "no fused op is implemented by this backend yet"
    return None


def launcher_loader(backend: str, op: str) -> Callable[[], Any]:
    """A function importing the launcher module of ``op`` on ``backend`` on first call (Triton
    decides at kernel-definition time whether to interpret, so nothing is imported early)."""
    name = f"{REGISTRY[backend].launcher_package}.{op}"

    @functools.cache  # import_module itself costs microseconds on every call
    def load():
        return importlib.import_module(name)

    return load


def backend_status() -> dict[str, str | None]:
    """Map each backend name to None if it is available here, else the reason it is not."""
    return {name: _backend_problem(name, None) for name in BACKENDS}


def implemented_ops(backend: str) -> list[str]:
    """Names of the fused ops that ``backend`` implements (available here or not)."""
    backend = _check_choice(backend, "implemented_ops")
    return sorted(op for op, table in _impls.items() if backend in table)


def available_backends() -> list[str]:
    """Names of the backends that can run at least one op on this machine."""
    return [name for name, problem in backend_status().items() if problem is None]


def get_backend() -> str:
    """The backend name currently selected (possibly ``"auto"``)."""
    if _override_stack:
        return _override_stack[-1]
    if _selected is not None:
        return _selected
    global _env_choice
    if _env_choice is None:
        _env_choice = _check_choice(os.environ.get(ENV_VAR, "auto") or "auto", f"environment variable {ENV_VAR}")
    return _env_choice


def set_backend(name: str) -> None:
    """Select the backend for every fused op, process-wide.

    Args:
        name: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"``.

    Raises:
        ValueError: for an unknown name.
        BackendUnavailableError: if the backend cannot run on this machine at all.
    """
    global _selected
    name = _check_choice(name, "set_backend")
    if name != "auto":
        problem = _backend_problem(name, None)
        if problem is not None:
            raise BackendUnavailableError(f"{name}: {problem}")
    _selected = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Context manager selecting a backend for the ops run inside it (see :func:`set_backend`)."""
    name = _check_choice(name, "use_backend")
    if name != "auto":
        problem = _backend_problem(name, None)
        if problem is not None:
            raise BackendUnavailableError(f"{name}: {problem}")
    _override_stack.append(name)
    try:
        yield name
    finally:
        _override_stack.pop()


@contextlib.contextmanager
def record_calls() -> Iterator[list[dict]]:
    """Record every fused-op call made inside the ``with`` block, e.g. to list the real layer
    shapes of a model (run it on the meta device: nothing is computed then).

    Yields a list that fills with one dict per call: ``op``, ``backend`` (the implementation
    that ran), ``inputs`` (``(shape, dtype)`` of each tensor argument, None for absent ones)
    and ``options`` (the keyword arguments: stride, activation, training...).
    """
    calls: list[dict] = []
    _recorders.append(calls)
    try:
        yield calls
    finally:
        _recorders.remove(calls)


def _recorded(op: str, name: str, impl: Callable) -> Callable:
    def run(*args, **kwargs):
        entry = dict(op=op, backend=name, options=dict(kwargs),
                     inputs=[(tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else None for a in args])
        for calls in _recorders:
            calls.append(entry)
        return impl(*args, **kwargs)

    return run


def resolve(op: str, device: torch.device, *, inference: bool = False, numel: int | None = None) -> Callable:
    """Return the implementation of ``op`` for tensors on ``device`` under the current selection.

    ``inference`` (no gradient needed, BatchNorm not in training mode) and ``numel`` (the
    input's element count) inform ``auto``'s choice (:func:`auto_order`); an explicit backend
    ignores them. An empty input (``numel == 0``) never reaches a kernel: once the selection
    is checked, the torch composition produces the empty output, as PyTorch would, with no
    launch and the running statistics untouched. While exporting (:func:`exporting`) every op
    records the torch composition too, so exported graphs hold standard operators only."""
    name, impl = _resolve(op, device, inference, numel or 0)
    if name != "torch" and (numel == 0 or exporting()):
        name, impl = "torch", _impls[op]["torch"]
    return _recorded(op, name, impl) if _recorders else impl


def exporting() -> bool:
    """Whether an ONNX export (either exporter) or ``torch.jit.trace`` is recording the call.

    Both record standard operators only: a kernel launch is invisible to a TorchScript trace
    (it would bake the output in as a constant) and ONNX has no fused ops, so the selected
    backend gives way to the torch composition, whose results agree within the dtype's bound.
    ``torch.compile`` and ``torch.export`` are not exporting in this sense: they trace the fused
    ops as custom ops."""
    return torch._C._get_tracing_state() is not None or _onnx_exporting()


def _onnx_flags():
    # torch.onnx.is_in_onnx_export imports two modules on every call (3-4 us); read the flags it
    # reads directly where this torch has them where they were found (torch 2.11-2.13).
    try:
        from torch.onnx._internal.exporter import _flags
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except ImportError:
        return None
    if not (hasattr(_flags, "_is_onnx_exporting") and hasattr(GLOBALS, "in_onnx_export")):
        return None
    return _flags, GLOBALS


def _onnx_exporting() -> bool:
    flags = _ONNX_FLAGS
    # Dynamo refuses to trace the flags' module but knows is_in_onnx_export itself.
    if flags is None or torch.compiler.is_compiling():
        return torch.onnx.is_in_onnx_export()
    return flags[1].in_onnx_export or flags[0]._is_onnx_exporting


_ONNX_FLAGS = _onnx_flags()


def _capturing(device: torch.device) -> bool:
    if device.type != "cuda" or torch.compiler.is_compiling():
        return False
    return torch.cuda.is_current_stream_capturing()


def auto_order(op: str, device: torch.device, *, inference: bool, numel: int) -> tuple:
    """The backends ``auto`` tries, in order, for one call.

    CPU (and other) tensors: torch. CUDA tensors: the fused kernels (cuda first where listed in
    :data:`AUTO_PREFERS_CUDA`, then triton) for inference calls under CUDA-graph capture, where a
    replay carries no per-call host cost (yolov5n-c3uib batch 1: 1.34x over BN-folded eager on an
    H100), or on at least :data:`AUTO_KERNEL_MIN_ELEMENTS` elements; torch for everything else,
    training included, where the measured kernels were slower. Results agree within the dtype's
    bound whichever runs.
    """
    if device.type != "cuda":
        return ("torch",)
    if inference and (numel >= AUTO_KERNEL_MIN_ELEMENTS or _capturing(device)):
        return (("cuda",) if op in AUTO_PREFERS_CUDA else ()) + ("triton", "torch")
    return ("torch",)


def _resolve(op: str, device: torch.device, inference: bool = False, numel: int = 0):
    table = _impls.get(op, {})
    name = get_backend()
    if name == "auto":
        for backend in auto_order(op, device, inference=inference, numel=numel):
            if backend in table and _backend_problem(backend, device) is None:
                return backend, table[backend]
        raise BackendUnavailableError(f"{op}: no backend implements it for {device.type} tensors")
    problem = _backend_problem(name, device)
    if problem is not None:
        raise BackendUnavailableError(f"{op}: backend {name!r} is unavailable: {problem}")
    if name not in table:
        raise BackendUnavailableError(
            f"{op}: backend {name!r} does not implement this op (implemented by: {', '.join(table) or 'none'})")
    return name, table[name]
