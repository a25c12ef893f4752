"""Command line: ``python -m mobileops {info,check,bench,build} ...``."""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path


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
    except Exception as exc:
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


def _bench(args) -> int:
    import torch

    from mobileops.bench import cases, run

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    scope = args.scope or ("quick" if cuda else "cpu")
    if not cuda:
        print("No CUDA device: timing the CPU subset (the torch backend against eager PyTorch and eager "
              "with BatchNorm folded, and the detectors' inference latency). The triton and cuda kernels "
              "need a CUDA device.")
        if scope != "cpu":
            raise ValueError(f"scope {scope!r} needs a CUDA device; on a CPU only 'cpu' runs")
    selected = [c for c in cases.all_cases(scope)
                if c.kind in args.kinds and all(part in f"{c.group} {c.name}" for part in args.filter)]
    if not selected:
        raise ValueError(f"no benchmark case matches scope {scope!r}, kinds {args.kinds} and filter {args.filter}")
    compile_mode = None if (args.no_compile or not cuda) else args.compile_mode
    print(f"{len(selected)} cases, scope {scope!r}, device {device.type}"
          f"{', torch.compile mode ' + compile_mode if compile_mode else ''}", flush=True)
    document = run.run_cases(selected, device, compile_mode, progress=not args.quiet)
    print(run.summary_table(document["rows"]))
    if args.out is not None:
        print(f"wrote {run.write_results(document, args.out)}")
    failed = [r for r in document["rows"] if any(n.startswith("mobileops") for n in r["errors"])]
    for row in failed:
        print(f"FAILED {row['group']} {row['name']}: {row['errors']}", file=sys.stderr)
    return 1 if failed else 0


def _train(args) -> int:
    import torch

    import mobileops
    from mobileops import yolo
    from mobileops.bench.run import Progress
    from mobileops.yolo.train import train

    if args.data != "synthetic":
        raise ValueError(f"--data {args.data!r}: only 'synthetic' is built in; for real data use mobileops "
                         "modules inside a YOLOv5 training tree (see the README)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    model = yolo.build(args.cfg, nc=args.nc).to(device)
    bar = Progress(args.epochs * args.steps, stream=sys.stderr)

    def progress(done, total, parts):
        bar.step(f"loss box {parts[0]:.4f} obj {parts[1]:.4f} cls {parts[2]:.4f}")

    print(f"training {args.cfg} on {device.type} ({args.backend} backend), {args.epochs} epoch(s) x {args.steps} "
          f"steps of {args.batch_size} synthetic {args.img_size}px images, amp {args.amp}", flush=True)
    with mobileops.use_backend(args.backend):
        result = train(model, epochs=args.epochs, steps_per_epoch=args.steps, batch_size=args.batch_size,
                       img_size=args.img_size, amp=args.amp, channels_last=args.channels_last, lr=args.lr,
                       seed=args.seed, progress=None if args.quiet else progress)
    first, last = sum(result.losses[0]), sum(result.losses[-1])
    print(f"{result.images_per_s:.1f} images/s; loss {first:.4f} -> {last:.4f} (box, obj, cls "
          f"{', '.join(f'{v:.4f}' for v in result.losses[-1])})")
    return 0


def _build(args) -> int:
    import os
    import subprocess

    import mobileops

    root = Path(mobileops.__file__).resolve().parent.parent
    if not (root / "setup.py").is_file() or not (root / "csrc").is_dir():
        raise ValueError(f"build needs a source checkout installed with 'pip install -e .'; {root} has no "
                         "setup.py and csrc/")
    env = dict(os.environ, MOBILEOPS_BUILD_CUDA="1")
    if args.archs:
        env["MOBILEOPS_CUDA_ARCHS"] = args.archs
    print(f"building mobileops._C in {root} (MOBILEOPS_CUDA_ARCHS={env.get('MOBILEOPS_CUDA_ARCHS', '80;90')})",
          flush=True)
    done = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=root, env=env)
    if done.returncode != 0:
        print("error: the CUDA extension did not build (see the nvcc output above)", file=sys.stderr)
        return 1
    # A fresh interpreter reports what the new build can do (this one may hold the old module).
    return subprocess.run([sys.executable, "-m", "mobileops", "check"], cwd=root).returncode


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of ``python -m mobileops`` with all its subcommands.

    Each subcommand's namespace carries its handler in ``run`` (``args.run(args)`` executes it), so
    ``build_parser().parse_args(shlex.split(line)[3:])`` checks a documented command line without running it.

    Returns:
        A fresh :class:`argparse.ArgumentParser`; parsing with it has no side effects.
    """
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
    p = sub.add_parser("bench", help="time the fused ops, blocks and detectors against eager and torch.compile",
                       description="Time mobileops against eager PyTorch, eager with BatchNorm folded and "
                                   "torch.compile at the detectors' real shapes, print the ratios and write "
                                   "a results JSON. Exit status 1 if a mobileops implementation failed or "
                                   "disagreed with eager.")
    p.add_argument("--scope", choices=("cpu", "quick", "default", "full"), default=None,
                   help="which grid: 'quick' (default on a GPU, a few minutes), 'default', 'full'; "
                        "'cpu' (default without CUDA)")
    p.add_argument("--kinds", nargs="+", choices=("op", "block", "detector"), default=["op", "block", "detector"])
    p.add_argument("--filter", nargs="*", default=[], help="keep cases whose group and name contain every word")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                   help="folder for <device>-<date>.json (default benchmarks/results)")
    p.add_argument("--no-save", dest="out", action="store_const", const=None, help="write no results file")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--compile-mode", default="max-autotune-no-cudagraphs", help="torch.compile mode")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_bench)
    p = sub.add_parser("train", help="train a detector on synthetic data (the smallest end-to-end demo)")
    p.add_argument("--cfg", default="yolov5n-c3uib", help="shipped config name or yaml path")
    p.add_argument("--data", default="synthetic", help="only 'synthetic' (random images and boxes)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--steps", type=int, default=10, help="steps per epoch")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--img-size", type=int, default=320, help="a multiple of 32")
    p.add_argument("--nc", type=int, default=None, help="override the number of classes")
    p.add_argument("--amp", choices=("none", "fp16", "bf16"), default="none")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--backend", choices=("auto", "torch", "triton", "cuda"), default="auto")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_train)
    p = sub.add_parser("build", help="(re)build the CUDA extension mobileops._C in place (source checkout)")
    p.add_argument("--archs", default=None, help="compute capabilities, e.g. '90' or '80;90' (default 80;90)")
    p.set_defaults(run=_build)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m mobileops`` and the ``mobileops`` script.

    Args:
        argv: the arguments after the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
        The exit status: 0 on success, 2 for invalid input (printed as one ``error: ...`` line).
    """
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
