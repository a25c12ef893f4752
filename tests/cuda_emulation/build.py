"""Build csrc/ for the CPU: the CUDA kernels compiled by the host C++ compiler against
cuda_shim.h, bound as an importable module with the same interface as mobileops._C.

Tests use it to run the CUDA backend's kernels on machines without a GPU (tiny shapes only:
every CUDA thread is an OS thread). The build is cached by a hash of the sources. Every launch
is logged by its source text (``apply_kernel<T, K, ACT, V>``): :func:`launches` reads the log.
"""

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
CSRC = HERE.parent.parent / "csrc"
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^;{}]*?>)?)\s*<<<(.*?)>>>\s*\(", re.S)


def _rewrite_launches(source: str) -> str:
    out, pos = [], 0
    for match in _LAUNCH.finditer(source):
        if match.start() < pos:
            continue
        depth, i = 1, match.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(source[i], 0)
            i += 1
        args = source[match.end():i - 1]
        out.append(source[pos:match.start()])
        # the launch is logged by its source text (kernel<template arguments as written>)
        name = " ".join(match.group(1).split())
        out.append(f'(emu_record("{name}"), emu_launcher({match.group(2)})([&] {{ {match.group(1)}({args}); }}))')
        pos = i
    out.append(source[pos:])
    return "".join(out)


def _translate(text: str) -> str:
    for header in ("cuda_bf16.h", "cuda_fp16.h", "cuda_runtime.h"):
        text = text.replace(f"#include <{header}>", '#include "cuda_shim.h"')
    text = text.replace("extern __shared__ unsigned char smem[];", "unsigned char* smem = emu_dynamic_smem.data();")
    return _rewrite_launches(text)


def build(out_dir: Path):
    """Compile (or reuse) the emulated extension under ``out_dir`` and import it."""
    sources = sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*.cuh")) + sorted(CSRC.glob("*.h")) + \
        sorted(CSRC.glob("*.cpp")) + [HERE / "cuda_shim.h", Path(__file__)]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    work = Path(out_dir) / f"emulated-{digest}"
    library = work / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    if not library.exists():
        work = work / f"build-{os.getpid()}"  # pytest-xdist workers build side by side
        work.mkdir(parents=True, exist_ok=True)
        shutil.copy(HERE / "cuda_shim.h", work / "cuda_shim.h")
        units = []
        for path in sources[:-2]:
            target = work / (path.stem + ".cpp" if path.suffix == ".cu" else path.name)
            target.write_text(_translate(path.read_text()))
            if path.suffix in (".cu", ".cpp"):
                units.append(str(target))
        import pybind11

        compiler = shutil.which("c++") or shutil.which("g++")
        if compiler is None:
            raise FileNotFoundError("no C++ compiler (c++ or g++) on PATH")
        flags = ["-std=c++20", "-O0", "-fPIC", "-fvisibility=hidden", "-pthread", f"-I{work}",
                 f"-I{sysconfig.get_paths()['include']}", f"-I{pybind11.get_include()}"]

        def compile_unit(unit):
            subprocess.run([compiler, *flags, "-c", unit, "-o", unit + ".o"], check=True, capture_output=True,
                           text=True)
            return unit + ".o"

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            objects = list(pool.map(compile_unit, units))
        partial = work / library.name
        subprocess.run([compiler, "-shared", "-pthread", *objects, "-o", str(partial)], check=True,
                       capture_output=True, text=True)
        partial.rename(library)  # atomic: a concurrent or interrupted build never leaves half a library
        shutil.rmtree(work, ignore_errors=True)
    spec = importlib.util.spec_from_file_location("_C", library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def launches(module) -> list[str]:
    """The kernels the emulated ``module`` launched since the last call, in order (clears the log)."""
    import ctypes

    library = ctypes.CDLL(module.__file__)
    library.emu_launch_log.restype = ctypes.c_char_p
    text = library.emu_launch_log().decode()
    library.emu_clear_launch_log()
    return text.split("\n") if text else []


if __name__ == "__main__":
    print(build(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/mobileops-emulation")))
