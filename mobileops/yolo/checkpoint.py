"""Training checkpoints: what ``weights/last.pt`` holds, and writing, reading and checking it.

A checkpoint is a plain dict of Python scalars, strings, lists, dicts and tensors, so
``torch.load(path, weights_only=True)`` reads it without unpickling any class::

    format        "mobileops-train-checkpoint"
    version       1
    model         the model's state_dict (YOLOv5's keys: model.0.conv.weight, ...), loadable
                  into ``yolo.build(cfg)`` and into its plain-PyTorch twin ``yolo.build(cfg, blocks="plain")``
    yaml          the model config as a dict (its ``name`` is the shipped name or file stem)
    optimizer     the optimizer's state_dict
    scaler        the GradScaler's state_dict ({} when AMP fp16 is off)
    epoch, step   completed epochs and completed steps over the whole run
    epoch_losses  the sums of the [box, obj, cls] loss parts over the steps of the unfinished epoch
    rng           {"torch": CPU generator state, "data": synthetic data generator state,
                  "cuda": [per-device states] when CUDA is initialised}
    opt           the run's resolved options (what ``opt.yaml`` holds)

:func:`save_checkpoint` writes atomically (a temporary file in the same folder, then
``os.replace``): a crash or a kill at any moment leaves the previous checkpoint whole.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mobileops.yolo.rundir import atomic_write

FORMAT = "mobileops-train-checkpoint"
VERSION = 1
_REQUIRED = ("model", "yaml", "optimizer", "scaler", "epoch", "step", "epoch_losses", "rng", "opt")


def save_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> Path:
    """Write ``checkpoint`` to ``path`` atomically and return the path.

    The dict is written to a temporary file next to ``path``, flushed to disk, then renamed
    over ``path`` with :func:`os.replace`; until that rename the previous file is untouched.

    Args:
        checkpoint: a dict of plain types and tensors (see :func:`make_checkpoint`).
        path: destination, e.g. ``runs/train/exp/weights/last.pt``; its folder is created.
    """
    return atomic_write(path, lambda f: torch.save(checkpoint, f))


def rng_states(data_generator: torch.Generator) -> dict[str, Any]:
    """The random states a resumed run needs to draw what the uninterrupted run would have.

    Args:
        data_generator: the generator of the synthetic batches.

    Returns:
        ``{"torch": ..., "data": ...}`` plus ``"cuda"`` (one state per device) when CUDA is initialised.
    """
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "data": data_generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any], data_generator: torch.Generator) -> None:
    """Set the random states saved by :func:`rng_states`.

    Args:
        states: the checkpoint's ``rng`` entry.
        data_generator: the synthetic data generator to set.
    """
    torch.set_rng_state(states["torch"])
    data_generator.set_state(states["data"])
    if "cuda" in states and torch.cuda.is_available():
        cuda_states = list(states["cuda"])[:torch.cuda.device_count()]
        for index, state in enumerate(cuda_states):
            torch.cuda.set_rng_state(state, index)


def _portable(value: Any) -> Any:
    """Tensors on the CPU (a checkpoint from a GPU loads anywhere), paths as strings, tuples as lists."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_portable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def make_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, *,
                    epoch: int, step: int, epoch_losses: list[float], data_generator: torch.Generator,
                    opt: dict[str, Any]) -> dict[str, Any]:
    """Collect the training state into a checkpoint dict (see the module docstring).

    Args:
        model: a :class:`~mobileops.yolo.DetectionModel` (its ``yaml`` is stored).
        optimizer: its optimizer.
        scaler: its GradScaler.
        epoch: completed epochs.
        step: completed steps since the start of the run.
        epoch_losses: sums of the ``[box, obj, cls]`` loss parts over the unfinished epoch's steps.
        data_generator: the synthetic data generator.
        opt: the run's options (plain types only).
    """
    state = dict(model=model.state_dict(), yaml=dict(getattr(model, "yaml", {})), optimizer=optimizer.state_dict(),
                 scaler=scaler.state_dict(), rng=rng_states(data_generator), opt=dict(opt))
    return dict(format=FORMAT, version=VERSION, **_portable(state), epoch=int(epoch), step=int(step),
                epoch_losses=[float(v) for v in epoch_losses])


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, with ``weights_only=True``, on the CPU.

    Args:
        path: the ``.pt`` file.

    Raises:
        FileNotFoundError: no such file (the message names it).
        ValueError: a truncated or corrupt file, not a torch file, or not a mobileops training
            checkpoint; the message names the file and what is wrong.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, not a checkpoint file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: an empty file, not a checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # weights_only refuses pickled classes: what ultralytics/yolov5 saves in its own last.pt
        raise ValueError(f"{path}: holds pickled Python objects (an ultralytics/yolov5 checkpoint, say); "
                         "only mobileops training checkpoints can be resumed") from None
    except (EOFError, zipfile.BadZipFile, RuntimeError, OSError) as exc:
        detail = re.sub(r"\x1b\[[0-9;]*m", "", " ".join(str(exc).split()))[:160]
        raise ValueError(f"{path}: not a readable checkpoint, truncated or corrupt ({type(exc).__name__}: "
                         f"{detail})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise ValueError(f"{path}: not a mobileops training checkpoint (no format={FORMAT!r} entry)")
    if checkpoint.get("version") != VERSION:
        raise ValueError(f"{path}: checkpoint version {checkpoint.get('version')!r}, this mobileops reads {VERSION}")
    missing = [key for key in _REQUIRED if key not in checkpoint]
    if missing:
        raise ValueError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
    return checkpoint


def check_compatible(model: nn.Module, state_dict: dict[str, torch.Tensor], path: str | Path) -> None:
    """Refuse a state_dict of another model structure, naming the file and the first difference.

    Args:
        model: the model the weights are meant for.
        state_dict: the checkpoint's ``model`` entry.
        path: the checkpoint file, for the message.

    Raises:
        ValueError: when keys or shapes differ.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    name = getattr(model, "yaml", {}).get("name", type(model).__name__)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} key(s) missing, e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
        raise ValueError(f"{path}: a checkpoint of another model than {name} ({'; '.join(parts)})")
    for key, value in own.items():
        theirs = state_dict[key]
        if not isinstance(theirs, torch.Tensor) or theirs.shape != value.shape:
            shape = tuple(theirs.shape) if isinstance(theirs, torch.Tensor) else type(theirs).__name__
            raise ValueError(f"{path}: a checkpoint of another model than {name} ({key} is {shape} in the file, "
                             f"{tuple(value.shape)} in the model)")


def load_weights(model: nn.Module, path_or_checkpoint: str | Path | dict[str, Any],
                 path: str | Path | None = None) -> nn.Module:
    """Load a checkpoint's model weights into ``model`` (a mobileops model or its plain twin).

    Args:
        model: built from the same config (``yolo.build(cfg)`` or ``yolo.build(cfg, blocks="plain")``).
        path_or_checkpoint: a checkpoint file, or a dict already read by :func:`load_checkpoint`.
        path: the file name for messages when a dict is given.

    Returns:
        ``model``, with the weights copied in.

    Raises:
        ValueError: a checkpoint of another model (see :func:`check_compatible`) or a bad file.
    """
    if isinstance(path_or_checkpoint, dict):
        checkpoint, path = path_or_checkpoint, path or "<checkpoint>"
    else:
        checkpoint, path = load_checkpoint(path_or_checkpoint), path_or_checkpoint
    check_compatible(model, checkpoint["model"], path)
    model.load_state_dict(checkpoint["model"], strict=True)
    return model


def latest_checkpoint(search_dir: str | Path = "runs/train") -> Path:
    """The most recently written ``last.pt`` under ``search_dir`` (YOLOv5's ``--resume`` default).

    Args:
        search_dir: folder searched recursively, e.g. the ``--project`` folder.

    Raises:
        FileNotFoundError: when it holds no ``last.pt``.
    """
    found = [p for p in Path(search_dir).glob("**/last.pt") if p.is_file()]
    if not found:
        raise FileNotFoundError(f"no last.pt under {search_dir} to resume; pass the checkpoint's path")
    return max(found, key=lambda p: p.stat().st_mtime)


__all__ = ["FORMAT", "VERSION", "check_compatible", "latest_checkpoint", "load_checkpoint", "load_weights",
           "make_checkpoint", "restore_rng_states", "rng_states", "save_checkpoint"]
