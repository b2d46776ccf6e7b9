"""Sparse int4 (group-wise, symmetric) weights: packing, the native CPU op, the embedding_bag-less
fallback, the public API, the registered op and the Triton kernel (interpreted on CPU), all
against the torch reference ``sparse_linear_int4_reference`` (fp32 math on the dequantized Wᵀ)."""
import pytest
import torch

import spon.kernels as kernels
from helpers import TRITON_DEVICES, assert_close, make_case, require_native, threshold_for
from spon.kernels import cpu_native as native
from spon.kernels import cpu_sparse_gemv as cpu
from spon.kernels.reference import (
    dequantize_weight_int4_t,
    pack_int4,
    quantize_weight_int4,
    sparse_linear_fused_reference,
    sparse_linear_int4_reference,
    unpack_int4,
)

CPU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def test_pack_layout_and_round_trip():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (5, 64), generator=g, dtype=torch.int8)
    p = pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (5, 32)
    # byte i of a 32-column block: column i low nibble, column i + 16 high nibble (value + 8)
    assert int(p[2, 3]) == (int(q[2, 3]) + 8) | ((int(q[2, 19]) + 8) << 4)
    assert int(p[4, 16 + 15]) == (int(q[4, 32 + 15]) + 8) | ((int(q[4, 32 + 31]) + 8) << 4)
    assert torch.equal(unpack_int4(p), q)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_quantize_error_is_half_a_step(group):
    w = torch.randn(96, 256) / 16
    q, s = quantize_weight_int4(w, group)
    assert s.shape == (256 // group, 96)
    err = (dequantize_weight_int4_t(q, s) - w.t()).abs()
    step = s.repeat_interleave(group, dim=0)
    assert bool((err <= step / 2 + 1e-7).all())
    assert unpack_int4(q).abs().max() <= 7


def test_quantize_rejects_bad_shapes():
    with pytest.raises(ValueError):
        quantize_weight_int4(torch.randn(48, 128))  # 48 columns: not whole 32-column blocks
    with pytest.raises(ValueError):
        quantize_weight_int4(torch.randn(64, 100), 64)  # group does not divide in_features


@pytest.fixture
def native_only():
    require_native()


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("K,N,group", [(256, 96, 64), (576, 960, 64), (192, 64, 32), (128, 32, 128)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_native_int4(dtype, M, K, N, group, sparsity, native_only):
    x, w, b = make_case(M, K, N, dtype, "cpu")
    q, s = quantize_weight_int4(w, group)
    tau = threshold_for(x, sparsity)
    y = native.native_op()(x, q, b, [tau], [N], s)
    ref = sparse_linear_int4_reference(x.float(), q, s, b.float(), tau)
    assert_close(y, ref, dtype)
    # and the answer is the int4 model's, not the float one's: the quantization error is visible
    if sparsity == 0.0 and dtype == torch.float32:
        assert (ref - torch.nn.functional.linear(x, w, b)).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 3])
def test_native_int4_fused_segments_and_per_channel(dtype, M, native_only):
    x, w, b = make_case(M, 256, 96 + 32 + 64, dtype, "cpu")
    q, s = quantize_weight_int4(w, 64)
    sizes = [96, 32, 64]
    taus = [threshold_for(x, 0.5), float("inf"), -1.0]
    y = native.native_op()(x, q, b, taus, sizes, s)
    assert_close(y, sparse_linear_fused_reference(x.float(), q, sizes, b.float(), taus, s), dtype)
    torch.testing.assert_close(y[:, 96:128].float(), b[96:128].float().expand(M, -1))  # inf: bias only
    ct = torch.rand(3, 256, generator=torch.Generator().manual_seed(1)) * 1.5
    ct[:, ::5] = float("inf")
    y = native.native_op()(x, q, b, [0.0] * 3, sizes, s, ct)
    assert_close(y, sparse_linear_fused_reference(x.float(), q, sizes, b.float(), ct, s), dtype)


@pytest.mark.parametrize("sparsity", [0.0, 0.5])
@pytest.mark.parametrize("M", [1, 4])
@pytest.mark.parametrize("K,N", [(2048, 2048), (8192, 1024)])
def test_native_int4_thread_count_independent(sparsity, M, K, N, native_only):
    """> 1 MiB of packed rows: the threaded split (column chunks; blocks of whole groups of rows for
    the tall matrix); 1 and 2 threads agree bit for bit."""
    x, w, b = make_case(M, K, N, torch.bfloat16, "cpu")
    q, s = quantize_weight_int4(w.float(), 64)
    tau = threshold_for(x, sparsity)
    op = native.native_op()
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = op(x, q, b, [tau], [N], s)
        torch.set_num_threads(2)
        y2 = op(x, q, b, [tau], [N], s)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(y1, y2)
    assert_close(y2, sparse_linear_int4_reference(x.float(), q, s, b.float(), tau), torch.bfloat16)


def test_native_int4_rejects_bad_arguments(native_only):
    op = native.native_op()
    x, w, b = make_case(1, 128, 64, torch.float32, "cpu")
    q, s = quantize_weight_int4(w, 32)
    with pytest.raises(RuntimeError, match="multiples of 32"):
        op(x, q, None, [0.0, 0.0], [48, 16], s)
    with pytest.raises(RuntimeError, match="int4 scales"):
        op(x, q, None, [0.0], [64], s[:, :32].contiguous())
    with pytest.raises(RuntimeError, match="scales go with"):
        op(x, q, None, [0.0], [64], None)


@pytest.mark.parametrize("path", ["native", "fallback"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [1, 3, 12])  # 12 rows: the torch reference
def test_public_api_int4(path, dtype, M, monkeypatch):
    if path == "native":
        require_native()
    else:
        monkeypatch.setattr(cpu, "native_op", lambda: None)
    x, w, b = make_case(M, 256, 96, dtype, "cpu")
    q, s = quantize_weight_int4(w.float(), 64)
    tau = threshold_for(x, 0.5)
    y = kernels.sparse_linear_int4(x.unsqueeze(0), q, s, b, tau)
    assert y.shape == (1, M, 96)
    assert_close(y[0], sparse_linear_int4_reference(x.float(), q, s, b.float(), tau), dtype)
    outs = kernels.sparse_linear_fused(x, q, [64, 32], b, [tau, 0.0], s)
    ref = sparse_linear_fused_reference(x.float(), q, [64, 32], b.float(), [tau, 0.0], s)
    assert_close(torch.cat(outs, -1), ref, dtype)


def test_registered_op_int4():
    x, w, b = make_case(2, 128, 64, torch.float32, "cpu")
    q, s = quantize_weight_int4(w, 32)
    taus = torch.tensor([0.5, 0.2])
    torch.library.opcheck(kernels.ops.sparse_gemv, (x, q, b, taus, [32, 32], s))
    y = torch.ops.spon_kernels.sparse_gemv(x, q, b, taus, [32, 32], s)
    assert_close(y, sparse_linear_fused_reference(x, q, [32, 32], b, [0.5, 0.2], s), torch.float32)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("split_k", [1, 2])
def test_triton_int4(device, dtype, M, split_k):
    from spon.kernels.triton_sparse_gemv import triton_sparse_gemv

    x, w, b = make_case(M, 128, 96, dtype, device)
    q, s = quantize_weight_int4(w.float().cpu(), 32)
    q, s = q.to(device), s.to(device)
    for sparsity in (0.0, 0.5, 1.0):
        tau = threshold_for(x, sparsity)
        y = triton_sparse_gemv(x, q, b, torch.tensor([tau]), [96], s, split_k=split_k)
        assert_close(y, sparse_linear_int4_reference(x.float(), q, s, b.float(), tau), dtype)
    taus = torch.tensor([threshold_for(x, 0.5), float("inf")])
    y = triton_sparse_gemv(x, q, b, taus, [64, 32], s, split_k=split_k)
    assert_close(y, sparse_linear_fused_reference(x.float(), q, [64, 32], b.float(), taus, s), dtype)
    ct = torch.rand(1, 128, generator=torch.Generator().manual_seed(3)).to(device)
    y = triton_sparse_gemv(x, q, b, ct, [96], s, split_k=split_k)
    assert_close(y, sparse_linear_int4_reference(x.float(), q, s, b.float(), ct[0]), dtype)
