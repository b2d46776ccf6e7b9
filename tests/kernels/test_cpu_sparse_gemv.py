"""The CPU embedding_bag decode path against the torch reference."""
import pytest
import torch

from helpers import assert_close, make_case, threshold_for
from kernels import cpu_sparse_gemv as cpu
from kernels.reference import (
    quantize_weight_int8,
    sparse_linear_fused_reference,
    sparse_linear_int8_reference,
    sparse_linear_reference,
)

CPU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _ref(x, wt, b, tau):
    return sparse_linear_reference(x.float(), wt.float(), None if b is None else b.float(), tau)


@pytest.fixture(params=["serial", "bags"])
def bag_mode(request, monkeypatch):
    if request.param == "bags":
        monkeypatch.setattr(cpu, "SERIAL_BYTES", 0)
    return request.param


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 2, 5, 8])
@pytest.mark.parametrize("K,N", [(172, 64), (64, 172), (1000, 300)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("bias", [True, False])
def test_cpu_sparse_gemv(dtype, M, K, N, sparsity, bias, bag_mode):
    x, w, b = make_case(M, K, N, dtype, "cpu", bias=bias)
    wt = w.t().contiguous()
    tau = threshold_for(x, sparsity)
    y = cpu.cpu_sparse_gemv(x, wt, b, tau)
    assert y.shape == (M, N) and y.dtype == dtype
    assert_close(y, _ref(x, wt, b, tau), dtype)


@pytest.mark.parametrize("rows_per_bag", [1, 7, 10_000])
def test_cpu_bag_splits(rows_per_bag, monkeypatch):
    # One bag, many tiny bags, and empty bags (a batch row with no survivors).
    monkeypatch.setattr(cpu, "SERIAL_BYTES", 0)  # small sizes would otherwise use one bag
    x, w, b = make_case(3, 500, 70, torch.float32, "cpu")
    x[1] = 0.0
    wt = w.t().contiguous()
    y = cpu.cpu_sparse_gemv(x, wt, b, 0.8, rows_per_bag=rows_per_bag)
    assert_close(y, _ref(x, wt, b, 0.8), torch.float32)
    torch.testing.assert_close(y[1], b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [1, 6])
def test_cpu_int8(dtype, M):
    x, w, b = make_case(M, 172, 64, dtype, "cpu")
    qwt, scales = quantize_weight_int8(w)
    tau = threshold_for(x, 0.5)
    y = cpu.cpu_sparse_gemv(x, qwt, b, tau, scales=scales)
    assert_close(y, sparse_linear_int8_reference(x.float(), qwt, scales, b.float(), tau), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("same_tau", [True, False])
@pytest.mark.parametrize("int8", [False, True])
def test_cpu_fused(dtype, same_tau, int8):
    sizes = [64, 17, 172]
    x, w, b = make_case(2, 172, sum(sizes), dtype, "cpu")
    taus = [0.5] * 3 if same_tau else [0.2, 0.9, float("inf")]
    wt, scales = quantize_weight_int8(w) if int8 else (w.t().contiguous(), None)
    y = cpu.cpu_sparse_gemv_fused(x, wt, b, taus, sizes, scales)
    ref = sparse_linear_fused_reference(x.float(), wt if int8 else wt.float(), sizes, b.float(), taus, scales)
    assert_close(y, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_native_dtype_mask_equals_fp32_compare(dtype):
    """The CPU path compares |x| > floor_dtype(tau) in x's dtype; that must keep
    exactly the elements the fp32 compare keeps, for thresholds on, just above
    and just below representable values, and past the dtype's range."""
    from kernels.reference import keep_mask

    x = torch.randn(20000, generator=torch.Generator().manual_seed(0)).to(dtype)
    values = x.float().abs().unique()[::97].tolist()
    taus = [0.0, 1e-8, 0.3333, 65504.0, 1e6, float("inf")]
    for v in values:
        taus += [v, v * (1 + 1e-7), v * (1 - 1e-7)]
    for tau in taus:
        assert torch.equal(cpu._keep_mask_native(x, tau), keep_mask(x, tau)), tau
