import os
import sys
from pathlib import Path

# tests import their helpers (helpers.py) as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter, so the triton backend is
# tested everywhere. It must be set before the kernels are first defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The tests' tensors are tiny: an intra-op thread pool only adds wake-ups, and once Triton's
    # interpreter has run, pooled CPU ops were seen taking 1-2 s instead of ~1 ms on 2 cores.
    torch.set_num_threads(1)

from mobileops import backend


@pytest.fixture(autouse=True)
def _reset_backend_selection(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    # Tests replace backend internals and environment variables that cached choices depend on.
    backend.forget_choices()
    saved = backend._selected
    yield
    backend._selected = saved
    backend._override_stack.clear()
    backend.forget_choices()


@pytest.fixture(scope="session")
def emulated_extension(tmp_path_factory):
    """csrc/ built for the CPU (tests/cuda_emulation): the CUDA backend's kernels without a GPU.
    Built once per session (and cached across sessions by a hash of the sources)."""
    import subprocess

    sys.path.insert(0, str(Path(__file__).parent / "cuda_emulation"))
    import build as emulation_build

    try:
        return emulation_build.build(tmp_path_factory.getbasetemp().parent / "mobileops-cuda-emulation")
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"csrc/ does not compile for the CPU emulation:\n{exc.stderr[-3000:]}")
