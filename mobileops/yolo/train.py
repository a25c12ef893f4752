"""A minimal YOLOv5 training loop: synthetic data, SGD with momentum, the YOLOv5 loss, AMP.

It is the smallest end-to-end demonstration (``python -m mobileops train``) and what the
training-parity tests and the train-step benchmark run; real training belongs in a YOLOv5
tree (see the README: import the blocks, or ``mobileops.convert`` an existing model).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

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
    """Per-step loss parts, and images per second over the timed steps (the first step, which
    pays for autotuning and allocation, is excluded when there is more than one)."""

    losses: list[list[float]]
    images_per_s: float
    steps: int


def train(model: nn.Module, *, epochs: int = 1, steps_per_epoch: int = 10, batch_size: int = 8,
          img_size: int = 320, amp: str = "none", channels_last: bool = False, lr: float = 0.01, seed: int = 0,
          progress: Callable[[int, int, list[float]], None] | None = None) -> TrainResult:
    """Train ``model`` in place on synthetic data; see :class:`Trainer` for the step.

    ``progress(done, total, parts)`` is called after every step.
    """
    for name, value in (("epochs", epochs), ("steps_per_epoch", steps_per_epoch), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"train: {name} must be a positive integer, got {value!r}")
    if img_size % 32:
        raise ValueError(f"train: img_size must be a multiple of 32 (the largest stride), got {img_size}")
    device = next(model.parameters()).device
    if channels_last:
        model.to(memory_format=torch.channels_last)
    trainer = Trainer(model, img_size=img_size, amp=amp, lr=lr)
    nc = trainer.criterion.nc
    total = epochs * steps_per_epoch
    losses, timed_images = [], 0
    began = time.perf_counter() if total == 1 else None
    for done, (images, targets) in enumerate(synthetic_batches(total, batch_size, img_size, nc, seed), start=1):
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        parts = trainer.step(images, targets.to(device))
        losses.append(parts.tolist())  # one host sync per step, for the log
        if began is None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            began = time.perf_counter()
        else:
            timed_images += batch_size
        if progress is not None:
            progress(done, total, losses[-1])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if total == 1:
        timed_images = batch_size
    return TrainResult(losses, timed_images / (time.perf_counter() - began), total)


__all__ = ["AMP_DTYPES", "TrainResult", "Trainer", "make_optimizer", "synthetic_batch", "synthetic_batches", "train"]
