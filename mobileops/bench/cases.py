"""What the benchmarks time: the fused ops, the blocks and the whole detectors, each at the
shapes the two detectors really use at 640x640, against the baselines.

A :class:`Case` is one measurement point (what, mode, dtype, layout, batch, shape).
:func:`setup` turns it into the implementations to time side by side, all computing the same
thing from the same parameters:

``eager``
    the plain PyTorch composition users have: ``nn.Conv2d``/``nn.BatchNorm2d``/activation
    modules for the ops, the seed blocks of :mod:`mobileops.reference` for blocks and
    detectors (``yolo.build(cfg, blocks="plain")``); ``cudnn.benchmark`` is on for GPU runs.
``eager_folded``
    inference only: BatchNorm folded into the convolution (the ops), or the mobileops model
    after ``fuse()`` on the ``torch`` backend (blocks and detectors: YOLOv5's ``fuse()``).
``compile``
    ``torch.compile`` of ``eager`` (GPU runs; mode from the caller).
``mobileops_<backend>``
    the mobileops op or module on each backend that can run here (``torch`` on a CPU,
    ``triton`` and ``cuda`` on a GPU).

Modes: ``inference`` (eval, no autograd), ``train_forward`` (batch statistics, running-stat
update), ``backward`` (the backward of one saved forward), ``forward`` / ``forward_backward``
(SE and blocks: forward, or forward plus backward) and ``train_step`` (detectors: one
:class:`mobileops.yolo.train.Trainer` step: forward, the YOLOv5 loss on fixed synthetic
targets, backward, fused SGD and the GradScaler). Train steps time more implementations
(:func:`train_step_variants`): each of the above also inside a whole-step CUDA graph
(``eager_graph``, ``mobileops_<backend>_graph``), every ``torch.compile`` mode of
:data:`TRAIN_COMPILE_MODES` (``compile_<mode>``) and mobileops compiled
(``mobileops_<backend>_compile``).
Low-precision blocks and detectors run under ``torch.autocast`` with float32 parameters
(AMP, with a GradScaler for fp16 training); low-precision ops take inputs in that dtype with
float32 BatchNorm parameters, as they would inside an autocast region.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

import mobileops
from mobileops import backend, ops, reference, yolo
from mobileops.nn import C3_UIB, MobileNetv3, SELayer, UniversalInvertedBottleneckBlock
from mobileops.nn.helpers import fold_bn_into_conv

DETECTORS = ("yolov5n-c3uib", "yolov5-mobilenetv3")
IMAGE_SIZE = 640
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
SCOPES = ("cpu", "quick", "default", "full")
EAGER_ACTIVATIONS = {"none": nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6, "hswish": nn.Hardswish,
                     "silu": nn.SiLU, "hsigmoid": nn.Hardsigmoid, "sigmoid": nn.Sigmoid}


@dataclass(frozen=True)
class Case:
    """One measurement point.

    Attributes:
        kind: ``"op"``, ``"block"`` or ``"detector"``.
        target: the op name, the block label (``UIB``, ``C3_UIB``, ``MobileNetv3``,
            ``MobileNetv3-SE``) or the detector config.
        mode: see the module docstring.
        dtype, layout: keys of :data:`DTYPES` and :data:`LAYOUTS`.
        batch: batch size.
        shape: per-sample input shape (C, H, W).
        options: the op's keyword options, or for blocks the module's path in its detector.
        detector: the detector the shape comes from.
        needs_cuda: True for GPU-only cases (skipped with the reason on a CPU).
    """

    kind: str
    target: str
    mode: str
    dtype: str
    layout: str
    batch: int
    shape: tuple[int, int, int]
    options: tuple[tuple[str, object], ...] = ()
    detector: str = ""
    needs_cuda: bool = True

    @property
    def group(self) -> str:
        """The pytest-benchmark group and results-table section, e.g. ``op:bn_act:inference``."""
        return f"{self.kind}:{self.target}:{self.mode}"

    @property
    def name(self) -> str:
        """A short unique id: ``b32-fp16-nhwc-96x160x160-k5s1-hswish``."""
        opts = dict(self.options)
        parts = [f"b{self.batch}", self.dtype, self.layout, "x".join(map(str, self.shape))]
        if "kernel" in opts:
            parts.append(f"k{opts['kernel']}s{opts['stride']}")
        if "hidden" in opts:
            parts.append(f"r{opts['hidden']}")
        parts += [str(opts[k]) for k in ("activation", "post_act") if k in opts and opts[k] != "none"]
        if "path" in opts:
            parts.append(str(opts["path"]))
        if self.kind == "op" and self.detector:
            parts.append(self.detector)
        return "-".join(parts)

    def describe(self) -> dict:
        """The case's fields for a results row."""
        return dict(kind=self.kind, target=self.target, mode=self.mode, group=self.group, name=self.name,
                    dtype=self.dtype, layout=self.layout, batch=self.batch, shape=list(self.shape),
                    options=dict(self.options), detector=self.detector)


@dataclass
class Setup:
    """A case made concrete on a device: the implementations and their inputs.

    ``impls`` maps a name to a callable taking the input batch and returning the outputs;
    ``parameters`` lists each implementation's trainable tensors (for backward and train
    steps); ``min_bytes`` is the byte floor (each tensor read or written the least number
    of times the mode allows; docs/measuring.md, "Byte floors"), None where no floor is defined.
    """

    impls: dict[str, Callable[[torch.Tensor], object]]
    x: torch.Tensor
    dy: torch.Tensor | None = None
    parameters: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    modules: dict[str, nn.Module] = field(default_factory=dict)
    min_bytes: int | None = None
    autocast_dtype: torch.dtype | None = None
    trainers: dict[str, Callable[[], TrainStep]] = field(default_factory=dict)


# ----------------------------------------------------------------------------- real shapes

@functools.cache
def _model(cfg: str, blocks: str = "mobileops") -> nn.Module:
    torch.manual_seed(0)
    return yolo.build(cfg, blocks=blocks)


@functools.cache
def op_shapes() -> dict[str, list[tuple[tuple[int, int, int], tuple[tuple[str, object], ...], str]]]:
    """op -> distinct (C, H, W), options, detector of the detectors' calls at 640, in order."""
    found: dict[str, dict] = {"dwconv_bn_act": {}, "bn_act": {}, "squeeze_excite": {}}
    for cfg in DETECTORS:
        for call in yolo.fused_op_calls(_model(cfg), (1, 3, IMAGE_SIZE, IMAGE_SIZE)):
            op, (shape, _) = call["op"], call["inputs"][0]
            chw = tuple(shape[1:])
            if op == "dwconv_bn_act":
                opts = (("kernel", call["inputs"][1][0][-1]), ("stride", call["options"]["stride"]),
                        ("activation", call["options"]["activation"]))
            elif op == "bn_act":
                opts = (("activation", call["options"]["activation"]),)
            elif op == "squeeze_excite":
                opts = (("hidden", call["inputs"][1][0][0]), ("gate", call["options"]["gate"]),
                        ("post_act", call["options"]["post_act"]))
            else:
                continue
            found[op].setdefault((chw, opts), cfg)
    return {op: [(chw, opts, cfg) for (chw, opts), cfg in table.items()] for op, table in found.items()}


def _block_label(module: nn.Module) -> str | None:
    if isinstance(module, C3_UIB):
        return "C3_UIB"
    if isinstance(module, UniversalInvertedBottleneckBlock):
        return "UIB"
    if isinstance(module, MobileNetv3):
        return "MobileNetv3-SE" if any(isinstance(m, SELayer) for m in module.modules()) else "MobileNetv3"
    return None


@functools.cache
def block_shapes() -> dict[str, list[tuple[tuple[int, int, int], str, str]]]:
    """block label -> distinct (C, H, W), module path, detector, from a meta forward at 640."""
    found: dict[str, dict] = {"UIB": {}, "C3_UIB": {}, "MobileNetv3": {}, "MobileNetv3-SE": {}}
    for cfg in DETECTORS:
        meta = copy.deepcopy(_model(cfg)).to("meta").eval()
        hooks = []
        for path, module in meta.named_modules():
            label = _block_label(module)
            if label is None:
                continue

            def record(mod, args, label=label, path=path, cfg=cfg):
                signature = tuple((n, tuple(p.shape)) for n, p in mod.named_parameters())
                found[label].setdefault((tuple(args[0].shape[1:]), signature), (path, cfg))

            hooks.append(module.register_forward_pre_hook(record))
        with torch.no_grad():
            meta(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE, device="meta"))
        for hook in hooks:
            hook.remove()
    return {label: [(chw, path, cfg) for (chw, _), (path, cfg) in table.items()] for label, table in found.items()}


def _spread(items: list, count: int | None) -> list:
    """``count`` items spread evenly over ``items`` (all when count is None or larger)."""
    if count is None or count >= len(items):
        return list(items)
    if count == 1:
        return [items[0]]
    step = (len(items) - 1) / (count - 1)
    return [items[round(i * step)] for i in range(count)]


# ----------------------------------------------------------------------------- the grids

# Per scope: how many shapes per op / block, which batches, dtypes, layouts and modes.
# "cpu" is the subset a CPU-only machine times (inference of the torch backend against eager
# and folded eager); the others are GPU grids, "quick" for `python -m mobileops bench`.
_GRIDS = {
    "cpu": dict(shapes=2, blocks=1, batches=(1,), dtypes=("fp32",), layouts=("nchw",),
                op_modes=("inference",), se_modes=("forward",), block_modes=("inference",),
                detector_modes=(("inference", 1),), needs_cuda=False),
    "quick": dict(shapes=2, blocks=1, batches=(32,), dtypes=("fp16",), layouts=("nhwc",),
                  op_modes=("inference", "train_forward", "backward"), se_modes=("forward", "forward_backward"),
                  block_modes=("inference", "forward_backward"),
                  detector_modes=(("inference", 1), ("inference", 32), ("train_step", 32))),
    "default": dict(shapes=3, blocks=1, batches=(1, 32), dtypes=("fp16", "bf16"), layouts=("nhwc", "nchw"),
                    op_modes=("inference", "train_forward", "backward"), se_modes=("forward", "forward_backward"),
                    block_modes=("inference", "forward_backward"),
                    detector_modes=(("inference", 1), ("inference", 32), ("train_step", 32))),
    "full": dict(shapes=None, blocks=None, batches=(1, 32), dtypes=("fp32", "fp16", "bf16"),
                 layouts=("nhwc", "nchw"), op_modes=("inference", "train_forward", "backward"),
                 se_modes=("forward", "forward_backward"), block_modes=("inference", "forward_backward"),
                 detector_modes=(("inference", 1), ("inference", 32), ("train_step", 16), ("train_step", 64))),
}


def _check_scope(scope: str) -> dict:
    if scope not in _GRIDS:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    return _GRIDS[scope]


def _keep(grid: dict, batch: int, mode: str, dtype: str, layout: str) -> bool:
    """Below "full", batch 1 is timed for inference only, and bf16/NCHW only at batch 32
    inference, which keeps the default GPU grid to a few minutes of device time."""
    if grid["shapes"] is None:
        return True
    if batch == 1:
        return mode in ("inference", "forward") and dtype == grid["dtypes"][0] and layout == grid["layouts"][0]
    return (dtype, layout) == (grid["dtypes"][0], grid["layouts"][0]) or mode in ("inference", "forward")


def op_cases(scope: str) -> list[Case]:
    """The op cases of ``scope`` (see :data:`SCOPES`)."""
    grid = _check_scope(scope)
    cases = []
    for op, shapes in op_shapes().items():
        modes = grid["se_modes"] if op == "squeeze_excite" else grid["op_modes"]
        # Largest activations first, so a spread covers big and small layers.
        ordered = sorted(shapes, key=lambda s: -s[0][0] * s[0][1] * s[0][2])
        for chw, opts, cfg in _spread(ordered, grid["shapes"]):
            for batch in grid["batches"]:
                for dtype in grid["dtypes"]:
                    for layout in grid["layouts"]:
                        for mode in modes:
                            if _keep(grid, batch, mode, dtype, layout):
                                cases.append(Case("op", op, mode, dtype, layout, batch, chw, opts, cfg,
                                                  grid.get("needs_cuda", True)))
    return cases


def block_cases(scope: str) -> list[Case]:
    """The block cases of ``scope``: UIB, C3_UIB, MobileNetv3 with and without SE."""
    grid = _check_scope(scope)
    cases = []
    for label, shapes in block_shapes().items():
        ordered = sorted(shapes, key=lambda s: -s[0][0] * s[0][1] * s[0][2])
        for chw, path, cfg in _spread(ordered, grid["blocks"]):
            for batch in grid["batches"]:
                for dtype in grid["dtypes"]:
                    for layout in grid["layouts"]:
                        for mode in grid["block_modes"]:
                            if _keep(grid, batch, mode, dtype, layout):
                                cases.append(Case("block", label, mode, dtype, layout, batch, chw,
                                                  (("path", path),), cfg, grid.get("needs_cuda", True)))
    return cases


def detector_cases(scope: str) -> list[Case]:
    """Whole-detector cases of ``scope``: inference latency and training steps at 640."""
    grid = _check_scope(scope)
    cases = []
    for cfg in DETECTORS:
        for mode, batch in grid["detector_modes"]:
            for dtype in grid["dtypes"]:
                for layout in grid["layouts"]:
                    # train steps: every AMP dtype channels_last, and the first dtype in both layouts
                    first = (grid["dtypes"][0], grid["layouts"][0])
                    train_step_kept = mode == "train_step" and (layout == first[1] or dtype == first[0])
                    if grid["shapes"] is None or (dtype, layout) == first or train_step_kept:
                        cases.append(Case("detector", cfg, mode, dtype, layout, batch, (3, IMAGE_SIZE, IMAGE_SIZE),
                                          (), cfg, grid.get("needs_cuda", True)))
    return cases


def all_cases(scope: str) -> list[Case]:
    """Every case of ``scope``: ops, then blocks, then detectors."""
    return op_cases(scope) + block_cases(scope) + detector_cases(scope)


# ----------------------------------------------------------------------------- implementations

def mobileops_backends(op_names, device: torch.device) -> list[str]:
    """The backends that implement every op in ``op_names`` and run on ``device``, fastest
    last: ``torch`` on a CPU; ``triton`` and ``cuda`` on a GPU (torch there is the eager
    composition, already timed as ``eager``)."""
    candidates = ("triton", "cuda") if device.type == "cuda" else ("torch",)
    return [name for name in candidates
            if all(op in backend.implemented_ops(name) for op in op_names)
            and backend._backend_problem(name, device) is None]


def _on_backend(fn: Callable, name: str) -> Callable:
    def run(*args):
        with mobileops.use_backend(name):
            return fn(*args)

    return run


def _under_autocast(fn: Callable, device: torch.device, dtype: torch.dtype | None) -> Callable:
    if dtype is None:
        return fn

    def run(*args):
        with torch.autocast(device.type, dtype=dtype):
            return fn(*args)

    return run


def _random_bn(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """Realistic affine parameters and running statistics (not the identity of a fresh BN)."""
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
    bn.eps, bn.momentum = 1e-3, 0.03
    return bn


def _op_setup(case: Case, device: torch.device, compile_mode: str | None) -> Setup:
    opts = dict(case.options)
    dtype, layout = DTYPES[case.dtype], LAYOUTS[case.layout]
    c, h, w = case.shape
    torch.manual_seed(0)
    x = torch.randn(case.batch, c, h, w, device=device, dtype=dtype).contiguous(memory_format=layout)
    training = case.mode != "inference"
    impls: dict[str, Callable] = {}
    if case.target in ("dwconv_bn_act", "bn_act"):
        k, stride, act = opts.get("kernel"), opts.get("stride", 1), opts["activation"]
        layers = [nn.Conv2d(c, c, k, stride, (k - 1) // 2, groups=c, bias=False)] if k else []
        eager = nn.Sequential(*layers, _random_bn(nn.BatchNorm2d(c)), EAGER_ACTIVATIONS[act]()).to(device)
        if k:
            eager[0].to(dtype)
        eager = eager.to(memory_format=layout).train(training)
        conv, bn = (eager[0], eager[1]) if k else (None, eager[0])

        def fused(x, conv=conv, bn=bn):
            common = dict(activation=act, training=bn.training, momentum=bn.momentum, eps=bn.eps)
            if conv is None:
                return ops.bn_act(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, **common)
            return ops.dwconv_bn_act(x, conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                     stride=stride, **common)

        impls["eager"] = eager
        if case.mode == "inference" and k:
            impls["eager_folded"] = nn.Sequential(fold_bn_into_conv(conv, bn), eager[2]).eval()
        ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
        y_numel = case.batch * c * ho * wo
        module = eager
    else:  # squeeze_excite
        hidden, gate, post = opts["hidden"], opts["gate"], opts["post_act"]
        se = reference.RefSELayer(c)
        se.fc[0], se.fc[2] = nn.Linear(c, hidden), nn.Linear(hidden, c)
        if gate != "hsigmoid":
            se.fc[3] = EAGER_ACTIVATIONS[gate]()
        post_module = reference.RefHSwish() if post == "hswish" else EAGER_ACTIVATIONS[post]()
        module = nn.Sequential(se, post_module).to(device=device, dtype=dtype)

        def fused(x, se=se):
            return ops.squeeze_excite(x, se.fc[0].weight, se.fc[0].bias, se.fc[2].weight, se.fc[2].bias,
                                      gate=gate, post_act=post)

        impls["eager"] = module
        y_numel = x.numel()
    if compile_mode:
        impls["compile"] = torch.compile(module, mode=compile_mode)
    for name in mobileops_backends([case.target], device):
        impls[f"mobileops_{name}"] = _on_backend(fused, name)
    x_bytes, y_bytes = x.numel() * x.element_size(), y_numel * x.element_size()
    floor = {"inference": x_bytes + y_bytes, "train_forward": 2 * x_bytes + y_bytes,
             "backward": 3 * x_bytes + 2 * y_bytes, "forward": x_bytes + y_bytes,
             "forward_backward": 3 * x_bytes + 2 * y_bytes}[case.mode]
    dy = None
    if case.mode in ("backward", "forward_backward"):
        dy = torch.randn(case.batch, c, *((ho, wo) if case.target != "squeeze_excite" else (h, w)),
                         device=device, dtype=dtype).contiguous(memory_format=layout)
    params = [p for p in module.parameters() if p.requires_grad]
    return Setup(impls, x, dy, {name: params for name in impls}, {"eager": module}, floor)


def _module_setup(case: Case, device: torch.device, compile_mode: str | None) -> Setup:
    dtype, layout = DTYPES[case.dtype], LAYOUTS[case.layout]
    training = case.mode not in ("inference",)
    if case.kind == "detector":
        fused_model, plain = copy.deepcopy(_model(case.target)), copy.deepcopy(_model(case.target, "plain"))
        op_names = {call["op"] for call in yolo.fused_op_calls(fused_model, (1, 3, 64, 64))}
    else:
        path = dict(case.options)["path"]
        fused_model = copy.deepcopy(_model(case.detector).get_submodule(path))
        plain = copy.deepcopy(_model(case.detector, "plain").get_submodule(path))
        op_names = {"dwconv_bn_act", "bn_act"} | ({"squeeze_excite"} if case.target.endswith("-SE") else set())
    plain.load_state_dict(fused_model.state_dict(), strict=True)
    fused_model = fused_model.to(device).to(memory_format=layout).train(training)
    plain = plain.to(device).to(memory_format=layout).train(training)
    torch.manual_seed(0)
    x = torch.randn(case.batch, *case.shape, device=device).contiguous(memory_format=layout)
    amp = None if dtype == torch.float32 else dtype
    impls: dict[str, Callable] = {"eager": plain}
    modules: dict[str, nn.Module] = {"eager": plain}
    if case.mode == "inference":
        folded = copy.deepcopy(fused_model).eval()
        folded.fuse()
        impls["eager_folded"] = _on_backend(folded, "torch")
        modules["eager_folded"] = folded
    if compile_mode:
        impls["compile"] = torch.compile(plain, mode=compile_mode)
        modules["compile"] = plain
    for name in mobileops_backends(sorted(op_names), device):
        # Separate copies so that training steps of one implementation do not move another's.
        model = fused_model if name == "torch" else copy.deepcopy(fused_model)
        impls[f"mobileops_{name}"] = _on_backend(model, name)
        modules[f"mobileops_{name}"] = model
    impls = {name: _under_autocast(fn, device, amp) for name, fn in impls.items()}
    params = {name: [p for p in modules[name].parameters() if p.requires_grad] for name in impls}
    return Setup(impls, x, None, params, modules, None, amp)


#: ``torch.compile`` modes a train-step case times (when the run has a compile baseline at all).
TRAIN_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")

#: Steps every train-step implementation runs from the same weights before it is timed, its
#: loss and its parameter updates checked against eager's (a graph: 3 warm-up steps, the
#: capture, a replay).
TRAIN_CHECK_STEPS = 5


@dataclass
class TrainStep:
    """One implementation's trainer on the case's fixed batch: :meth:`step` runs a step."""

    trainer: object  # mobileops.yolo.train.Trainer
    images: torch.Tensor
    targets: torch.Tensor
    backend: str

    def step(self) -> torch.Tensor:
        with mobileops.use_backend(self.backend):
            return self.trainer.step(self.images, self.targets)

    def trace(self, steps: int = TRAIN_CHECK_STEPS) -> list[torch.Tensor]:
        """``steps`` steps; returns their (steps, 3) loss parts and the change of every floating
        state tensor over them, flattened into one vector (what the agreement check compares:
        one scale for all, since a tensor that barely moves would make its own relative
        difference meaningless)."""
        before = {k: v.detach().clone() for k, v in self.trainer.model.state_dict().items() if v.is_floating_point()}
        parts = torch.stack([self.step() for _ in range(steps)])
        after = self.trainer.model.state_dict()
        return [parts, torch.cat([(after[k].detach() - v).flatten().float() for k, v in before.items()])]


def train_step_variants(device: torch.device, compile_mode: str | None,
                        op_names) -> dict[str, dict[str, object]]:
    """name -> the model's blocks and the Trainer options of each train-step implementation:
    eager and mobileops on each fused backend; on a GPU each also in a whole-step CUDA graph;
    with a compile baseline every mode of :data:`TRAIN_COMPILE_MODES` on eager, and mobileops
    compiled in ``compile_mode``."""
    cuda = device.type == "cuda"
    variants: dict[str, dict[str, object]] = {"eager": dict(blocks="plain", backend="torch")}
    if cuda:
        variants["eager_graph"] = dict(blocks="plain", backend="torch", cuda_graph=True)
    if compile_mode:
        for mode in TRAIN_COMPILE_MODES:
            variants[f"compile_{mode}"] = dict(blocks="plain", backend="torch", compile=mode)
    for name in mobileops_backends(sorted(op_names), device):
        variants[f"mobileops_{name}"] = dict(blocks="mobileops", backend=name)
        if cuda:
            variants[f"mobileops_{name}_graph"] = dict(blocks="mobileops", backend=name, cuda_graph=True)
        if compile_mode:
            variants[f"mobileops_{name}_compile"] = dict(blocks="mobileops", backend=name, compile=compile_mode)
    return variants


def _train_step_setup(case: Case, device: torch.device, compile_mode: str | None) -> Setup:
    from mobileops.yolo.train import BOXES_PER_IMAGE, Trainer, synthetic_batch

    layout = LAYOUTS[case.layout]
    amp = {"fp32": "none", "fp16": "fp16", "bf16": "bf16"}[case.dtype]
    weights = _model(case.target).state_dict()
    nc = _model(case.target).model[-1].nc
    images, targets = synthetic_batch(case.batch, case.shape[-1], nc, generator=torch.Generator().manual_seed(0))
    images = images.to(device).contiguous(memory_format=layout)
    targets = targets.to(device)
    op_names = {call["op"] for call in yolo.fused_op_calls(_model(case.target), (1, 3, 64, 64))}

    def factory(spec: dict) -> Callable[[], TrainStep]:
        def make() -> TrainStep:
            model = copy.deepcopy(_model(case.target, spec["blocks"]))
            model.load_state_dict(weights, strict=True)  # every implementation starts from the same weights
            model = model.to(device).to(memory_format=layout)
            trainer = Trainer(model, img_size=case.shape[-1], amp=amp, cuda_graph=spec.get("cuda_graph", False),
                              max_targets=case.batch * BOXES_PER_IMAGE, compile=spec.get("compile"))
            return TrainStep(trainer, images, targets, spec["backend"])

        return make

    trainers = {name: factory(spec) for name, spec in train_step_variants(device, compile_mode, op_names).items()}
    return Setup({}, images, trainers=trainers, autocast_dtype=None if amp == "none" else DTYPES[case.dtype])


def float32_train_trace(case: Case, device: torch.device) -> list[torch.Tensor] | None:
    """Eager's :meth:`TrainStep.trace` without autocast: the reference autocast train steps
    are measured against (None for a float32 case)."""
    if case.dtype == "fp32":
        return None
    exact = Case(case.kind, case.target, case.mode, "fp32", case.layout, case.batch, case.shape, case.options,
                 case.detector, case.needs_cuda)
    return _train_step_setup(exact, device, None).trainers["eager"]().trace()


def setup(case: Case, device: torch.device, compile_mode: str | None = None) -> Setup:
    """Build the implementations of ``case`` on ``device``; ``compile_mode`` None skips the
    ``torch.compile`` baseline."""
    if case.needs_cuda and device.type != "cuda":
        raise ValueError(f"{case.group} {case.name} needs a CUDA device")
    if case.kind == "op":
        return _op_setup(case, device, compile_mode)
    if case.mode == "train_step":
        return _train_step_setup(case, device, compile_mode)
    return _module_setup(case, device, compile_mode)


def stand_in_loss(outputs) -> torch.Tensor:
    """Mean of squares over every output map: the loss of the block ``forward_backward`` cases
    (detector train steps use the YOLOv5 loss)."""
    tensors = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    return sum(t.float().pow(2).mean() for t in tensors)


def timed_function(case: Case, env: Setup, name: str) -> Callable[[], object]:
    """The zero-argument callable that one timing of implementation ``name`` repeats."""
    from mobileops.bench.timing import Rotation

    if case.mode == "train_step":
        impl = env.trainers[name]()
        impl.trace()  # warm: autotuning, allocation, a graph's capture
        return impl.step
    fn = env.impls[name]
    if case.mode in ("inference", "train_forward", "forward"):
        rotation = Rotation(env.x)
        grad = case.mode != "inference"

        def run():
            with torch.set_grad_enabled(grad):
                return fn(rotation.next())

        return run
    if case.mode == "backward":
        x = env.x.detach().requires_grad_(True)
        y = fn(x)
        inputs = [x] + env.parameters[name]
        return lambda: torch.autograd.grad(y, inputs, env.dy, retain_graph=True)
    if case.mode == "forward_backward":
        x = env.x.detach().requires_grad_(True)

        def run():
            out = fn(x)
            if env.dy is not None:
                out.backward(env.dy)
            else:
                stand_in_loss(out).backward()

        return run
    raise ValueError(f"unknown mode {case.mode!r}")


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    flat: list[torch.Tensor] = []
    for item in out:
        flat.extend([item] if isinstance(item, torch.Tensor) else list(item))
    return flat


def implementation_names(env: Setup) -> list[str]:
    """The names of the implementations ``env`` times (train steps build theirs on demand)."""
    return list(env.trainers) or list(env.impls)


def first_output(case: Case, env: Setup, name: str) -> list[torch.Tensor]:
    """One forward of implementation ``name`` (no autograd), flattened to a list of tensors,
    for checking that every implementation computes the same thing before timing it."""
    with torch.no_grad():
        return _flat(env.impls[name](env.x))


def float32_output(env: Setup) -> list[torch.Tensor] | None:
    """Eager's module run in float32 without autocast, flattened like :func:`first_output`:
    the reference that autocast implementations (eager's included) are measured against.
    None where the case runs without autocast."""
    if env.autocast_dtype is None or "eager" not in env.modules:
        return None
    with torch.no_grad():
        return _flat(env.modules["eager"](env.x.float()))


__all__ = ["Case", "DETECTORS", "DTYPES", "LAYOUTS", "SCOPES", "TRAIN_CHECK_STEPS", "TRAIN_COMPILE_MODES", "Setup",
           "TrainStep", "all_cases", "block_cases", "block_shapes", "detector_cases", "first_output",
           "float32_output", "float32_train_trace", "implementation_names", "mobileops_backends", "op_cases",
           "op_shapes", "setup", "stand_in_loss", "timed_function", "train_step_variants"]
