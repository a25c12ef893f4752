"""Build script for mobileops.

The Python package is pure Python.  The optional CUDA extension ``mobileops._C`` is
compiled from ``csrc/`` with nvcc when it is found (override with
``MOBILEOPS_BUILD_CUDA=0`` to skip or ``=1`` to require it; target architectures from
``MOBILEOPS_CUDA_ARCHS``, default ``80;90``).  The extension talks to the CUDA runtime
through raw pointers and pybind11 only, so it is built without PyTorch's C++ headers.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"
PACKAGES = ["mobileops", "mobileops.ops", "mobileops.nn", "mobileops.yolo", "mobileops.kernels", "mobileops.bench",
            "mobileops.cuda"]


def _find_nvcc():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _build_mode():
    """Return (mode, nvcc) with mode one of "off", "auto", "required"."""
    flag = os.environ.get("MOBILEOPS_BUILD_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise SystemExit(f"MOBILEOPS_BUILD_CUDA must be 0 or 1, got {flag!r}")
    if flag == "0":
        return "off", None
    nvcc = _find_nvcc()
    if flag == "1" and nvcc is None:
        raise SystemExit("MOBILEOPS_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
    if nvcc is None:
        return "off", None
    return ("required" if flag == "1" else "auto"), nvcc


def _gencode_flags():
    archs = os.environ.get("MOBILEOPS_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
    archs = [a.strip().replace("sm_", "").replace(".", "") for a in archs if a.strip()]
    if not archs or not all(a.isdigit() for a in archs):
        raise SystemExit(f"MOBILEOPS_CUDA_ARCHS must list compute capabilities like '80;90', got {archs}")
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    # PTX of the newest arch lets newer GPUs JIT the kernels.
    flags.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    return flags


class NvccBuildExt(build_ext):
    """Compiles ``mobileops._C`` with nvcc; in "auto" mode a failed build only warns."""

    def build_extensions(self):
        mode, nvcc = _build_mode()
        for ext in list(self.extensions):
            try:
                self._build_with_nvcc(ext, nvcc)
            except Exception as exc:  # reported, and fatal when required
                if mode == "required":
                    raise
                print(f"\n*** mobileops: CUDA extension NOT built ({exc}); the cuda backend will be "
                      "unavailable. Set MOBILEOPS_BUILD_CUDA=1 to make this an error. ***\n",
                      file=sys.stderr)
                self.extensions.remove(ext)  # so that nothing tries to install the missing file

    def _build_with_nvcc(self, ext, nvcc):
        import pybind11

        out = Path(self.get_ext_fullpath(ext.name))
        tmp = Path(self.build_temp) / "csrc"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir(parents=True, exist_ok=True)
        includes = [f"-I{sysconfig.get_paths()['include']}", f"-I{pybind11.get_include()}", f"-I{CSRC}"]
        common = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden"]
        commands, objects = [], []
        for src in ext.sources:
            obj = tmp / (Path(src).name + ".o")
            commands.append([nvcc, "-c", str(ROOT / src), "-o", str(obj), *common, *includes, *_gencode_flags(),
                             "--expt-relaxed-constexpr", "--threads", "2"])
            objects.append(str(obj))
        # One nvcc per source file, side by side: the kernel files dominate the install time.
        with ThreadPoolExecutor(max_workers=max(1, min(len(commands), os.cpu_count() or 1))) as pool:
            for cmd in commands:
                print(" ".join(cmd))
            list(pool.map(lambda cmd: subprocess.run(cmd, check=True), commands))
        link = [nvcc, "-shared", *objects, "-o", str(out), *_gencode_flags(), "-cudart", "static"]
        print(" ".join(link))
        subprocess.run(link, check=True)


def _extensions():
    mode, _ = _build_mode()
    if mode == "off":
        print("mobileops: building without the CUDA extension (nvcc not found or MOBILEOPS_BUILD_CUDA=0)")
        return []
    sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cu")) + sorted(
        str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp"))
    return [Extension("mobileops._C", sources=sources)] if sources else []


setup(
    packages=PACKAGES,
    package_dir={"mobileops.kernels": "kernels"},
    package_data={"mobileops.yolo": ["configs/*.yaml"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": NvccBuildExt},
)
