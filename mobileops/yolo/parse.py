"""YOLOv5-style yaml: loading and turning rows ``[from, n, module, args]`` into layers."""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from mobileops.yolo.registry import lookup

CONFIG_DIR = Path(__file__).parent / "configs"
_REQUIRED_KEYS = ("nc", "depth_multiple", "width_multiple", "anchors", "backbone", "head")


def shipped_configs() -> tuple[str, ...]:
    """Names of the configs shipped with mobileops (``mobileops/yolo/configs``)."""
    return tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))


def load_config(cfg: str | Path | dict[str, Any]) -> dict[str, Any]:
    """Return a validated copy of a config given as a shipped name, a yaml path or a dict.

    The result has a ``name`` key (the shipped name or file stem) used in error messages.
    """
    if isinstance(cfg, dict):
        data, name = copy.deepcopy(cfg), str(cfg.get("name", "<dict>"))
    elif isinstance(cfg, (str, Path)):
        shipped = CONFIG_DIR / f"{Path(str(cfg)).stem}.yaml"
        path = Path(cfg)
        if not path.is_file():
            if str(cfg) not in shipped_configs() and str(cfg) not in {f"{n}.yaml" for n in shipped_configs()}:
                raise FileNotFoundError(f"config {str(cfg)!r} is neither a file nor a shipped config "
                                        f"({', '.join(shipped_configs())})")
            path = shipped
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid yaml ({exc})") from None
        name = path.stem
    else:
        raise TypeError(f"cfg must be a config name, a path or a dict, got {type(cfg).__name__}")
    if not isinstance(data, dict):
        raise ValueError(f"{name}: a model config must be a yaml mapping, got {type(data).__name__}")
    missing = [k for k in _REQUIRED_KEYS if k not in data]
    if missing:
        raise ValueError(f"{name}: missing key(s) {', '.join(missing)}")
    if not isinstance(data["nc"], int) or isinstance(data["nc"], bool) or data["nc"] < 1:
        raise ValueError(f"{name}: nc must be a positive integer, got {data['nc']!r}")
    for key in ("depth_multiple", "width_multiple"):
        if not isinstance(data[key], numbers.Real) or isinstance(data[key], bool) or data[key] <= 0:
            raise ValueError(f"{name}: {key} must be a positive number, got {data[key]!r}")
    anchors = data["anchors"]
    if (not isinstance(anchors, list) or not anchors
            or not all(isinstance(a, list) and a and len(a) % 2 == 0
                       and all(isinstance(v, numbers.Real) for v in a) for a in anchors)):
        raise ValueError(f"{name}: anchors must be a list of levels, each a flat list of "
                         f"(w, h) pixel pairs; got {anchors!r}")
    for key in ("backbone", "head"):
        if not isinstance(data[key], list):
            raise ValueError(f"{name}: {key} must be a list of [from, number, module, args] rows")
    data["name"] = name
    return data


def ceil_to_multiple(x: float, divisor: int = 8) -> int:
    """YOLOv5's channel rounding: the smallest multiple of ``divisor`` that is >= ``x``."""
    return int(math.ceil(x / divisor) * divisor)


def _resolve_arg(value, nc, anchors):
    if isinstance(value, str):
        return {"nc": nc, "anchors": anchors, "None": None, "True": True, "False": False}.get(value, value)
    return value


def parse_model(cfg: dict[str, Any], ch: int,
                classes: Mapping[str, type] | None = None) -> tuple[nn.Sequential, list[int]]:
    """Build the layers of a validated config (see :func:`load_config`) for ``ch`` input channels.

    ``classes`` maps module names to classes that replace the registered ones (same kind), e.g.
    :data:`mobileops.reference.PLAIN_BLOCKS` for a plain-PyTorch twin.

    Returns ``(layers, save)``: an ``nn.Sequential`` whose children carry ``i`` (index),
    ``f`` (from), ``type``, ``n``, ``args`` and ``np`` (parameter count), and the sorted
    indices of the layers whose outputs later layers read.
    """
    name, nc, anchors = cfg["name"], cfg["nc"], cfg["anchors"]
    gd, gw = cfg["depth_multiple"], cfg["width_multiple"]
    no = (len(anchors[0]) // 2) * (nc + 5)
    rows = [("backbone", j, r) for j, r in enumerate(cfg["backbone"])] + \
           [("head", j, r) for j, r in enumerate(cfg["head"])]
    if not rows:
        raise ValueError(f"{name}: backbone and head are empty")
    layers, save, channels = [], [], []
    for i, (section, j, row) in enumerate(rows):
        where = f"{name}: layer {i} ({section} row {j}: {row!r})"
        if not isinstance(row, list) or len(row) != 4:
            raise ValueError(f"{where}: a row must be [from, number, module, args]")
        f, n, module_name, args = row
        sources = [f] if isinstance(f, int) and not isinstance(f, bool) else f
        if (not isinstance(sources, list) or not sources
                or not all(isinstance(s, int) and not isinstance(s, bool) for s in sources)):
            raise ValueError(f"{where}: 'from' must be an integer or a list of integers")
        resolved = []
        for s in sources:
            if s == -1:
                resolved.append(-1)
            elif 0 <= s < i or -i <= s < -1:
                resolved.append(s % i)
            else:
                raise ValueError(f"{where}: 'from' index {s} does not name an earlier layer")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{where}: number must be a positive integer, got {n!r}")
        if not isinstance(module_name, str):
            raise ValueError(f"{where}: module must be a name, got {module_name!r}")
        if not isinstance(args, list):
            raise ValueError(f"{where}: args must be a list, got {args!r}")
        try:
            cls, kind = lookup(module_name)
        except KeyError as exc:
            raise ValueError(f"{where}: {exc.args[0]}") from None
        cls = (classes or {}).get(module_name, cls)
        if kind == "detect" and i != len(rows) - 1:
            raise ValueError(f"{where}: the detection head must be the last layer")

        def in_channels(s, i=i):
            return ch if s == -1 and i == 0 else channels[s]

        single = kind in ("conv", "csp", "verbatim", "channels", "passthrough")
        if single and len(sources) != 1:
            raise ValueError(f"{where}: {module_name} takes one input, got 'from' {f!r}")
        args = [_resolve_arg(a, nc, anchors) for a in args]
        n = repeats = max(round(n * gd), 1) if n > 1 else n
        c1 = in_channels(resolved[0])
        if kind in ("conv", "csp", "verbatim"):
            if not args or not isinstance(args[0], int) or isinstance(args[0], bool):
                raise ValueError(f"{where}: {module_name} needs its output channels as the first arg")
            c2 = args[0]
            if kind != "verbatim" and c2 != no:
                c2 = ceil_to_multiple(c2 * gw, 8)
            args = [c1, c2, *args[1:]] if kind != "verbatim" else [c1, *args]
            if kind == "csp":
                args.insert(2, n)
                n = 1
        elif kind == "channels":
            c2, args = c1, [c1, *args]
        elif kind == "concat":
            c2 = sum(in_channels(s) for s in resolved)
        elif kind == "detect":
            args.append([in_channels(s) for s in resolved])
            c2 = None
        else:
            c2 = c1
        try:
            module = nn.Sequential(*(cls(*args) for _ in range(n))) if n > 1 else cls(*args)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {module_name}{tuple(args)} failed: {exc}") from None
        module.i, module.type, module.n, module.args = i, module_name, repeats, args
        module.f = resolved[0] if isinstance(f, int) else resolved
        module.np = sum(p.numel() for p in module.parameters())
        save.extend(s for s in resolved if s != -1)
        layers.append(module)
        channels.append(c2)
    return nn.Sequential(*layers), sorted(set(save))
