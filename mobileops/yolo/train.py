"""A minimal YOLOv5 training loop: synthetic data, SGD with momentum, the YOLOv5 loss, AMP.

It is the smallest end-to-end demonstration (``python -m mobileops train``) and what the
training-parity tests and the train-step benchmark run; real training belongs in a YOLOv5
tree (see the README: import the blocks, or ``mobileops.convert`` an existing model).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mobileops.yolo import checkpoint as checkpoint_lib
from mobileops.yolo import rundir
from mobileops.yolo.loss import YOLOv5Loss, pack_targets

AMP_DTYPES = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}


#: Targets per image of :func:`synthetic_batch` by default.
BOXES_PER_IMAGE = 4


def synthetic_batch(batch: int, img_size: int, nc: int, *, generator: torch.Generator,
                    boxes_per_image: int = BOXES_PER_IMAGE,
                    dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images (batch, 3, img_size, img_size) and ``boxes_per_image`` random targets per
    image as rows ``[image, class, x, y, w, h]`` (normalised; sizes 2-50% of the image)."""
    images = torch.rand(batch, 3, img_size, img_size, generator=generator, dtype=dtype)
    n = batch * boxes_per_image
    image_index = torch.arange(batch).repeat_interleave(boxes_per_image).to(dtype)
    classes = torch.randint(0, nc, (n,), generator=generator).to(dtype)
    wh = 0.02 + 0.48 * torch.rand(n, 2, generator=generator, dtype=dtype)
    xy = wh / 2 + (1 - wh) * torch.rand(n, 2, generator=generator, dtype=dtype)
    return images, torch.cat((image_index[:, None], classes[:, None], xy, wh), 1)


def synthetic_batches(count: int, batch: int, img_size: int, nc: int, seed: int = 0,
                      dtype: torch.dtype = torch.float32) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of :func:`synthetic_batch` from one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        yield synthetic_batch(batch, img_size, nc, generator=generator, dtype=dtype)


def make_optimizer(model: nn.Module, lr: float = 0.01, momentum: float = 0.937,
                   weight_decay: float = 5e-4) -> torch.optim.Optimizer:
    """YOLOv5's SGD: Nesterov momentum, weight decay on conv/linear weights only (not on
    BatchNorm weights or any bias).

    It is torch's fused SGD where every parameter's device has it (CUDA, CPU), so that a
    GradScaler hands it the scale and the found-inf flag on the device and never waits for
    them (the unfused path reads found-inf on the host every step). The momentum buffers start
    at zero rather than at the first gradient: the same numbers (0.937 * 0 + g is g), but the
    fused kernel leaves them uninitialised when the first step is skipped for an overflow.
    """
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_weight = name == "weight" and not isinstance(module, nn.modules.batchnorm._BatchNorm)
            (decay if is_weight else no_decay).append(p)
    params = decay + no_decay
    fused = bool(params) and all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for p in params)
    optimizer = torch.optim.SGD([dict(params=decay, weight_decay=weight_decay),
                                 dict(params=no_decay, weight_decay=0.0)],
                                lr=lr, momentum=momentum, nesterov=True, fused=fused or None)
    if fused:
        for p in params:
            optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return optimizer


#: ``torch.compile`` modes a :class:`Trainer` takes; the ones marked True capture CUDA graphs
#: themselves, which a whole-step graph (``cuda_graph=True``) cannot contain.
COMPILE_MODES = {"default": False, "reduce-overhead": True, "max-autotune": True,
                 "max-autotune-no-cudagraphs": False}


@dataclass
class Trainer:
    """One model, its loss, optimizer and AMP settings; :meth:`step` runs one training step.

    Every step is free of host synchronisation (the loss, the fused SGD and the GradScaler all
    keep their decisions on the device), so the host can queue steps ahead of the GPU, and the
    whole step can be captured once as a CUDA graph and replayed.

    Args:
        model: a :class:`~mobileops.yolo.DetectionModel` (or anything ending in Detect).
        img_size: training image size (scales the objectness gain as YOLOv5 does).
        amp: ``"none"``, ``"fp16"`` (with a GradScaler) or ``"bf16"``.
        lr: SGD learning rate (constant: a captured graph holds it).
        cuda_graph: capture forward, loss, backward, optimizer and scaler as one CUDA graph after
            ``graph_warmup`` eager steps, and replay it for every later batch. Needs the model on
            a CUDA device and ``max_targets``; every batch must have the captured shapes. It never
            falls back to eager: a batch it cannot replay raises.
        max_targets: pad every batch's targets to this many rows (:func:`~mobileops.yolo.loss.pack_targets`),
            so that shapes never change; more targets than this raise.
        compile: a ``torch.compile`` mode (:data:`COMPILE_MODES`) for the model and the loss, or None.
        graph_warmup: eager steps before the capture (autotuning, allocator, lazy state).
    """

    model: nn.Module
    img_size: int = 640
    amp: str = "none"
    lr: float = 0.01
    cuda_graph: bool = False
    max_targets: int | None = None
    compile: str | None = None
    graph_warmup: int = 3
    criterion: YOLOv5Loss = field(init=False)
    optimizer: torch.optim.Optimizer = field(init=False)

    def __post_init__(self):
        if self.amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {', '.join(AMP_DTYPES)}, got {self.amp!r}")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)} or None, got {self.compile!r}")
        if self.max_targets is not None and (isinstance(self.max_targets, bool) or not isinstance(self.max_targets, int)
                                             or self.max_targets < 0):
            raise ValueError(f"max_targets must be a non-negative integer or None, got {self.max_targets!r}")
        device = next(self.model.parameters()).device
        if self.cuda_graph:
            if self.max_targets is None:
                raise ValueError("cuda_graph=True needs max_targets: a captured step has a fixed number of target rows")
            if self.compile is not None and COMPILE_MODES[self.compile]:
                raise ValueError(f"compile={self.compile!r} captures CUDA graphs itself; with cuda_graph=True use "
                                 "'default' or 'max-autotune-no-cudagraphs'")
            if isinstance(self.graph_warmup, bool) or not isinstance(self.graph_warmup, int) or self.graph_warmup < 1:
                raise ValueError(f"graph_warmup must be a positive integer, got {self.graph_warmup!r}")
            if device.type != "cuda":
                raise ValueError(f"cuda_graph=True needs the model on a CUDA device; it is on {device}")
        self.criterion = YOLOv5Loss.for_model(self.model, img_size=self.img_size)
        self.optimizer = make_optimizer(self.model, lr=self.lr)
        self.device = device
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == "fp16")
        self._forward, self._loss = self.model, self.criterion
        if self.compile is not None:
            self._forward = torch.compile(self.model, mode=self.compile)
            self._loss = torch.compile(self.criterion, mode=self.compile)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # images, targets, parts
        self._warmed = 0

    def step(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One step on a batch; returns the detached ``[box, obj, cls]`` loss parts (on the
        device: reading them is the caller's synchronisation)."""
        if self.max_targets is not None:
            targets = pack_targets(targets, self.max_targets)
        if not self.cuda_graph:
            return self._step(images, targets.to(self.device, non_blocking=True))
        return self._graph_step(images, targets)

    def _step(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        compiled_graphs = self.compile is not None and COMPILE_MODES[self.compile]
        if compiled_graphs:  # a new step of torch.compile's own CUDA graphs (their outputs are reused)
            torch.compiler.cudagraph_mark_step_begin()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        dtype = AMP_DTYPES[self.amp]
        # the autocast weight cache must be off inside a graph capture; it changes no value
        with torch.autocast(self.device_type, dtype=dtype, enabled=dtype is not None,
                            cache_enabled=False if self.cuda_graph else None):
            loss, parts = self._loss(self._forward(images), targets)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # the graphs' next replay overwrites their outputs; the caller may keep several steps' parts
        return parts.clone() if compiled_graphs else parts

    def _graph_step(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self._static is None:
            self._static = (torch.empty_like(images, device=self.device), torch.empty_like(targets, device=self.device),
                            None)
        static_images, static_targets, static_parts = self._static
        for name, got, want in (("images", images, static_images), ("targets", targets, static_targets)):
            if got.shape != want.shape or got.dtype != want.dtype:
                raise ValueError(f"cuda_graph: the {name} are {tuple(got.shape)} {got.dtype}, but the step (captured "
                                 f"after the warm-up steps) takes {tuple(want.shape)} {want.dtype}, the first "
                                 "batch's; a CUDA graph replays one shape (keep the batch size and image size "
                                 "fixed, e.g. drop the last partial batch)")
        if images.is_contiguous(memory_format=torch.channels_last) != \
                static_images.is_contiguous(memory_format=torch.channels_last):
            raise ValueError("cuda_graph: the images' memory format changed from the captured step's")
        static_images.copy_(images, non_blocking=True)
        static_targets.copy_(targets, non_blocking=True)
        if self._graph is None:
            if self._warmed < self.graph_warmup:  # on a side stream, as the capture will run
                stream = torch.cuda.Stream(self.device)
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream):
                    parts = self._step(static_images, static_targets)
                torch.cuda.current_stream(self.device).wait_stream(stream)
                self._warmed += 1
                return parts
            self.optimizer.zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_parts = self._step(static_images, static_targets)
            self._graph, self._static = graph, (static_images, static_targets, static_parts)
        self._graph.replay()  # the capture recorded this batch's step without running it
        return static_parts.clone()


@dataclass
class TrainResult:
    """What :func:`train` did.

    ``losses``: the ``[box, obj, cls]`` loss parts of each step this call ran; ``images_per_s``:
    over those steps (the first, which pays for autotuning and allocation, is excluded when there
    are more; with ``cuda_graph`` also the warm-up steps and the capture); ``steps``: how many
    steps this call ran; ``step`` and ``epoch``: completed steps and epochs of the whole run (a
    resumed run counts the steps before the resume);
    ``interrupted``: ``stop()`` ended it early; ``last``: the checkpoint written last, if any.
    """

    losses: list[list[float]]
    images_per_s: float
    steps: int
    step: int = 0
    epoch: int = 0
    interrupted: bool = False
    last: Path | None = None


def _resumed_state(resume, model: nn.Module, total: int) -> dict | None:
    if resume is None:
        return None
    if isinstance(resume, dict):
        checkpoint, path = resume, "<checkpoint>"
    else:
        path = str(resume)
        checkpoint = checkpoint_lib.load_checkpoint(resume)
    checkpoint_lib.check_compatible(model, checkpoint["model"], path)
    if checkpoint["step"] >= total:
        raise ValueError(f"{path}: the run finished ({checkpoint['step']} of {total} steps); nothing to resume")
    return checkpoint


def train(model: nn.Module, *, epochs: int = 1, steps_per_epoch: int = 10, batch_size: int = 8,
          img_size: int = 320, amp: str = "none", channels_last: bool = False, lr: float = 0.01, seed: int = 0,
          progress: Callable[[int, int, list[float]], None] | None = None, save_dir: str | Path | None = None,
          save_period: int = 0, options: dict[str, Any] | None = None,
          resume: str | Path | dict[str, Any] | None = None,
          stop: Callable[[], bool] | None = None, cuda_graph: bool = False,
          compile: str | None = None) -> TrainResult:
    """Train ``model`` in place on synthetic data; see :class:`Trainer` for the step.

    The batches come from one generator seeded with ``seed`` and are drawn in the model's
    floating dtype. With ``save_dir`` the run keeps YOLOv5's files there (see
    :mod:`mobileops.yolo.rundir`): ``weights/last.pt`` after every epoch, every ``save_period``
    steps and when stopped, ``results.csv`` and ``opt.yaml``. ``resume`` continues a run from its
    checkpoint exactly: the same arguments then give the same parameters as a run never stopped.

    Args:
        model: the detector to train, on its device.
        epochs: number of epochs.
        steps_per_epoch: steps (batches) per epoch.
        batch_size: images per batch.
        img_size: image size, a multiple of the model's largest stride.
        amp: ``"none"``, ``"fp16"`` or ``"bf16"``.
        channels_last: train in channels_last memory format.
        lr: SGD learning rate.
        seed: seed of the synthetic data generator.
        progress: ``progress(done, total, parts)`` after every step (``done`` counts the whole run).
        save_dir: the run folder; None keeps nothing on disk.
        save_period: also write ``last.pt`` every this many steps (0: only at epoch ends and when stopped).
        options: the run's options, stored in the checkpoint and written to ``opt.yaml``.
        resume: a checkpoint path or a dict from :func:`~mobileops.yolo.checkpoint.load_checkpoint`.
        stop: polled after every step; when it returns True the run saves ``last.pt`` (with
            ``save_dir``) and returns with ``interrupted=True``.
        cuda_graph: capture the whole step as a CUDA graph after a few eager steps and replay it
            (:class:`Trainer`); the synthetic batches have a fixed target count, the capacity.
        compile: a ``torch.compile`` mode for the model and the loss (:data:`COMPILE_MODES`).

    Without ``progress`` the loop never waits for the GPU between steps: the loss parts are read
    at epoch ends, checkpoints and the end (with ``progress``, after every step).

    Raises:
        ValueError: bad arguments, or a checkpoint that does not fit ``model`` or has nothing left to run.
    """
    for name, value in (("epochs", epochs), ("steps_per_epoch", steps_per_epoch), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"train: {name} must be a positive integer, got {value!r}")
    if isinstance(save_period, bool) or not isinstance(save_period, int) or save_period < 0:
        raise ValueError(f"train: save_period must be a non-negative integer, got {save_period!r}")
    largest_stride = int(max(getattr(model, "stride", torch.tensor([32.0])).tolist()))
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1 or img_size % largest_stride:
        raise ValueError(f"train: img_size must be a positive multiple of {largest_stride} (the largest stride), "
                         f"got {img_size}")
    total = epochs * steps_per_epoch
    checkpoint = _resumed_state(resume, model, total)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype if param.is_floating_point() else torch.float32
    if channels_last:
        model.to(memory_format=torch.channels_last)
    trainer = Trainer(model, img_size=img_size, amp=amp, lr=lr, cuda_graph=cuda_graph, compile=compile,
                      max_targets=batch_size * BOXES_PER_IMAGE if cuda_graph else None)
    nc = trainer.criterion.nc
    generator = torch.Generator().manual_seed(seed)
    step, epoch_losses = 0, [0.0, 0.0, 0.0]
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        trainer.optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint["scaler"]:
            trainer.scaler.load_state_dict(checkpoint["scaler"])
        checkpoint_lib.restore_rng_states(checkpoint["rng"], generator)
        step, epoch_losses = checkpoint["step"], list(checkpoint["epoch_losses"])
    options = dict(options or {})
    last = Path(save_dir) / "weights" / "last.pt" if save_dir is not None else None
    if save_dir is not None:
        rundir.remove_stale_temporaries(Path(save_dir) / "weights")
        rundir.write_options(save_dir, options)
        if checkpoint is not None:  # a fresh run into an existing folder (exist_ok) appends, as YOLOv5 does
            rundir.keep_results_before(save_dir, step // steps_per_epoch)

    def save() -> Path:
        state = checkpoint_lib.make_checkpoint(
            model, trainer.optimizer, trainer.scaler, epoch=step // steps_per_epoch, step=step,
            epoch_losses=epoch_losses, data_generator=generator, opt=options)
        return checkpoint_lib.save_checkpoint(state, last)

    losses: list[list[float]] = []
    unread: list[torch.Tensor] = []  # loss parts of steps run but not yet read on the host
    pinned = device.type == "cuda"  # a pageable host-to-device copy would wait for the GPU

    def read() -> None:
        """Reads the unread loss parts with one synchronisation."""
        nonlocal epoch_losses
        if not unread:
            return
        done = step - len(unread)
        for parts in torch.stack(unread).tolist():
            done += 1
            losses.append(parts)
            epoch_losses = [a + b for a, b in zip(epoch_losses, parts)]
            if progress is not None:
                progress(done, total, parts)
        unread.clear()

    # the steps that pay for autotuning and allocation (with a graph: the warm-up and the capture)
    untimed = trainer.graph_warmup + 1 if cuda_graph else 1
    started = first_done = epoch_began = time.perf_counter()
    epoch_images, interrupted, saved, saving_s, ran = 0, False, None, 0.0, 0
    while step < total:
        images, targets = synthetic_batch(batch_size, img_size, nc, generator=generator, dtype=dtype)
        if pinned:
            images, targets = images.pin_memory(), targets.pin_memory()
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        unread.append(trainer.step(images, targets.to(device, non_blocking=True)))
        step += 1
        ran += 1
        epoch_images += batch_size
        if ran == untimed:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            first_done = time.perf_counter()
        epoch_end = step % steps_per_epoch == 0
        periodic = bool(save_period) and step % save_period == 0
        # progress reports every step (a synchronisation each); without it the host runs ahead
        if epoch_end or periodic or progress is not None:
            read()
        interrupted = stop is not None and stop() and step < total
        if interrupted:
            read()
        checkpoint_now = save_dir is not None and (epoch_end or interrupted or periodic)
        if epoch_end and save_dir is not None:
            in_epoch = (step - 1) % steps_per_epoch + 1
            row = dict(epoch=step // steps_per_epoch - 1, step=step)
            row.update(zip(rundir.RESULTS_COLUMNS[2:5], [v / in_epoch for v in epoch_losses]))
            row["images/s"] = epoch_images / max(time.perf_counter() - epoch_began, 1e-9)
            row.update((f"x/lr{i}", group["lr"]) for i, group in enumerate(trainer.optimizer.param_groups))
            rundir.append_results(save_dir, row)
        if epoch_end:
            epoch_losses, epoch_images, epoch_began = [0.0, 0.0, 0.0], 0, time.perf_counter()
        if checkpoint_now:
            began_saving = time.perf_counter()
            saved = save()
            # images/s counts training only: the write moves the epoch's start (and the run's) on
            seconds = time.perf_counter() - began_saving
            epoch_began += seconds
            saving_s += seconds
        if interrupted:
            break
    read()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    ended = time.perf_counter() - saving_s
    if ran > untimed:
        rate = (ran - untimed) * batch_size / max(ended - first_done, 1e-9)
    else:
        rate = ran * batch_size / max(ended - started, 1e-9)
    return TrainResult(losses, rate, ran, step=step, epoch=step // steps_per_epoch, interrupted=interrupted,
                       last=saved)


__all__ = ["AMP_DTYPES", "COMPILE_MODES", "TrainResult", "Trainer", "make_optimizer", "synthetic_batch",
           "synthetic_batches", "train"]
