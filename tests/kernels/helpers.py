import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

# Triton kernels run on "cpu" only through the interpreter, on "cuda" only compiled.
TRITON_DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            not (HAS_TRITON and INTERPRET), reason="Triton on CPU needs triton + TRITON_INTERPRET=1"
        ),
    ),
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not (HAS_TRITON and torch.cuda.is_available() and not INTERPRET),
            reason="no CUDA GPU (or TRITON_INTERPRET=1 set): compiled Triton tests skipped",
        ),
    ),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (atol, rtol) against an fp32 reference on the same rounded inputs, for
# outputs of magnitude ~1 (weights are scaled by 1/sqrt(in_features)).
TOL = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 2e-2),
}


def make_case(M, K, N, dtype, device, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) / K**0.5
    b = torch.randn(N, generator=g) if bias else None
    to = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return to(x), to(w), to(b)


def assert_close(y, ref, dtype):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y.float().cpu(), ref.float().cpu(), atol=atol, rtol=rtol)


def threshold_for(x, sparsity):
    """tau that drops `sparsity` of x's entries (0 -> keep all, 1 -> drop all)."""
    if sparsity <= 0:
        return -1.0
    if sparsity >= 1:
        return float("inf")
    return float(x.abs().float().flatten().quantile(sparsity))
