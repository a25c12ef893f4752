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

@pytest.fixture(autouse=True)
def _reset_backend_selection(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    saved = backend._selected
    yield
    backend._selected = saved
    backend._override_stack.clear()
