"""A training run's folder, as YOLOv5 lays it out: ``runs/train/exp``, ``exp2``, ... holding
``weights/last.pt``, ``opt.yaml`` (the resolved options) and ``results.csv`` (one row per epoch).
Every file of it is replaced atomically (:func:`atomic_write`)."""

from __future__ import annotations

import csv
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

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


def atomic_write(path: str | Path, write: Callable[[IO], None], binary: bool = True) -> Path:
    """Replace ``path`` with what ``write(file)`` writes, atomically, and return the path.

    The content goes to a temporary file in the same folder (created with the permissions a
    plain ``open`` would give it), is flushed to disk, and then renamed over ``path`` with
    :func:`os.replace`: until that rename the previous file is untouched, so a crash or a kill
    at any moment leaves either the old file or the new one, whole.

    Args:
        path: the file to replace; its folder is created.
        write: called once with the open temporary file.
        binary: open it in binary mode (else text, with ``newline=""`` for csv).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", newline="")) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that a killed :func:`atomic_write` left in ``folder``.

    Args:
        folder: e.g. the run's ``weights`` folder (a run starting or resuming there).

    Returns:
        The files removed.
    """
    removed = [p for p in Path(folder).glob(".*.tmp") if p.is_file()]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def write_options(save_dir: str | Path, options: dict[str, Any]) -> Path:
    """Write the run's resolved options to ``<save_dir>/opt.yaml`` and return its path.

    Args:
        save_dir: the run folder.
        options: plain values (paths as strings).
    """
    text = yaml.safe_dump(options, sort_keys=False)
    return atomic_write(Path(save_dir) / "opt.yaml", lambda f: f.write(text), binary=False)


def append_results(save_dir: str | Path, row: dict[str, Any]) -> Path:
    """Append one epoch's row to ``<save_dir>/results.csv``, writing the header for a new file.

    Args:
        save_dir: the run folder.
        row: values keyed by column name (:data:`RESULTS_COLUMNS`, then ``x/lr<i>`` per
            optimizer parameter group as in YOLOv5), in that order.
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
        atomic_write(path, lambda f: csv.writer(f).writerows(kept), binary=False)


__all__ = ["RESULTS_COLUMNS", "append_results", "atomic_write", "increment_path", "keep_results_before",
           "remove_stale_temporaries", "write_options"]
