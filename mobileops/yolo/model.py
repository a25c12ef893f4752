"""YOLOv5 detection model assembled from a yaml config."""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mobileops import backend
from mobileops.nn import Detect, fuse_modules
from mobileops.reference import PLAIN_BLOCKS
from mobileops.yolo.parse import load_config, parse_model

#: BatchNorm settings YOLOv5 applies to every BatchNorm2d of a detector.
BN_EPS, BN_MOMENTUM = 1e-3, 0.03


class DetectionModel(nn.Module):
    """A YOLOv5 detector: ``model`` (the layers in yaml order) ending in a :class:`Detect` head.

    Args:
        cfg: a shipped config name (see :func:`mobileops.yolo.shipped_configs`), a path to a
            YOLOv5-style yaml file, or the parsed dict.
        ch: input image channels.
        nc: number of classes, overriding the config's ``nc``.
        blocks: ``"mobileops"`` (the drop-in blocks, running the fused ops) or ``"plain"``
            (the plain-PyTorch seed blocks of :mod:`mobileops.reference`: the eager baseline
            and the model users already have). Both have the same ``state_dict`` keys.

    ``state_dict`` keys are YOLOv5's (``model.<i>.<...>``). At construction the strides are
    measured with a 256x256 forward in eval mode (unlike YOLOv5, which runs it in training
    mode and so perturbs the fresh BN running statistics), anchors are reordered to follow
    the strides and divided by them, the head's biases get YOLOv5's prior, and every
    BatchNorm2d gets ``eps=1e-3, momentum=0.03``.
    """

    def __init__(self, cfg: str | Path | dict[str, Any] = "yolov5n", ch: int = 3,
                 nc: int | None = None, blocks: str = "mobileops"):
        super().__init__()
        if blocks not in ("mobileops", "plain"):
            raise ValueError(f"blocks must be 'mobileops' or 'plain', got {blocks!r}")
        self.yaml = load_config(cfg)
        if nc is not None:
            if not isinstance(nc, int) or isinstance(nc, bool) or nc < 1:
                raise ValueError(f"nc must be a positive integer, got {nc!r}")
            self.yaml["nc"] = nc
        if not isinstance(ch, int) or isinstance(ch, bool) or ch < 1:
            raise ValueError(f"ch must be a positive integer, got {ch!r}")
        self.model, self.save = parse_model(self.yaml, ch, PLAIN_BLOCKS if blocks == "plain" else None)
        self.blocks = blocks
        self.names = [str(i) for i in range(self.yaml["nc"])]
        self.ch = ch
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps, m.momentum = BN_EPS, BN_MOMENTUM
        head = self.model[-1]
        if not isinstance(head, Detect):
            raise ValueError(f"{self.yaml['name']}: the last layer must be Detect, got {type(head).__name__}")
        self._init_head(head)

    @torch.no_grad()
    def _init_head(self, head: Detect, size: int = 256) -> None:
        was_training = self.training
        self.eval()
        feats = self._forward_once(torch.zeros(1, self.ch, size, size))
        self.train(was_training)
        head.set_strides([size / f.shape[-2] for f in feats])
        # Order on the pixel anchors, then divide (the order of current YOLOv5).
        area = head.anchors.prod(-1).mean(-1).view(-1)
        da, ds = area[-1] - area[0], head.stride[-1] - head.stride[0]
        if da != 0 and (da.sign() != ds.sign()):
            head.anchors[:] = head.anchors.flip(0)
        head.anchors /= head.stride.view(-1, 1, 1)
        for conv, s in zip(head.m, head.stride.tolist()):
            b = conv.bias.view(head.na, -1)
            b[:, 4] += math.log(8 / (640 / s) ** 2)
            # Current YOLOv5's class prior (0.99999; before late 2021 it was 0.99, which at
            # nc=1 starts every class logit about 7 lower than YOLOv5 does now).
            b[:, 5:5 + head.nc] += math.log(0.6 / (head.nc - 0.99999))

    @property
    def stride(self) -> torch.Tensor:
        """Stride in pixels of each detection level."""
        return self.model[-1].stride

    def _forward_once(self, x: torch.Tensor):
        outputs: list[torch.Tensor | None] = []
        for m in self.model:
            if m.f != -1:
                x = outputs[m.f] if isinstance(m.f, int) else [x if j == -1 else outputs[j] for j in m.f]
            x = m(x)
            outputs.append(x if m.i in self.save else None)
        return x

    def forward(self, x: torch.Tensor):
        """Training mode: the list of raw (bs, na, ny, nx, nc + 5) maps. Eval mode:
        ``(decoded boxes (bs, N, nc + 5), that list)``."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"DetectionModel expects a 4-D (N, C, H, W) image batch, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[1] != self.ch:
            raise ValueError(f"DetectionModel expects {self.ch} input channels, got {x.shape[1]}")
        if not x.is_floating_point():
            raise TypeError(f"DetectionModel expects a floating-point image batch, got {x.dtype}")
        return self._forward_once(x)

    def fuse(self) -> DetectionModel:
        """Fold every BatchNorm2d into its convolution, seed blocks included, for inference."""
        fuse_modules(self.model)
        left = [name for name, m in self.named_modules() if isinstance(m, nn.BatchNorm2d)]
        if left:
            warnings.warn(f"fuse(): these BatchNorm2d could not be folded: {', '.join(left)}", stacklevel=2)
        for layer in self.model:
            layer.np = sum(p.numel() for p in layer.parameters())
        return self

    def info(self, img_size: int = 640) -> dict[str, Any]:
        """Size of the model: ``layers`` (modules), ``parameters``, ``gradients`` (trainable
        parameters) and ``gflops`` at ``img_size`` x ``img_size`` for one image (2 x the
        multiply-accumulates of every convolution and linear layer)."""
        if not isinstance(img_size, int) or img_size < 32 or img_size % 32:
            raise ValueError(f"img_size must be a positive multiple of 32, got {img_size!r}")
        return dict(
            layers=len(list(self.modules())),
            parameters=sum(p.numel() for p in self.parameters()),
            gradients=sum(p.numel() for p in self.parameters() if p.requires_grad),
            gflops=count_flops(self, (1, self.ch, img_size, img_size)) / 1e9,
        )


def count_flops(model: nn.Module, input_shape) -> int:
    """FLOPs of one eval-mode forward of ``model`` on zeros of ``input_shape``.

    Runs on a copy on the meta device, so it is fast, allocates nothing and leaves the model
    (and its BN statistics) untouched.
    """
    meta = copy.deepcopy(model).to("meta").eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        dtype = next(meta.parameters(), torch.empty(0)).dtype
        meta(torch.zeros(input_shape, device="meta", dtype=dtype))
    return int(counter.get_total_flops())


def fused_op_calls(model: nn.Module, input_shape, training: bool = False) -> list[dict]:
    """The fused-op calls one forward of ``model`` on ``input_shape`` makes, in order (see
    :func:`mobileops.backend.record_calls`): the real layer shapes for tests and benchmarks.

    Runs on a meta-device copy with the torch backend, so nothing is computed or changed.
    """
    meta = copy.deepcopy(model).to("meta").train(training)
    dtype = next(meta.parameters(), torch.empty(0)).dtype
    with backend.use_backend("torch"), backend.record_calls() as calls, torch.no_grad():
        meta(torch.zeros(input_shape, device="meta", dtype=dtype))
    return calls
