"""YOLOv5 detectors assembled from YOLOv5-style yaml files.

>>> import mobileops.yolo as yolo
>>> model = yolo.build("yolov5n-c3uib")           # or a path to your own yaml
>>> yolo.register("MyBlock", MyBlock, "conv")      # make a block usable in yaml
>>> loss, parts = yolo.YOLOv5Loss.for_model(model)(model(images), targets)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mobileops.yolo.loss import YOLOv5Loss, bbox_ciou, pack_targets
from mobileops.yolo.model import DetectionModel, count_flops, fused_op_calls
from mobileops.yolo.parse import ceil_to_multiple, load_config, parse_model, shipped_configs
from mobileops.yolo.registry import KINDS, known_modules, register


def build(cfg: str | Path | dict[str, Any], nc: int | None = None, ch: int = 3,
          blocks: str = "mobileops") -> DetectionModel:
    """Build a :class:`DetectionModel` from a shipped config name, a yaml path or a dict.

    Args:
        cfg: e.g. ``"yolov5n"``, ``"yolov5s"``, ``"yolov5n-c3uib"``, ``"yolov5-mobilenetv3"``
            or ``"path/to/model.yaml"``.
        nc: number of classes, overriding the config's.
        ch: input channels.
        blocks: ``"mobileops"`` (fused drop-in blocks) or ``"plain"`` (the plain-PyTorch seed
            blocks, same ``state_dict`` keys).
    """
    return DetectionModel(cfg, ch=ch, nc=nc, blocks=blocks)


__all__ = ["KINDS", "DetectionModel", "YOLOv5Loss", "bbox_ciou", "build", "ceil_to_multiple", "count_flops",
           "fused_op_calls", "known_modules", "load_config", "pack_targets", "parse_model", "register",
           "shipped_configs"]
