"""Kernel tests: run Triton kernels in the interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is imported anywhere, so it is set
here, at conftest import time.  On a CUDA machine it is left unset so the
same tests compile real kernels (the interpreted CPU variants then skip).
"""
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Make the top-level `kernels` package importable without installing anything.
_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))


import pytest  # noqa: E402


@pytest.fixture(params=["native", "serial", "bags"])
def cpu_path(request, monkeypatch):
    """Which CPU path the calls take: the native op, or (as when it cannot be built) embedding_bag
    with one bag / many bags."""
    from helpers import require_native
    from spon.kernels import cpu_sparse_gemv as cpu

    if request.param == "native":
        require_native()
    else:
        monkeypatch.setattr(cpu, "native_op", lambda: None)
    if request.param == "bags":
        monkeypatch.setattr(cpu, "SERIAL_BYTES", 0)
    return request.param
