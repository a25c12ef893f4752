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
from mobileops.yolo.loss import YOLOv5Loss

AMP_DTYPES = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def synthetic_batch(batch: int, img_size: int, nc: int, *, generator: torch.Generator,
                    boxes_per_image: int = 4, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
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
    BatchNorm weights or any bias)."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_weight = name == "weight" and not isinstance(module, nn.modules.batchnorm._BatchNorm)
            (decay if is_weight else no_decay).append(p)
    return torch.optim.SGD([dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)],
                           lr=lr, momentum=momentum, nesterov=True)


@dataclass
class Trainer:
    """One model, its loss, optimizer and AMP settings; :meth:`step` runs one training step.

    Args:
        model: a :class:`~mobileops.yolo.DetectionModel` (or anything ending in Detect).
        img_size: training image size (scales the objectness gain as YOLOv5 does).
        amp: ``"none"``, ``"fp16"`` (with a GradScaler) or ``"bf16"``.
        lr: SGD learning rate.
    """

    model: nn.Module
    img_size: int = 640
    amp: str = "none"
    lr: float = 0.01
    criterion: YOLOv5Loss = field(init=False)
    optimizer: torch.optim.Optimizer = field(init=False)

    def __post_init__(self):
        if self.amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {', '.join(AMP_DTYPES)}, got {self.amp!r}")
        self.criterion = YOLOv5Loss.for_model(self.model, img_size=self.img_size)
        self.optimizer = make_optimizer(self.model, lr=self.lr)
        device = next(self.model.parameters()).device
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == "fp16")

    def step(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One step on a batch; returns the detached ``[box, obj, cls]`` loss parts."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        dtype = AMP_DTYPES[self.amp]
        with torch.autocast(self.device_type, dtype=dtype, enabled=dtype is not None):
            loss, parts = self.criterion(self.model(images), targets)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return parts


@dataclass
class TrainResult:
    """What :func:`train` did.

    ``losses``: the ``[box, obj, cls]`` loss parts of each step this call ran; ``images_per_s``:
    over those steps (the first, which pays for autotuning and allocation, is excluded when there
    is more than one); ``steps``: how many steps this call ran; ``step`` and ``epoch``: completed
    steps and epochs of the whole run (a resumed run counts the steps before the resume);
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
          stop: Callable[[], bool] | None = None) -> TrainResult:
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
    trainer = Trainer(model, img_size=img_size, amp=amp, lr=lr)
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
    started = first_done = epoch_began = time.perf_counter()
    epoch_images, interrupted, saved, saving_s = 0, False, None, 0.0
    while step < total:
        images, targets = synthetic_batch(batch_size, img_size, nc, generator=generator, dtype=dtype)
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        parts = trainer.step(images, targets.to(device))
        losses.append(parts.tolist())  # one host sync per step, for the log
        step += 1
        epoch_images += batch_size
        epoch_losses = [a + b for a, b in zip(epoch_losses, losses[-1])]
        if len(losses) == 1:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            first_done = time.perf_counter()
        if progress is not None:
            progress(step, total, losses[-1])
        epoch_end = step % steps_per_epoch == 0
        if epoch_end and save_dir is not None:
            in_epoch = (step - 1) % steps_per_epoch + 1
            row = dict(epoch=step // steps_per_epoch - 1, step=step)
            row.update(zip(rundir.RESULTS_COLUMNS[2:5], [v / in_epoch for v in epoch_losses]))
            row["images/s"] = epoch_images / max(time.perf_counter() - epoch_began, 1e-9)
            row.update((f"x/lr{i}", group["lr"]) for i, group in enumerate(trainer.optimizer.param_groups))
            rundir.append_results(save_dir, row)
        if epoch_end:
            epoch_losses, epoch_images, epoch_began = [0.0, 0.0, 0.0], 0, time.perf_counter()
        interrupted = stop is not None and stop() and step < total
        if save_dir is not None and (epoch_end or interrupted or (save_period and step % save_period == 0)):
            began_saving = time.perf_counter()
            saved = save()
            # images/s counts training only: the write moves the epoch's start (and the run's) on
            seconds = time.perf_counter() - began_saving
            epoch_began += seconds
            saving_s += seconds
        if interrupted:
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    ended = time.perf_counter() - saving_s
    ran = len(losses)
    if ran > 1:
        rate = (ran - 1) * batch_size / max(ended - first_done, 1e-9)
    else:
        rate = ran * batch_size / max(ended - started, 1e-9)
    return TrainResult(losses, rate, ran, step=step, epoch=step // steps_per_epoch, interrupted=interrupted,
                       last=saved)


__all__ = ["AMP_DTYPES", "TrainResult", "Trainer", "make_optimizer", "synthetic_batch", "synthetic_batches", "train"]
