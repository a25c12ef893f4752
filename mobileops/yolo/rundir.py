"""A training run's folder, as YOLOv5 lays it out: ``runs/train/exp``, ``exp2``, ... holding
``weights/last.pt``, ``opt.yaml`` (the resolved options) and ``results.csv`` (one row per epoch)."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import yaml

RESULTS_COLUMNS = ("epoch", "step", "train/box_loss", "train/obj_loss", "train/cls_loss", "images/s")


def increment_path(path: str | Path, exist_ok: bool = False) -> Path:
    """``path`` if it does not exist (or ``exist_ok``), else ``path2``, ``path3``, ... (YOLOv5's rule).

    Args:
        path: e.g. ``runs/train/exp``.
        exist_ok: reuse ``path`` even if it exists.

    Returns:
        The first free path; nothing is created.
    """
    path = Path(path)
    if exist_ok or not path.exists():
        return path
    index = 2
    while (candidate := path.with_name(f"{path.name}{index}")).exists():
        index += 1
    return candidate


def write_options(save_dir: str | Path, options: dict[str, Any]) -> Path:
    """Write the run's resolved options to ``<save_dir>/opt.yaml`` and return its path.

    Args:
        save_dir: the run folder.
        options: plain values (paths as strings).
    """
    path = Path(save_dir) / "opt.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".opt.yaml.tmp")
    tmp.write_text(yaml.safe_dump(options, sort_keys=False))
    os.replace(tmp, path)
    return path


def results_header(lr_groups: int) -> list[str]:
    """Column names of ``results.csv`` for an optimizer with ``lr_groups`` parameter groups.

    Args:
        lr_groups: number of optimizer parameter groups (one ``x/lr<i>`` column each, as in YOLOv5).
    """
    return list(RESULTS_COLUMNS) + [f"x/lr{i}" for i in range(lr_groups)]


def append_results(save_dir: str | Path, row: dict[str, Any]) -> Path:
    """Append one epoch's row to ``<save_dir>/results.csv``, writing the header for a new file.

    Args:
        save_dir: the run folder.
        row: values keyed by :func:`results_header`'s names, in that order.
    """
    path = Path(save_dir) / "results.csv"
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(list(row))
        writer.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row.values()])
    return path


def keep_results_before(save_dir: str | Path, epoch: int) -> None:
    """Drop the rows of epochs ``>= epoch`` from ``results.csv`` (a resumed run writes them again).

    Args:
        save_dir: the run folder.
        epoch: the first epoch the resumed run will run (its checkpoint's completed epochs).
    """
    path = Path(save_dir) / "results.csv"
    if not path.exists():
        return
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    kept = [rows[0]] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) < epoch]
    if len(kept) != len(rows):
        tmp = path.with_name(".results.csv.tmp")
        with tmp.open("w", newline="") as f:
            csv.writer(f).writerows(kept)
        os.replace(tmp, path)


__all__ = ["RESULTS_COLUMNS", "append_results", "increment_path", "keep_results_before", "results_header",
           "write_options"]
