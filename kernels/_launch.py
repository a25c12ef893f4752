"""Launching compiled Triton kernels without Triton's per-call Python path.

``kernel[grid](**kwargs)`` and ``autotuner[grid](**kwargs)`` spend 20-85 us of Python per launch
before Triton's C launcher runs (keyword binding, the specialization of every argument, the
kernel-cache key built from strings, the autotuner's key). Once a launch went through that
normal path, which compiles, autotunes and returns the ``CompiledKernel``, :func:`launch` keeps
what the launcher needs for that launch site and call shape, and later calls with the same shape
call the compiled kernel's launcher directly with the argument tuple Triton would pass
(as vLLM's cached kernels and PyTorch inductor's static launcher do).

What a compiled kernel assumed is part of the cache key, so a call only reuses a kernel compiled
for the same assumptions: Triton 3.6-3.9 specialise a tensor argument on its dtype and on
``data_ptr() % 16``, an integer on its value (equal to 1, a multiple of 16, i32/i64/u64), a float
on its type alone, and a constexpr on its value. The key holds each tensor's dtype and
alignment, each runtime float's type and each other argument's exact type and value, plus the
current driver, device, ``num_warps`` and the option knobs ``JITFunction.run`` reads on every
call. Anything else takes the normal path, which compiles the new specialization and fills the
cache: a kernel with ``pre_run_hooks``, a changed
global the kernel read, an argument of another kind, an autotuner whose tuning cache no longer
holds the chosen config, ``TRITON_INTERPRET=1`` (the kernels are then not ``JITFunction``), a
non-CUDA target, and any triton whose internals this module was not written against
(:data:`DISABLED_REASON`). Launch hooks are passed on as Triton passes them: the launcher calls
``knobs.runtime.launch_enter_hook`` / ``launch_exit_hook`` with the same launch metadata.

``MOBILEOPS_TRITON_FAST_LAUNCH=0`` (read at import) or ``enabled = False`` turns it off.
"""

from __future__ import annotations

import functools
import operator
import os

import torch
import triton

#: Triton releases whose runtime internals (JITFunction.run, Autotuner.run, CompiledKernel,
#: the CUDA launcher's argument list) this module mirrors; read in 3.6 and 3.9.
SUPPORTED_TRITON = ((3, 6), (3, 7), (3, 8), (3, 9))

# Cache entries per call layout before it is emptied: call shapes that never repeat (every
# image size different) must not grow memory without bound.
MAX_ENTRIES = 1024


def _disabled_reason() -> str | None:
    """Why this triton cannot use the fast path, or None."""
    try:
        version = tuple(int(part) for part in triton.__version__.split(".")[:2])
    except ValueError:
        return f"unrecognised triton version {triton.__version__!r}"
    if version not in SUPPORTED_TRITON:
        return f"triton {triton.__version__} is not one of the versions whose launch path this mirrors"
    try:
        from triton import knobs
        from triton.compiler.compiler import CompiledKernel
        from triton.runtime.autotuner import Autotuner, Config
        from triton.runtime.driver import driver
        from triton.runtime.jit import JITFunction
    except ImportError as exc:
        return f"triton's runtime moved: {exc}"
    needed = ((JITFunction, ("run", "create_binder")), (Autotuner, ("run", "prune_configs")),
              (Config, ("all_kwargs",)), (CompiledKernel, ("run", "launch_metadata", "_init_handles")),
              (knobs.runtime, ("launch_enter_hook", "launch_exit_hook", "debug")),
              (knobs.compilation, ("instrumentation_mode",)), (type(driver), ("active",)))
    for owner, names in needed:
        missing = [name for name in names if not hasattr(owner, name)]
        if missing:
            return f"triton's {getattr(owner, '__name__', type(owner).__name__)} lacks {', '.join(missing)}"
    # (type(driver): reading driver.active would create the driver, which fails without a GPU)
    return None


DISABLED_REASON = _disabled_reason()
enabled = DISABLED_REASON is None and os.environ.get("MOBILEOPS_TRITON_FAST_LAUNCH", "1") != "0"

if DISABLED_REASON is None:
    from triton import knobs
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    _RUNTIME = knobs.runtime
    _COMPILATION = knobs.compilation
    # JITFunction.run adds these knobs to the compile options on every call (3.9 added the
    # fpsan one); their values are part of the key.
    _FPSAN = hasattr(_COMPILATION, "fpsan_homomorphic_casts")
    _STAGES_HOOK = hasattr(_RUNTIME, "add_stages_inspection_hook")

# Types whose specialization the key captures exactly: a scalar by its exact type and value,
# a tensor by dtype and alignment. Any other argument type keeps its launch site on Triton's path.
_SCALARS = (int, float, bool, type(None), str)

_DATA_PTR = torch.Tensor.data_ptr  # raises TypeError for a non-tensor
_DTYPE = operator.attrgetter("dtype")


def _getter(keys: list):
    """A function returning the tuple of ``v[k]`` for ``keys`` (itemgetter returns a bare
    item for one key and cannot take none)."""
    if len(keys) > 1:
        return operator.itemgetter(*keys)
    if keys:
        key = keys[0]
        return lambda v: (v[key],)
    return lambda v: ()


class _Layout:
    """The calls of one site with tensors at the same positions and the same types elsewhere,
    and their cache entries."""

    __slots__ = ("tensors", "scalars", "scalar_types", "keyed", "entries")

    def __init__(self, vals: tuple, unkeyed: frozenset):
        self.tensors = _getter([i for i, v in enumerate(vals) if isinstance(v, torch.Tensor)])
        scalars = [i for i, v in enumerate(vals) if not isinstance(v, torch.Tensor)]
        self.scalars = _getter(scalars)
        self.scalar_types = tuple(map(type, self.scalars(vals)))
        # Triton specialises a runtime float on its type alone ("fp32"): keying its value would
        # miss the cache whenever it changes (BN momentum 1/num_batches_tracked, every step).
        keyed = [i for i in scalars if not (type(vals[i]) is float and i in unkeyed)]
        self.keyed = _getter(keyed)
        self.entries: dict = {}

    def allowed(self) -> bool:
        return all(t in _SCALARS or issubclass(t, triton.language.dtype) for t in self.scalar_types)

    def key(self, vals: tuple, extra: tuple):
        """The cache key of ``vals``, None when they do not fit this layout. Raises TypeError
        for a non-tensor where this layout has a tensor."""
        scalars = self.scalars(vals)
        if tuple(map(type, scalars)) != self.scalar_types:
            return None
        tensors = self.tensors(vals)
        return extra, tuple(map(_DTYPE, tensors)), _alignment(tensors), self.keyed(vals)


def _alignment(tensors: tuple):
    """What Triton's tensor specialization records of ``tensors``' addresses (data_ptr() % 16 == 0,
    per pointer): True when all are aligned, the common case and one test, else a flag each."""
    pointers = tuple(map(_DATA_PTR, tensors))
    return True if not functools.reduce(operator.or_, pointers, 0) & 15 else tuple(p % 16 == 0 for p in pointers)


class _Site:
    """What one JITFunction (fixed configuration) or Autotuner needs for direct launches."""

    __slots__ = ("owner", "fn", "usable", "names", "getter", "arg_names", "arg_getter", "layouts", "global_checks")

    def __init__(self, owner, fn, arg_names: list[str] | None, usable: bool):
        self.owner = owner
        self.fn = fn
        self.usable = usable
        self.names = list(fn.arg_names) if usable else []
        self.getter = _getter(self.names)
        # Autotuned sites: the arguments the caller passes (all but the configs' meta-parameters)
        self.arg_names = arg_names
        self.arg_getter = _getter(arg_names) if arg_names is not None else None
        self.layouts: list[_Layout] = []  # almost always one
        self.global_checks: tuple = ()

    def snapshot_globals(self) -> None:
        """Record what the globals the kernel read hold now (the normal path has just checked
        their values): per globals dict, a getter of those names and their values. A later
        call that finds other values takes the normal path, which raises as Triton does."""
        by_dict: dict = {}
        for (name, _), (_, d) in self.fn.used_global_vals.items():
            by_dict.setdefault(id(d), (d, []))[1].append(name)
        checks = []
        for d, names in by_dict.values():
            get = _getter(names)
            checks.append((get, d, get(d)))
        self.global_checks = tuple(checks)

    def lookup(self, vals: tuple, extra: tuple):
        """The cache entry for these arguments, or None."""
        for layout in self.layouts:
            key = layout.key(vals, extra)
            if key is not None:
                return layout.entries.get(key)
        return None

    def globals_unchanged(self) -> bool:
        for get, d, values in self.global_checks:
            if get(d) != values:
                return False
        return True


# id(JITFunction or Autotuner) -> _Site; the site keeps its owner, so a reused id is noticed.
_SITES: dict = {}


def _knob_state(fn) -> tuple:
    """The options JITFunction.run reads on every call and compiles into the kernel."""
    return (fn.debug or _RUNTIME.debug, _COMPILATION.instrumentation_mode,
            _COMPILATION.fpsan_homomorphic_casts if _FPSAN else None)


def _extra_key(fn, drv, device, warps) -> tuple:
    """Everything besides the arguments that selects the compiled kernel: the driver and
    device (Triton's kernel cache is per device), ``num_warps`` (fixed configurations) and the
    knobs of :func:`_knob_state`."""
    return (drv, device, warps, *_knob_state(fn))


def _hooks_block(fn) -> bool:
    """True when something must see every call through Triton's own path."""
    return bool(fn.pre_run_hooks) or (_STAGES_HOOK and _RUNTIME.add_stages_inspection_hook is not None)


def _run(fn, target, drv, device, grid, vals) -> None:
    """The launch JITFunction.run makes, from the resolved grid and the bound arguments;
    ``target`` is (launcher, function handle, packed metadata, launch_metadata method)."""
    launcher, function, packed, launch_metadata = target
    stream = drv.get_current_stream(device)
    size = len(grid)
    enter_hook = _RUNTIME.launch_enter_hook
    # CompiledKernel.launch_metadata is None without an enter hook (it checks first), and reads
    # the arguments only for the kernel's own launch_metadata function: skip what it would skip.
    if enter_hook is None:
        metadata = None
    else:
        metadata = launch_metadata(grid, stream) if fn.launch_metadata is None else launch_metadata(grid, stream,
                                                                                                   *vals)
    launcher(grid[0], grid[1] if size > 1 else 1, grid[2] if size > 2 else 1, stream, function, packed, metadata,
             enter_hook, _RUNTIME.launch_exit_hook, *vals)


# What a cache lookup may raise for arguments unlike the ones the layout was built from
# (a missing name, an unhashable value, a non-tensor where a tensor was); they go the normal way.
_LOOKUP_ERRORS = (KeyError, TypeError, AttributeError, RuntimeError)


def _fixed_fast(kernel, grid, merged: dict, warps) -> bool:
    site = _SITES.get(id(kernel))
    if site is None or site.owner is not kernel or not site.usable or _hooks_block(kernel):
        return False
    try:
        vals = site.getter(merged)
        if len(merged) != len(vals):
            return False
        drv = driver.active
        device = drv.get_current_device()
        target = site.lookup(vals, _extra_key(kernel, drv, device, warps))
        if target is None or not site.globals_unchanged():
            return False
    except _LOOKUP_ERRORS:
        return False
    _run(kernel, target, drv, device, grid, vals)
    return True


def _tuned_fast(tuned, grid_of, args: dict) -> bool:
    site = _SITES.get(id(tuned))
    if site is None or site.owner is not tuned or not site.usable or _hooks_block(site.fn):
        return False
    try:
        avals = site.arg_getter(args)
        if len(args) != len(avals):
            return False
        drv = driver.active
        device = drv.get_current_device()
        entry = site.lookup(avals, _extra_key(site.fn, drv, device, None))
        if entry is None:
            return False
        tune_key, config, config_kwargs, target = entry
        # re-tuned, or the tuning cache cleared: Autotuner.run decides again
        if tuned.cache.get(tune_key) is not config or not site.globals_unchanged():
            return False
    except _LOOKUP_ERRORS:
        return False
    bound = args | config_kwargs  # Autotuner.run's grid argument: every parameter by name
    tuned.best_config = config
    _run(site.fn, target, drv, device, grid_of(bound), site.getter(bound))
    return True


# Instance attributes the fast path reads (set in __init__, so checked per object).
_JIT_ATTRS = ("device_caches", "arg_names", "used_global_vals", "pre_run_hooks", "debug", "launch_metadata")
_TUNER_ATTRS = ("cache", "keys", "arg_names", "configs", "best_config")
_COMPILED_ATTRS = ("function", "packed_metadata", "src")


def _site_for(owner, fn, arg_names, compiled) -> _Site | None:
    site = _SITES.get(id(owner))
    if site is None or site.owner is not owner:
        device = driver.active.get_current_device()
        usable = (all(hasattr(fn, a) for a in _JIT_ATTRS) and all(hasattr(compiled, a) for a in _COMPILED_ATTRS)
                  and (owner is fn or all(hasattr(owner, a) for a in _TUNER_ATTRS))
                  # the specialization rules mirrored are CUDA's
                  and getattr(fn.device_caches[device][2], "backend", None) == "cuda")
        site = _SITES[id(owner)] = _Site(owner, fn, arg_names, usable)
    return site if site.usable else None


def _assumptions_match(compiled, vals) -> bool:
    """The kernel the normal path returned was compiled for these arguments with exactly the
    tensor assumptions the key records (16-byte alignment or none): anything else (another
    attribute, another rule) means this triton specialises on something the key misses."""
    attrs = getattr(compiled.src, "attrs", None)
    if not isinstance(attrs, dict):
        return False
    for i, value in enumerate(vals):
        if isinstance(value, torch.Tensor):
            want = [["tt.divisibility", 16]] if value.data_ptr() % 16 == 0 else []
            if attrs.get((i,), []) != want:
                return False
    return True


def _target(compiled) -> tuple:
    # compiled.run is the launcher once the first launch loaded the kernel
    return compiled.run, compiled.function, compiled.packed_metadata, compiled.launch_metadata


def _remember(site: _Site, key_vals: tuple, extra: tuple, entry) -> None:
    key = None
    for layout in site.layouts:
        key = layout.key(key_vals, extra)
        if key is not None:
            break
    if key is None:
        names = site.arg_names if site.arg_names is not None else site.names
        runtime = {param.name for param in site.fn.params if not param.is_constexpr}
        layout = _Layout(key_vals, frozenset(i for i, name in enumerate(names) if name in runtime))
        if not layout.allowed():
            return
        site.layouts.append(layout)
        key = layout.key(key_vals, extra)
    if len(layout.entries) >= MAX_ENTRIES:
        layout.entries.clear()
    layout.entries[key] = entry
    site.snapshot_globals()


def _remember_fixed(kernel, compiled, merged: dict, warps) -> None:
    if not isinstance(compiled, CompiledKernel) or _hooks_block(kernel):
        return
    site = _site_for(kernel, kernel, None, compiled)
    if site is None or set(merged) != set(site.names):
        return
    vals = site.getter(merged)
    if not _assumptions_match(compiled, vals):
        site.usable = False
        return
    drv = driver.active
    _remember(site, vals, _extra_key(kernel, drv, drv.get_current_device(), warps), _target(compiled))


def _tune_key(tuned, args: dict) -> tuple:
    """Autotuner.run's key for keyword-only arguments: the key arguments' values, then the
    dtype of every argument that has one."""
    named = {k: v for k, v in args.items() if k in tuned.arg_names}
    key = [named[k] for k in tuned.keys if k in named]
    key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
    return tuple(key)


def _remember_tuned(tuned, compiled, args: dict) -> None:
    fn = tuned.fn
    config = getattr(tuned, "best_config", None)
    # One config is used without the tuning cache; a config's pre_hook must run on every call.
    if (not isinstance(compiled, CompiledKernel) or config is None or config.pre_hook is not None
            or len(tuned.configs) < 2 or _hooks_block(fn)):
        return
    tune_key = _tune_key(tuned, args)
    if any(isinstance(v, torch.Tensor) for v in tune_key):  # a tensor in the key counts by identity
        return
    # The tuning cache must hold this config under the key computed here: this checks the
    # mirror of Autotuner.run's key against the autotuner itself.
    if tuned.cache.get(tune_key) is not config:
        return
    site = _site_for(tuned, fn, list(args), compiled)
    if site is None or set(site.arg_names) != set(args):
        return
    config_kwargs = dict(config.kwargs)
    bound = args | config_kwargs
    if set(bound) != set(site.names) or len(bound) != len(site.names):
        return
    if not _assumptions_match(compiled, site.getter(bound)):
        site.usable = False
        return
    drv = driver.active
    _remember(site, site.arg_getter(args), _extra_key(fn, drv, drv.get_current_device(), None),
              (tune_key, config, config_kwargs, _target(compiled)))


def launch(kernel, tuned, grid_of, args: dict, meta: dict | None) -> None:
    """Launch ``kernel`` with the fixed ``meta`` (``num_warps`` included), or through the
    autotuner ``tuned`` when ``meta`` is None; ``grid_of(meta)`` maps the meta-parameters to
    the grid. Calls the compiled kernel's launcher directly when an earlier call of the same
    shape went through Triton's normal path, which every other call takes."""
    fast = enabled and DISABLED_REASON is None  # enabled may be set by hand on a triton that lacks the internals
    if meta is not None:
        meta = dict(meta)
        warps = meta.pop("num_warps", 4)
        grid = grid_of(meta)
        if not fast or not isinstance(kernel, JITFunction):
            kernel[grid](**args, **meta, num_warps=warps)
            return
        merged = args | meta
        if _fixed_fast(kernel, grid, merged, warps):
            return
        compiled = kernel[grid](**args, **meta, num_warps=warps)
        _remember_fixed(kernel, compiled, merged, warps)
        return
    if not fast or not isinstance(tuned, Autotuner) or not isinstance(tuned.fn, JITFunction):
        tuned[grid_of](**args)
        return
    if _tuned_fast(tuned, grid_of, args):
        return
    compiled = tuned[grid_of](**args)
    _remember_tuned(tuned, compiled, args)


class Direct:
    """A relaunch of one launch site with every argument fixed but a few ``varying`` ones,
    taken per call in a fixed order: :func:`direct` makes it from a launch that has just gone
    through :func:`launch`, and it reuses that launch's compiled kernel, grid and (autotuned)
    config. Calling it with the varying values launches and returns True when the kernel still
    fits them, else launches nothing and returns False (the caller then takes :func:`launch`).

    It checks, per call, what the cache key of :func:`launch` would for what varies (tensors and
    runtime floats only: :func:`direct` refuses anything else): each value's type, and a
    tensor's dtype and 16-byte alignment; and the fast path's switch (``enabled``), the site
    still usable, the driver, current device, option knobs, pre-run hooks, globals the kernel
    read and the autotuner's cached choice. What it does not check is what the caller fixed:
    the other arguments, and a grid that depends only on them and the meta-parameters.
    """

    __slots__ = ("fn", "site", "target", "drv", "device", "knobs", "grid", "types", "tensors", "dtypes",
                 "alignment", "build", "tuning")

    def __init__(self, fn, site, target, drv, device, grid, vals: tuple, varying: list[int], tuning):
        self.fn, self.site, self.target, self.drv, self.device, self.grid = fn, site, target, drv, device, grid
        self.knobs = _knob_state(fn)
        values = tuple(vals[i] for i in varying)
        self.types = tuple(map(type, values))
        self.tensors = _getter([i for i, v in enumerate(values) if isinstance(v, torch.Tensor)])
        tensors = self.tensors(values)
        self.dtypes = tuple(map(_DTYPE, tensors))
        self.alignment = _alignment(tensors)
        self.build = _builder(vals, varying)
        self.tuning = tuning  # (autotuner, its cache key, the chosen config) or None

    def __call__(self, values: tuple) -> bool:
        if not enabled or not self.site.usable or tuple(map(type, values)) != self.types:
            return False
        drv = driver.active
        fn = self.fn
        if drv is not self.drv or _hooks_block(fn):
            return False
        device = drv.get_current_device()
        if device != self.device or _knob_state(fn) != self.knobs:
            return False
        tensors = self.tensors(values)
        if tuple(map(_DTYPE, tensors)) != self.dtypes or _alignment(tensors) != self.alignment:
            return False
        if self.tuning is not None:
            tuned, tune_key, config = self.tuning
            if tuned.cache.get(tune_key) is not config:
                return False
            tuned.best_config = config
        if not self.site.globals_unchanged():
            return False
        _run(fn, self.target, drv, device, self.grid, self.build(*values))
        return True


def _builder(vals: tuple, varying: list[int]):
    """A function of the varying values returning the whole argument tuple, in the kernel's
    order, with the other values of ``vals`` in place: generated, as Triton generates its own
    binder, because a loop filling a list costs several times more per launch."""
    slots = {position: f"v{i}" for i, position in enumerate(varying)}
    namespace = {f"c{i}": v for i, v in enumerate(vals) if i not in slots}
    body = ", ".join(slots.get(i, f"c{i}") for i in range(len(vals)))
    params = ", ".join(slots[position] for position in varying)
    exec(f"def build({params}):\n    return ({body},)", namespace)  # the source holds names and indices only
    return namespace["build"]


def direct(kernel, tuned, grid_of, args: dict, meta: dict | None, varying: tuple[str, ...]) -> Direct | None:
    """The :class:`Direct` relaunch of the launch :func:`launch` has just made with these
    arguments, with ``varying`` (names in ``args``) taken per call; None where that launch did
    not leave a kernel the fast path may reuse (interpreter, fast path off, hooks, a
    specialization the key cannot capture...)."""
    if not (enabled and DISABLED_REASON is None):
        return None
    # (before touching the driver: under the interpreter there is none, and creating it fails)
    if not isinstance(kernel if meta is not None else getattr(tuned, "fn", None), JITFunction):
        return None
    if meta is None and not isinstance(tuned, Autotuner):
        return None
    try:
        drv = driver.active
        device = drv.get_current_device()
        if meta is not None:
            meta = dict(meta)
            warps = meta.pop("num_warps", 4)
            site = _SITES.get(id(kernel))
            if site is None or site.owner is not kernel or not site.usable:
                return None
            vals = site.getter(args | meta)
            target = site.lookup(vals, _extra_key(kernel, drv, device, warps))
            fn, grid, tuning = kernel, grid_of(meta), None
        else:
            site = _SITES.get(id(tuned))
            if site is None or site.owner is not tuned or not site.usable:
                return None
            entry = site.lookup(site.arg_getter(args), _extra_key(site.fn, drv, device, None))
            if entry is None:
                return None
            tune_key, config, config_kwargs, target = entry
            bound = args | config_kwargs
            fn, grid, vals, tuning = site.fn, grid_of(bound), site.getter(bound), (tuned, tune_key, config)
    except _LOOKUP_ERRORS:
        return None
    if target is None or _hooks_block(fn):
        return None
    # Only what the key specialises on by kind alone may vary: a tensor (dtype, alignment) or a
    # runtime float (its type). An integer or a constexpr is specialised on its value.
    constexprs = {param.name for param in fn.params if param.is_constexpr}
    for name in varying:
        value = args[name]
        if not (isinstance(value, torch.Tensor) or (type(value) is float and name not in constexprs)):
            return None
    position = {name: i for i, name in enumerate(site.names)}
    return Direct(fn, site, target, drv, device, grid, vals, [position[name] for name in varying], tuning)
