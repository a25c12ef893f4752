import os
import sys
from pathlib import Path

# tests import their helpers (helpers.py) as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU the Triton kernels run in Triton's CPU interpreter, so the triton backend is
# tested everywhere. It must be set before the kernels are first defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mobileops import backend  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def runnable_backends(op: str, device: str):
    """Backends that implement ``op`` and can run it on ``device`` in this environment."""
    return [name for name in backend.BACKENDS
            if name in backend._impls.get(op, {}) and backend._backend_problem(name, torch.device(device)) is None]


def backend_params(op: str):
    """pytest params (device, backend) for every backend that can run ``op`` here."""
    return [pytest.param(d, b, id=f"{d}-{b}") for d in DEVICES for b in runnable_backends(op, d)]


@pytest.fixture(autouse=True)
def _reset_backend_selection(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    saved = backend._selected
    yield
    backend._selected = saved
    backend._override_stack.clear()
