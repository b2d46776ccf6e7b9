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


def require_native():
    """Skip where the native CPU op is switched off; fail where it should build and did not."""
    from spon.kernels import cpu_native

    if not cpu_native.enabled():
        pytest.skip("SPON_CPU_NATIVE=0: native CPU op disabled")
    if cpu_native.native_op() is None:
        pytest.fail("native CPU op failed to build (see the warning); this machine has a compiler and ninja")


def count_native_calls(monkeypatch) -> list[int]:
    """Route the CPU path's native op through a counter: the rows of every call, appended."""
    from spon.kernels import cpu_native
    from spon.kernels import cpu_sparse_gemv as cpu

    calls = []
    real = cpu_native.native_op()

    def counting(*a, **k):
        calls.append(a[0].shape[0])
        return real(*a, **k)

    monkeypatch.setattr(cpu, "native_op", lambda: counting)
    return calls


def weights(w, int8):
    """W^T for the kernels: int8 with scales, or the float weight transposed (scales None)."""
    from spon.kernels.reference import quantize_weight_int8

    return quantize_weight_int8(w) if int8 else (w.t().contiguous(), None)
