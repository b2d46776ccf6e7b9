"""Every Triton kernel variant against the torch reference (interpreted on CPU, compiled on CUDA)."""
import pytest
import torch

from helpers import DTYPES, TRITON_DEVICES, assert_close, make_case, threshold_for
from spon.kernels.reference import (
    quantize_weight_int8,
    sparse_linear_fused_reference,
    sparse_linear_int8_reference,
    sparse_linear_reference,
)

pytestmark = pytest.mark.slow  # ~180 Triton-interpreter runs on CPU (~35 s): not in the fast tier

ts = pytest.importorskip("kernels.triton_sparse_gemv")
if not ts.HAS_TRITON:
    pytest.skip("triton not installed", allow_module_level=True)
gemv = ts.triton_sparse_gemv


def _tau(t, device):
    return torch.tensor([t], dtype=torch.float32, device=device)


def _ref(x, wt, b, tau):
    return sparse_linear_reference(x.float(), wt.float(), None if b is None else b.float(), tau)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 2, 5, 8])
@pytest.mark.parametrize("K,N", [(172, 64), (64, 172), (33, 17)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 1.0])
def test_sparse_gemv(device, dtype, M, K, N, sparsity):
    x, w, b = make_case(M, K, N, dtype, device)
    wt = w.t().contiguous()
    tau = threshold_for(x, sparsity)
    y = gemv(x, wt, b, _tau(tau, device))
    assert y.shape == (M, N) and y.dtype == dtype
    assert_close(y, _ref(x, wt, b, tau), dtype)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("split_k", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_split_k_paths(device, dtype, split_k, bias):
    # split_k=1 stores directly; >1 goes through the fp32 workspace + reduce kernel.
    x, w, b = make_case(3, 300, 70, dtype, device, bias=bias)
    wt = w.t().contiguous()
    tau = threshold_for(x, 0.4)
    y = gemv(x, wt, b, _tau(tau, device), split_k=split_k)
    assert_close(y, _ref(x, wt, b, tau), dtype)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batch_union_and_all_dropped_rows(device, dtype):
    # Row 0 keeps only the first half of the features, row 1 only the second
    # half, row 2 drops everything: the kernel must read the union of rows and
    # give row 2 exactly the bias.
    M, K, N = 3, 96, 40
    x, w, b = make_case(M, K, N, dtype, device)
    x = x.abs() * 0.1
    x[0, : K // 2] += 2.0
    x[1, K // 2 :] += 2.0
    tau = 1.0
    wt = w.t().contiguous()
    y = gemv(x, wt, b, _tau(tau, device), split_k=2)
    assert_close(y, _ref(x, wt, b, tau), dtype)
    torch.testing.assert_close(y[2].float(), b.float())


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_noncontiguous_x_rows(device, dtype):
    x, w, b = make_case(4, 2 * 80, 48, dtype, device)
    x = x[:, ::2]  # column stride 2 -> launcher makes it contiguous
    x2 = torch.randn(4, 100, dtype=dtype, device=device)[:, :80]  # row stride 100, unit col stride
    wt = w[:, :80].t().contiguous()
    for xx in (x, x2):
        y = gemv(xx, wt, b, _tau(0.3, device))
        assert_close(y, _ref(xx, wt, b, 0.3), dtype)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 4, 8])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 1.0])
def test_int8(device, dtype, M, sparsity):
    K, N = 172, 64
    x, w, b = make_case(M, K, N, dtype, device)
    qwt, scales = quantize_weight_int8(w)
    tau = threshold_for(x, sparsity)
    y = gemv(x, qwt, b, _tau(tau, device), scales=scales, split_k=2 if M == 4 else None)
    ref = sparse_linear_int8_reference(x.float(), qwt, scales, b.float(), tau)
    assert_close(y, ref, dtype)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 3, 8])
@pytest.mark.parametrize("int8", [False, True])
def test_fused_segments(device, dtype, M, int8):
    # q/k/v-like odd widths with one threshold per projection (incl. drop-all).
    K, sizes = 172, [64, 17, 172]
    x, w, b = make_case(M, K, sum(sizes), dtype, device)
    taus = [threshold_for(x, 0.3), threshold_for(x, 0.7), float("inf")]
    thr = torch.tensor(taus, dtype=torch.float32, device=device)
    if int8:
        wt, scales = quantize_weight_int8(w)
    else:
        wt, scales = w.t().contiguous(), None
    y = gemv(x, wt, b, thr, seg_sizes=sizes, scales=scales, split_k=2 if M == 3 else None)
    ref = sparse_linear_fused_reference(x.float(), wt if int8 else wt.float(), sizes, b.float(), taus, scales)
    assert_close(y, ref, dtype)
