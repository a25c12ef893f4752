"""Command line: ``python -m mobileops {info,check} ...``."""

from __future__ import annotations

import argparse
import platform
import sys
from typing import List, Optional


def _info(args) -> int:
    from mobileops import yolo

    model = yolo.build(args.cfg, nc=args.nc)
    if args.fuse:
        model.fuse()
    print(f"{'':>3}{'from':>18}{'n':>4}{'params':>11}  {'module':<34}arguments")
    for layer in model.model:
        print(f"{layer.i:>3}{str(layer.f):>18}{layer.n:>4}{layer.np:>11,}  {layer.type:<34}{layer.args}")
    info = model.info(img_size=args.img)
    print(f"{model.yaml['name']}{' (fused)' if args.fuse else ''}: {info['layers']} layers, "
          f"{info['parameters']:,} parameters, {info['gradients']:,} gradients, "
          f"{info['gflops']:.2f} GFLOPs at {args.img}x{args.img}")
    return 0


def _check(args) -> int:
    import torch

    import mobileops
    from mobileops import backend

    print(f"mobileops {mobileops.__version__}  python {platform.python_version()}  torch {torch.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        print(f"triton: not importable ({type(exc).__name__}: {exc})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            print(f"cuda:{i} {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]}), torch CUDA {torch.version.cuda}")
    else:
        print(f"CUDA device: none visible to torch (torch CUDA build: {torch.version.cuda or 'no'})")
    try:
        from mobileops import _C

        print(f"CUDA extension: built against CUDA runtime {_C.runtime_version()}, "
              f"ops: {', '.join(_C.implemented_ops()) or 'none yet'}")
    except ImportError as exc:
        print(f"CUDA extension: not built ({exc})")
    print(f"selected backend: {mobileops.get_backend()}")
    for name, problem in mobileops.backend_status().items():
        ops = ", ".join(backend.implemented_ops(name)) or "none"
        print(f"  {name:<7} {'available' if problem is None else 'unavailable: ' + problem}; implements: {ops}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``python -m mobileops`` and the ``mobileops`` script."""
    parser = argparse.ArgumentParser(prog="python -m mobileops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="per-layer table and size of a detector config")
    p.add_argument("cfg", help="shipped config name (yolov5n, yolov5s, yolov5n-c3uib, "
                               "yolov5-mobilenetv3) or a yaml path")
    p.add_argument("--img", type=int, default=640, help="image size for the GFLOPs count")
    p.add_argument("--nc", type=int, default=None, help="override the number of classes")
    p.add_argument("--fuse", action="store_true", help="fold BatchNorms first")
    p.set_defaults(run=_info)
    p = sub.add_parser("check", help="environment and backend availability")
    p.set_defaults(run=_check)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
