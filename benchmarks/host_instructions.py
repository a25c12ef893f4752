"""CPU instructions per fused-op call, counted by valgrind: host cost that this VM's noise cannot blur.

    python benchmarks/host_instructions.py [--calls 200] [--out FILE] [CALL ...]

Wall-clock host time on a shared 2-core VM moves by 2x between runs (``host_overhead.py``
reports min and median for that reason), which hides changes of 10-20%. The number of
instructions a call executes does not move: this script runs the calls of ``host_overhead.py``
(launches stubbed, the ``mobileops python`` mode, plus the ``eager`` composition and the
``floor`` rows) under ``valgrind --tool=callgrind`` and reports instructions per call.

Callgrind starts with collection off; around each call's loop the child toggles it on and
then off with a dump (``torch._C._valgrind_toggle`` / ``_valgrind_toggle_and_dump_stats``, the
client requests behind ``torch.utils.benchmark``'s ``collect_callgrind``), so one process (one
torch import, about 80 s under valgrind) measures every call, and neither the import nor the
warm-up calls count. Instructions are not
time (a cache miss costs more than an add), but the count moves with every Python call,
allocation and dictionary built, which is what mobileops' host path is made of.

CALL names are ``host_overhead.py``'s (``"bn_act train forward+backward"``...), optionally
prefixed ``"eager "``, ``"floor "`` or ``"launcher "`` (that mode's fused call: compiled for
sm_90 and launched through Triton's launcher with the stand-in driver of
``triton_launch_path.py``, in a second process without the interpreter; run
``host_overhead.py`` once first, so the kernels come from Triton's cache instead of being
compiled under valgrind); none means all. Writes one JSON row per call (call, mode,
instructions_per_call, calls, versions) to ``--out`` or stdout. Needs valgrind; takes a few
minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

WARMUP_CALLS = 30
LAUNCHER = "launcher "  # the prefix of a call counted through Triton's launcher


def _table():
    """name -> (zero-argument call, needs grad), for every row this script can count."""
    import host_overhead as ho
    import torch

    cpu = torch.device("cpu")
    table = {name: (fn, grad, "mobileops python") for name, (fn, grad) in ho.fused_calls(cpu, torch.float16).items()}
    for name, (fn, grad) in ho.eager_calls(cpu, torch.float32, ho.EAGER_CPU_SHAPE).items():
        table[f"eager {name}"] = (fn, grad, "eager composition")
    for name, fn in ho.floor_calls(cpu, torch.float16).items():
        table[f"floor {name}"] = (fn, True, "autograd floor")
    return table


def _child(names: list[str], calls: int, launcher: bool) -> None:
    """Under valgrind: each call's loop collected and dumped on its own. ``launcher``: the
    kernels compiled and launched through Triton's path with the stand-in driver (no launch
    stubs, no interpreter), as ``host_overhead.py``'s launcher mode."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import host_overhead as ho

    from mobileops import use_backend

    torch.set_num_threads(1)
    if launcher:
        ho.install_stand_in_driver()
    with contextlib.nullcontext() if launcher else ho.launches_stubbed([]), use_backend("triton"):
        table = _table()
        for name in names:
            fn, grad, _ = table[name.removeprefix(LAUNCHER)]
            with torch.enable_grad() if grad else torch.no_grad():
                for _ in range(WARMUP_CALLS):
                    fn()
                torch._C._valgrind_toggle()
                for _ in range(calls):
                    fn()
                torch._C._valgrind_toggle_and_dump_stats()


def _counted(dumps: list[Path]) -> list[int]:
    """The instruction total of each callgrind dump (its ``summary:`` line), in dump order."""
    def number(path: Path) -> int:
        return int(path.name.rsplit(".", 1)[1])

    totals = []
    for path in sorted(dumps, key=number):
        summary = [line for line in path.read_text().splitlines() if line.startswith("summary:")]
        totals.append(int(summary[0].split()[1]))
    return totals


def _count(valgrind: str, names: list[str], calls: int, launcher: bool) -> list[int]:
    """Instructions of each name's ``calls`` calls, from one child process under callgrind."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        command = [valgrind, "--tool=callgrind", "--collect-atstart=no", f"--callgrind-out-file={out}",
                   sys.executable, __file__, "--child", "--calls", str(calls), *names]
        env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
        if launcher:
            command.append("--launcher")
            env.pop("TRITON_INTERPRET", None)
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        dumps = list(Path(tmp).glob("callgrind.out.*"))
        if done.returncode != 0 or len(dumps) != len(names):
            raise SystemExit(f"valgrind run failed ({len(dumps)} dumps for {len(names)} calls):\n{done.stderr[-3000:]}")
        return _counted(dumps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="CALL")
    parser.add_argument("--calls", type=int, default=200, help="calls counted per row")
    parser.add_argument("--out", type=Path, help="JSON-lines file (default: stdout)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--launcher", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.launcher:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the launch stubs need the interpreter build
    if args.child:
        _child(args.names, args.calls, args.launcher)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    table = _table()
    names = args.names or list(table) + [LAUNCHER + name for name, (_, _, mode) in table.items()
                                         if mode == "mobileops python"]
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("host_instructions.py needs valgrind (callgrind) on PATH")
    totals = {}
    for launcher in (False, True):
        group = [name for name in names if name.startswith(LAUNCHER) == launcher]
        if group:
            totals.update(zip(group, _count(valgrind, group, args.calls, launcher)))
    import torch
    import triton
    from host_overhead import LAUNCHER_MODE

    meta = dict(device=f"{platform.processor() or platform.machine()} (valgrind callgrind)", torch=torch.__version__,
                triton=triton.__version__, python=platform.python_version())
    rows = []
    for name in names:
        mode = LAUNCHER_MODE if name.startswith(LAUNCHER) else table[name][2]
        call = name.removeprefix(LAUNCHER).removeprefix("eager ").removeprefix("floor ")
        rows.append(dict(meta, call=call, mode=mode, instructions_per_call=totals[name] // args.calls,
                         calls=args.calls))
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if args.out:
        args.out.write_text(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
