"""Command line: ``python -m mobileops {info,check,bench,train,build} ...``."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

#: Exit status after Ctrl-C (128 + SIGINT), as a shell reports it.
EXIT_INTERRUPTED = 130


class UsageError(ValueError):
    """A command-line value that is not allowed; printed as one ``error: ...`` line, exit status 2."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _check_img(value: int, stride: int | None = None) -> int:
    """``--img`` must be positive and, once the model is known, a multiple of its largest stride."""
    if value < 1 or (stride is not None and value % stride):
        raise UsageError(f"--img {value}: the image size must be a positive multiple of {stride or 32} "
                         "(the detector's largest stride), e.g. 320 or 640")
    return value


def _resolve_device(spec: str | None):
    """``--device`` as a torch.device: cpu, cuda, cuda:N, or YOLOv5's bare index N; None picks cuda if
    available, else cpu."""
    import torch

    if spec is None or spec == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = spec.strip().lower()
    allowed = "cpu, cuda, cuda:N or a CUDA device index N"
    if text.isdigit():
        text = f"cuda:{text}"
    if "," in text:
        raise UsageError(f"--device {spec}: one device only (this loop trains on a single device); allowed: {allowed}")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {spec}: not a device; allowed: {allowed}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available here (torch CUDA build: "
                             f"{torch.version.cuda or 'none'}, no usable device); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: no such CUDA device (this machine has "
                             f"{torch.cuda.device_count()}: 0-{torch.cuda.device_count() - 1})")
    elif device.type != "cpu":
        raise UsageError(f"--device {spec}: {device.type} is not supported; allowed: {allowed}")
    return device


def _resolve_backend(flag_value: str | None, device=None) -> str:
    """The backend a command will run: ``--backend`` if given, else ``MOBILEOPS_BACKEND``, else auto.
    A named backend that cannot run here (on ``device``) is a UsageError naming the flag or variable."""
    from mobileops import backend

    if flag_value is not None:
        name, source = flag_value, "--backend"
    else:
        name, source = backend.get_backend(), f"{backend.ENV_VAR}"  # ValueError for an unknown name
    if name == "auto":
        return name
    problem = backend._backend_problem(name, device)
    if problem is not None:
        usable = ", ".join(["auto"] + backend.available_backends())
        setting = f"{source} {name}" if source == "--backend" else f"{source}={name}"
        raise UsageError(f"{setting}: the {name} backend cannot run here ({problem}); usable here: {usable}")
    return name


def _info(args) -> int:
    from mobileops import yolo

    _check_img(args.imgsz)
    _resolve_backend(None)
    model = yolo.build(args.cfg, nc=args.nc)
    _check_img(args.imgsz, int(max(model.stride.tolist())))
    if args.fuse:
        model.fuse()
    print(f"{'':>3}{'from':>18}{'n':>4}{'params':>11}  {'module':<34}arguments")
    for layer in model.model:
        print(f"{layer.i:>3}{str(layer.f):>18}{layer.n:>4}{layer.np:>11,}  {layer.type:<34}{layer.args}")
    info = model.info(img_size=args.imgsz)
    print(f"{model.yaml['name']}{' (fused)' if args.fuse else ''}: {info['layers']} layers, "
          f"{info['parameters']:,} parameters, {info['gradients']:,} gradients, "
          f"{info['gflops']:.2f} GFLOPs at {args.imgsz}x{args.imgsz}")
    return 0


def _check(args) -> int:
    import torch

    import mobileops
    from mobileops import backend

    print(f"mobileops {mobileops.__version__}  python {platform.python_version()}  torch {torch.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except Exception as exc:  # reported, not fatal
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
    status = mobileops.backend_status()
    selected = mobileops.get_backend()
    problem = status.get(selected)
    print(f"selected backend: {selected}" + ("" if problem is None else f" (unusable here: {problem})"))
    for name, why in status.items():
        ops = ", ".join(backend.implemented_ops(name)) or "none"
        print(f"  {name:<7} {'available' if why is None else 'unavailable: ' + why}; implements: {ops}")
    if problem is not None:
        print(f"error: the selected backend {selected} ({backend.ENV_VAR}={os.environ.get(backend.ENV_VAR, '')}) "
              f"cannot run here: {problem}", file=sys.stderr)
        return 2
    return 0


def _bench(args) -> int:
    from mobileops.bench import cases, run

    device = _resolve_device(args.device)
    _resolve_backend(None, device)
    cuda = device.type == "cuda"
    scope = args.scope or ("quick" if cuda else "cpu")
    if not cuda and scope != "cpu":
        raise UsageError(f"--scope {scope} needs a CUDA device; on a CPU only --scope cpu runs")
    if not cuda:
        print("No CUDA device: timing the CPU subset (the torch backend against eager PyTorch and eager "
              "with BatchNorm folded, and the detectors' inference latency). The triton and cuda kernels "
              "need a CUDA device.")
    selected = [c for c in cases.all_cases(scope)
                if c.kind in args.kinds and all(part in f"{c.group} {c.name}" for part in args.filter)]
    if not selected:
        raise ValueError(f"no benchmark case matches scope {scope!r}, kinds {args.kinds} and filter {args.filter}")
    compile_mode = None if (args.no_compile or not cuda) else args.compile_mode
    print(f"{len(selected)} cases, scope {scope!r}, device {device.type}"
          f"{', torch.compile mode ' + compile_mode if compile_mode else ''}", flush=True)
    document = run.run_cases(selected, device, compile_mode, progress=not args.quiet)
    rows = document["rows"]
    interrupted = document.get("interrupted", False)
    if rows:
        print(run.summary_table(rows))
    written = run.write_results(document, args.out) if args.out is not None and rows else None
    if written is not None:
        print(f"wrote {written}")
    if interrupted:
        kept = f"kept the {len(rows)} of {len(selected)} cases measured" if rows else "no case was measured"
        print(f"interrupted: {kept}{f', written to {written}' if written else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED
    failed = [r for r in rows if any(n.startswith("mobileops") for n in r["errors"])]
    for row in failed:
        print(f"FAILED {row['group']} {row['name']}: {row['errors']}", file=sys.stderr)
    return 1 if failed else 0


#: Options a resumed run may change; the rest come from the checkpoint (YOLOv5's --resume rule).
#: --cfg/--nc may be given but must describe the checkpoint's model; the folder options choose
#: where a checkpoint kept outside a run's weights/ folder continues (and, for a bare --resume,
#: --project is where the latest run is looked for). The backend is never taken from the
#: checkpoint: it is the one named here (--backend, MOBILEOPS_BACKEND, else auto), like the device.
_RESUME_MAY_CHANGE = {"resume", "device", "backend", "quiet", "project", "name", "exist_ok", "epochs",
                      "save_period", "cfg", "nc", "cuda_graph", "compile"}
_TRAIN_OPTIONS = ("cfg", "data", "epochs", "steps", "batch_size", "imgsz", "nc", "amp", "channels_last",
                  "backend", "lr", "seed", "save_period", "cuda_graph", "compile")
# how to run, not what: taken from this command line, never from the checkpoint
_RESUME_FROM_CHECKPOINT = tuple(dest for dest in _TRAIN_OPTIONS if dest not in ("backend", "cuda_graph", "compile"))


def _resume_path(value, project: str) -> Path:
    from mobileops.yolo import checkpoint

    if value is True:
        try:
            return checkpoint.latest_checkpoint(project)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"--resume: {exc}") from None
    path = Path(value)
    if path.is_dir():
        for candidate in (path / "weights" / "last.pt", path / "last.pt"):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"--resume {path}: a folder without weights/last.pt")
    if not path.exists():
        raise FileNotFoundError(f"--resume {path}: no such file")
    return path


def _flag(dest: str) -> str:
    return "--img" if dest == "imgsz" else "--" + dest.replace("_", "-")


def _train(args) -> int:
    import torch

    import mobileops
    from mobileops import yolo
    from mobileops.bench.run import Progress
    from mobileops.interrupt import GracefulInterrupt
    from mobileops.yolo import checkpoint, rundir
    from mobileops.yolo.train import train

    explicit = getattr(args, "explicit", set())
    resumed = None
    if args.resume:
        path = _resume_path(args.resume, args.project)
        resumed = checkpoint.load_checkpoint(path)
        saved = resumed["opt"]
        for dest in sorted(explicit - _RESUME_MAY_CHANGE):
            if dest in saved and getattr(args, dest) != saved[dest]:
                raise UsageError(f"{_flag(dest)} {getattr(args, dest)}: --resume {path} continues the run with its "
                                 f"own options ({_flag(dest)} {saved[dest]}); drop the flag or start a new run")
        in_run_folder = path.parent.name == "weights"
        folder_flags = {"name", "exist_ok"} | ({"project"} if args.resume is not True else set())
        clash = sorted(explicit & folder_flags) if in_run_folder else []
        if clash:
            raise UsageError(f"{_flag(clash[0])}: --resume {path} continues in its own run folder "
                             f"{path.parent.parent}; drop {_flag(clash[0])}")
        for dest in _RESUME_FROM_CHECKPOINT:
            if dest in saved and dest not in explicit & _RESUME_MAY_CHANGE:
                setattr(args, dest, saved[dest])
    if args.data != "synthetic":
        raise UsageError(f"--data {args.data!r}: only 'synthetic' is built in; for real data use mobileops "
                         "modules inside a YOLOv5 training tree (see the README)")
    _check_img(args.imgsz)
    device = _resolve_device(args.device)
    backend_name = _resolve_backend(args.backend, device)
    if args.cuda_graph and device.type != "cuda":
        raise UsageError(f"--cuda-graph: CUDA graphs need a CUDA device; this run is on {device} (drop --cuda-graph)")
    if args.cuda_graph and args.compile in ("reduce-overhead", "max-autotune"):
        raise UsageError(f"--compile {args.compile} captures CUDA graphs itself; with --cuda-graph use "
                         "default or max-autotune-no-cudagraphs")
    total = args.epochs * args.steps
    if resumed is not None:
        if "cfg" in explicit or "nc" in explicit:
            model = yolo.build(args.cfg, nc=args.nc)
        else:
            model = yolo.build(resumed["yaml"])
        checkpoint.check_compatible(model, resumed["model"], path)
        if resumed["step"] >= total:
            raise UsageError(f"--resume {path}: the run finished ({resumed['step']} of {total} steps); "
                             "nothing to resume (pass a larger --epochs to train on)")
        save_dir = path.parent.parent if in_run_folder else \
            rundir.increment_path(Path(args.project) / args.name, args.exist_ok)
    else:
        save_dir = rundir.increment_path(Path(args.project) / args.name, args.exist_ok)
        torch.manual_seed(args.seed)
        model = yolo.build(args.cfg, nc=args.nc)
    _check_img(args.imgsz, int(max(model.stride.tolist())))
    model = model.to(device)
    options = {dest: getattr(args, dest) for dest in _TRAIN_OPTIONS}
    options.update(cfg=str(args.cfg), backend=backend_name, device=str(device), project=str(args.project),
                   name=args.name, save_dir=str(save_dir))
    bar = Progress(total - (resumed["step"] if resumed else 0), stream=sys.stderr)

    def progress(done, total, parts):
        bar.step(f"loss box {parts[0]:.4f} obj {parts[1]:.4f} cls {parts[2]:.4f}")

    if resumed is not None:
        print(f"resuming {path} at step {resumed['step']} of {total} (epoch {resumed['epoch']}), "
              f"results in {save_dir}", flush=True)
    print(f"training {model.yaml['name']} on {device.type} ({backend_name} backend), {args.epochs} epoch(s) x "
          f"{args.steps} steps of {args.batch_size} synthetic {args.imgsz}px images, amp {args.amp}; "
          f"run folder {save_dir}", flush=True)
    last = save_dir / "weights" / "last.pt"
    try:
        with mobileops.use_backend(backend_name), GracefulInterrupt() as interrupt:
            result = train(model, epochs=args.epochs, steps_per_epoch=args.steps, batch_size=args.batch_size,
                           img_size=args.imgsz, amp=args.amp, channels_last=args.channels_last, lr=args.lr,
                           seed=args.seed, progress=None if args.quiet else progress, save_dir=save_dir,
                           save_period=max(args.save_period, 0), options=options, resume=resumed,
                           stop=interrupt.requested, cuda_graph=args.cuda_graph, compile=args.compile)
    except KeyboardInterrupt:  # the second Ctrl-C: stopped mid-step, the previous checkpoint stays
        kept = f"the last checkpoint written is kept: {last}" if last.is_file() else "no checkpoint was written yet"
        print(f"interrupted at once; {kept}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    if result.interrupted:
        print(f"interrupted at step {result.step} of {total}: saved {last} "
              f"(continue with: python -m mobileops train --resume {last})", flush=True)
        return EXIT_INTERRUPTED
    if result.losses:
        first, final = sum(result.losses[0]), sum(result.losses[-1])
        print(f"{result.images_per_s:.1f} images/s; loss {first:.4f} -> {final:.4f} (box, obj, cls "
              f"{', '.join(f'{v:.4f}' for v in result.losses[-1])})")
    print(f"results saved to {save_dir} (weights/last.pt, results.csv, opt.yaml)")
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


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``error: ...``, exit status 2), like the
    CLI's own checks, instead of the usage block followed by the message."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: ...)`` where there is a default worth showing (not None or a False switch)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of ``python -m mobileops`` with all its subcommands.

    Each subcommand's namespace carries its handler in ``run`` (``args.run(args)`` executes it), so
    ``build_parser().parse_args(shlex.split(line)[3:])`` checks a documented command line without running it.

    Returns:
        A fresh :class:`argparse.ArgumentParser`; parsing with it has no side effects.
    """
    from mobileops.yolo.train import COMPILE_MODES

    parser = _Parser(prog="python -m mobileops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="per-layer table and size of a detector config")
    p.add_argument("cfg", help="shipped config name (yolov5n, yolov5s, yolov5n-c3uib, "
                               "yolov5-mobilenetv3) or a yaml path")
    p.add_argument("--img", "--imgsz", "--img-size", dest="imgsz", type=int, default=640,
                   help="image size for the GFLOPs count, a multiple of 32 (default 640)")
    p.add_argument("--nc", type=_positive_int, default=None, help="override the number of classes")
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
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_bench)
    p = sub.add_parser("train", help="train a detector on synthetic data, with checkpoints and --resume",
                       formatter_class=_DefaultsFormatter,
                       description="Train a detector on synthetic data in a YOLOv5-style run folder "
                                   "(<project>/<name>, numbered exp2, exp3, ...): weights/last.pt every epoch, "
                                   "opt.yaml and results.csv. Ctrl-C finishes the current step, saves last.pt "
                                   "and exits 130; --resume continues from it.")
    p.add_argument("--cfg", default="yolov5n-c3uib", help="shipped config name or yaml path")
    p.add_argument("--data", default="synthetic", help="only 'synthetic' (random images and boxes)")
    p.add_argument("--epochs", type=_positive_int, default=1, help="number of epochs")
    p.add_argument("--steps", type=_positive_int, default=10, help="steps per epoch")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="images per step")
    p.add_argument("--img", "--imgsz", "--img-size", dest="imgsz", type=int, default=320,
                   help="training image size, a multiple of 32")
    p.add_argument("--nc", type=_positive_int, default=None, help="override the number of classes")
    p.add_argument("--amp", choices=("none", "fp16", "bf16"), default="none", help="mixed precision")
    p.add_argument("--channels-last", action="store_true", help="train in channels_last memory format")
    p.add_argument("--backend", choices=("auto", "torch", "triton", "cuda"), default=None,
                   help="fused-op backend (default: $MOBILEOPS_BACKEND, else auto)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or N (default: cuda if available, else cpu)")
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the synthetic data")
    p.add_argument("--project", default="runs/train", help="folder of the run folders")
    p.add_argument("--name", default="exp", help="run folder name (numbered if it exists)")
    p.add_argument("--exist-ok", action="store_true", help="reuse <project>/<name> rather than numbering a new one")
    p.add_argument("--save-period", type=int, default=0,
                   help="also write weights/last.pt every this many steps (below 1: at epoch ends only, "
                        "as YOLOv5's -1)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="capture the whole step (forward, loss, backward, SGD, scaler) as one CUDA graph after 3 "
                        "eager steps and replay it")
    p.add_argument("--compile", nargs="?", const="default", default=None, choices=tuple(COMPILE_MODES),
                   help="torch.compile the model and the loss in this mode (no MODE: default)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="PATH",
                   help="continue a run from its last.pt, its run folder, or (no PATH) the latest under --project")
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
    from mobileops.backend import BackendUnavailableError, forget_choices

    # A command starts from the environment as it is now (MOBILEOPS_BACKEND is otherwise read
    # once per process, at the first op), also when called in-process.
    forget_choices()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help exits 0 here as usual; a bad argument returns its status
        if not done.code:
            raise
        return int(done.code)
    if args.command == "train":
        args.explicit = _explicit_options(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError, BackendUnavailableError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _explicit_options(argv: list[str]) -> set[str]:
    """The ``train`` options given on the command line (argparse cannot tell them from defaults)."""
    parser = build_parser()
    train = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    for action in train._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"command", "run"}


if __name__ == "__main__":
    sys.exit(main())
