"""Per-input-channel thresholds (the weighted criterion: keep x_k iff |x_k| > tau_k, tau_k = tau / ||W[:, k]||)
on every path against the torch reference: the native CPU op, the embedding_bag fallback, the
Triton kernel (interpreted on CPU), the public API and the registered custom op.

Every vector here mixes ordinary values with +inf (drop the channel), 0, negative (keep it) and
entries equal to |x| somewhere (strictness); `_discriminating` checks that no single scalar gives
the same mask, so a path that ignored the vector could not pass."""
import pytest
import torch

import spon.kernels as kernels
from helpers import (
    DTYPES,
    HAS_TRITON,
    TRITON_DEVICES,
    assert_close,
    count_native_calls,
    make_case,
    require_native,
    threshold_for,
    weights,
)
from spon.kernels import cpu_native as native
from spon.kernels import cpu_sparse_gemv as cpu
from spon.kernels.reference import (
    keep_mask,
    quantize_weight_int8,
    sparse_linear_fused_reference,
    sparse_linear_int8_reference,
    sparse_linear_reference,
)

CPU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NAN = float("nan")


def channel_taus(x, seed=0):
    """fp32 [K]: per channel a threshold between 0 and ~2x the median |x|, with +inf, 0, negative
    entries and some equal to an element of |x| (the strict compare must drop that element)."""
    K = x.shape[-1]
    g = torch.Generator().manual_seed(seed)
    med = float(x.abs().float().median())
    t = torch.rand(K, generator=g) * 2 * med
    t[seed % 7 :: 7] = float("inf")
    t[(seed + 1) % 9 :: 9] = 0.0
    t[(seed + 2) % 11 :: 11] = -0.5
    ks = torch.arange((seed + 3) % 13, K, 13)
    t[ks] = x.reshape(-1, K)[0, ks].abs().float()
    return t


def _discriminating(x, tvec):
    """The vector's mask is not any scalar's: x sorted by |x| would then be cut at one place."""
    keep = keep_mask(x, tvec)
    for s in [0.0, float(tvec[torch.isfinite(tvec)].median()), float(tvec[0]), float("inf"), -1.0]:
        assert not torch.equal(keep, keep_mask(x, s)), s
    return tvec


def _ref(x, wt, b, tau, scales=None):
    b = None if b is None else b.float()
    if scales is not None:
        return sparse_linear_int8_reference(x.float(), wt, scales, b, tau)
    return sparse_linear_reference(x.float(), wt.float(), b, tau)


# ----------------------------------------------------------------------------- native op
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("int8", [False, True])
def test_native_op_per_channel(dtype, M, int8):
    require_native()
    x, w, b = make_case(M, 300, 70, dtype, "cpu")
    wt, scales = weights(w, int8)
    tvec = _discriminating(x, channel_taus(x, seed=M))
    op = native.native_op()
    # The float thresholds are ignored when channel_thresholds is given (NaN would drop everything).
    y = op(x, wt, b, [NAN], [70], scales, tvec.view(1, -1))
    assert y.shape == (M, 70) and y.dtype == dtype
    assert_close(y, _ref(x, wt, b, tvec, scales), dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 3, 8])
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("K", [172, 3000])  # at 3000 the rows to read pass 1 MiB: threaded
def test_native_op_per_channel_fused(dtype, M, int8, K):
    """Three segments, each its own vector; the third row equals the first (they may share a scan)."""
    require_native()
    sizes = [64, 17, 172]
    x, w, b = make_case(M, K, sum(sizes), dtype, "cpu")
    wt, scales = weights(w, int8)
    t0, t1 = _discriminating(x, channel_taus(x, 0)), _discriminating(x, channel_taus(x, 1))
    thr = torch.stack([t0, t1, t0])
    y = native.native_op()(x, wt, b, [0.0, 0.0, 0.0], sizes, scales, thr)
    ref = sparse_linear_fused_reference(x.float(), wt if int8 else wt.float(), sizes, b.float(), [t0, t1, t0], scales)
    assert_close(y, ref, dtype)
    # segment 1 with segment 0's vector would give another result: the rows are not mixed up
    assert not torch.allclose(ref[:, 64:81], _ref(x, wt[:, 64:81], b[64:81], t0, None if scales is None else scales[64:81]))


def test_native_op_per_channel_thread_count_independent():
    require_native()
    x, w, b = make_case(3, 3000, 501, torch.bfloat16, "cpu")
    wt = w.t().contiguous()
    thr = torch.stack([channel_taus(x, 0), channel_taus(x, 1)])
    op = native.native_op()
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = op(x, wt, b, [0.0, 0.0], [250, 251], None, thr)
        torch.set_num_threads(2)
        y2 = op(x, wt, b, [0.0, 0.0], [250, 251], None, thr)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(y1, y2)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 5])
def test_native_op_equal_vector_is_the_scalar(dtype, M):
    """A vector with every entry tau gives exactly (bitwise) the scalar tau's result."""
    require_native()
    x, w, b = make_case(M, 300, 70, dtype, "cpu")
    wt = w.t().contiguous()
    tau = threshold_for(x, 0.5)
    op = native.native_op()
    y_scalar = op(x, wt, b, [tau, tau * 0.5], [30, 40], None)
    thr = torch.tensor([[tau] * 300, [tau * 0.5] * 300], dtype=torch.float32)
    assert torch.equal(op(x, wt, b, [0.0, 0.0], [30, 40], None, thr), y_scalar)


def test_native_op_six_arguments_still_work():
    """Existing callers pass six positional arguments (channel_thresholds defaults to None)."""
    require_native()
    x, w, b = make_case(2, 64, 8, torch.float32, "cpu")
    wt = w.t().contiguous()
    y = native.native_op()(x, wt, b, [0.3], [8], None)
    assert_close(y, _ref(x, wt, b, 0.3), torch.float32)
    y = native.native_op()(x, wt, b, [0.3], [8], None, None)
    assert_close(y, _ref(x, wt, b, 0.3), torch.float32)


def test_native_op_rejects_bad_channel_thresholds():
    require_native()
    op = native.native_op()
    x, wt = torch.randn(1, 64), torch.randn(64, 8)
    with pytest.raises(RuntimeError, match=r"channel_thresholds must be \[2, 64\]"):
        op(x, wt, None, [0.0, 0.0], [4, 4], None, torch.zeros(1, 64))
    with pytest.raises(RuntimeError, match=r"channel_thresholds must be \[1, 64\]"):
        op(x, wt, None, [0.0], [8], None, torch.zeros(64))
    with pytest.raises(RuntimeError, match="CPU fp32"):
        op(x, wt, None, [0.0], [8], None, torch.zeros(1, 64, dtype=torch.float64))


def test_native_op_non_contiguous_channel_thresholds():
    require_native()
    x, w, b = make_case(2, 64, 20, torch.float32, "cpu")
    wt = w.t().contiguous()
    t = torch.stack([channel_taus(x, 0), channel_taus(x, 1)], dim=1).t()  # [2, 64], column-major
    assert not t.is_contiguous()
    y = native.native_op()(x, wt, b, [0.0, 0.0], [10, 10], None, t)
    ref = sparse_linear_fused_reference(x, wt, [10, 10], b, t)
    assert_close(y, ref, torch.float32)


# ----------------------------------------------------------------------------- CPU path (native / embedding_bag)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8])
def test_cpu_sparse_gemv_per_channel(dtype, M, cpu_path):
    x, w, b = make_case(M, 300, 70, dtype, "cpu")
    wt = w.t().contiguous()
    tvec = _discriminating(x, channel_taus(x, seed=M))
    y = cpu.cpu_sparse_gemv(x, wt, b, tvec)
    assert y.shape == (M, 70) and y.dtype == dtype
    assert_close(y, _ref(x, wt, b, tvec), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [1, 6])
def test_cpu_int8_per_channel(dtype, M, cpu_path):
    x, w, b = make_case(M, 172, 64, dtype, "cpu")
    qwt, scales = quantize_weight_int8(w)
    tvec = _discriminating(x, channel_taus(x, seed=2))
    y = cpu.cpu_sparse_gemv(x, qwt, b, tvec, scales=scales)
    assert_close(y, _ref(x, qwt, b, tvec, scales), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [1, 5])
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("form", ["list", "mixed", "tensor", "shared"])
def test_cpu_fused_per_channel(dtype, M, int8, form, cpu_path):
    """[K] vectors per segment as a list, mixed with floats, as one [nseg, K] tensor, or one
    vector for every segment."""
    sizes = [64, 17, 172]
    x, w, b = make_case(M, 172, sum(sizes), dtype, "cpu")
    wt, scales = weights(w, int8)
    t0, t1, t2 = (_discriminating(x, channel_taus(x, s)) for s in (0, 1, 2))
    thresholds, taus = {
        "list": ([t0, t1, t2], [t0, t1, t2]),
        "mixed": ([t0, 0.4, float("inf")], [t0, 0.4, float("inf")]),
        "tensor": (torch.stack([t0, t1, t2]), [t0, t1, t2]),
        "shared": ([t1], [t1, t1, t1]),
    }[form]
    y = cpu.cpu_sparse_gemv_fused(x, wt, b, thresholds, sizes, scales)
    ref = sparse_linear_fused_reference(x.float(), wt if int8 else wt.float(), sizes, b.float(), taus, scales)
    assert_close(y, ref, dtype)


def test_embedding_bag_mask_of_a_vector():
    x = torch.randn(3, 500, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    tvec = channel_taus(x)
    assert torch.equal(cpu._keep_mask_native(x, tvec), keep_mask(x, tvec))


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 5])
def test_cpu_equal_vector_is_the_scalar(dtype, M, cpu_path):
    x, w, b = make_case(M, 300, 70, dtype, "cpu")
    wt = w.t().contiguous()
    tau = threshold_for(x, 0.5)
    tvec = torch.full((300,), tau, dtype=torch.float32)
    assert torch.equal(cpu.cpu_sparse_gemv(x, wt, b, tvec), cpu.cpu_sparse_gemv(x, wt, b, tau))
    thr = torch.tensor([[tau] * 300, [2 * tau] * 300])
    assert torch.equal(
        cpu.cpu_sparse_gemv_fused(x, wt, b, thr, [30, 40]), cpu.cpu_sparse_gemv_fused(x, wt, b, [tau, 2 * tau], [30, 40])
    )


def test_batch_rule_per_channel(monkeypatch):
    """8 bf16 rows: the union of kept rows under the per-channel thresholds decides, as for a scalar.
    A vector that drops 90 % of the channels outright keeps the native op; a low one goes dense."""
    require_native()
    calls = count_native_calls(monkeypatch)
    x, w, b = make_case(8, 600, 90, torch.bfloat16, "cpu")
    wt = w.t().contiguous()
    low = torch.full((600,), threshold_for(x, 0.5))
    narrow = low.clone()
    narrow[60:] = float("inf")
    for tvec, expect in ((low, []), (narrow, [8])):
        calls.clear()
        assert_close(cpu.cpu_sparse_gemv(x, wt, b, tvec), _ref(x, wt, b, tvec), torch.bfloat16)
        thr = torch.stack([tvec, tvec * 1.5])
        y = cpu.cpu_sparse_gemv_fused(x, wt, b, thr, [40, 50])
        assert_close(y, sparse_linear_fused_reference(x.float(), wt.float(), [40, 50], b.float(), thr), torch.bfloat16)
        assert calls == expect * 2, tvec
    # a NaN row drops everything and does not count towards the union
    calls.clear()
    thr = torch.stack([narrow, torch.full((600,), NAN)])
    y = cpu.cpu_sparse_gemv_fused(x, wt, b, thr, [40, 50])
    assert_close(y, sparse_linear_fused_reference(x.float(), wt.float(), [40, 50], b.float(), thr), torch.bfloat16)
    assert calls == [8]


def test_shared_vector_forms():
    """[1, K] (or a one-item list) is one vector for every segment, on every entry point."""
    x, w, b = make_case(2, 64, 30, torch.float32, "cpu")
    wt = w.t().contiguous()
    tvec = channel_taus(x)
    ref = _ref(x, wt, b, tvec)
    for thr in (tvec.view(1, -1), [tvec]):
        assert_close(torch.cat(kernels.sparse_linear_fused(x, wt, [10, 20], b, thr), -1), ref, torch.float32)
        taus = kernels.ops.thresholds_tensor(thr, 2, x.device, 64)
        assert taus.shape == (2, 64)
        assert_close(torch.ops.spon_kernels.sparse_gemv(x, wt, b, taus, [10, 20], None), ref, torch.float32)
    assert_close(cpu.cpu_sparse_gemv_fused(x, wt, b, tvec.view(1, -1), [10, 20]), ref, torch.float32)


def test_normalize_thresholds_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="expected"):
        cpu.normalize_thresholds(torch.zeros(3, 10), 2, 10)
    with pytest.raises(ValueError, match="per-channel threshold has 9 entries"):
        cpu.normalize_thresholds([torch.zeros(9), 0.5], 2, 10)
    with pytest.raises(ValueError, match="3 thresholds for 2 segments"):
        cpu.normalize_thresholds([0.1, 0.2, 0.3], 2, 10)


# ----------------------------------------------------------------------------- public API, custom op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 172), (2, 3, 172), (4, 1, 172), (20, 172)])  # 20 rows: reference path
def test_sparse_linear_per_channel(dtype, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    _, w, b = make_case(1, 172, 64, dtype, "cpu")
    wt = kernels.prepare_weight(w)
    tvec = _discriminating(x, channel_taus(x))
    y = kernels.sparse_linear(x, wt, b, tvec)
    assert y.shape == (*shape[:-1], 64)
    assert_close(y, _ref(x, wt, b, tvec), dtype)
    q, s = kernels.quantize_weight_int8(w)
    assert_close(kernels.sparse_linear_int8(x, q, s, b, tvec), _ref(x, q, b, tvec, s), dtype)


@pytest.mark.parametrize("form", ["mixed", "tensor"])
@pytest.mark.parametrize("rows", [2, 12])
def test_sparse_linear_fused_per_channel(form, rows):
    sizes = [64, 17, 172]
    x = torch.randn(rows, 1, 172, generator=torch.Generator().manual_seed(2))
    ws = [torch.randn(n, 172) / 13 for n in sizes]
    bs = [torch.randn(64), None, torch.randn(172)]
    wt = kernels.prepare_weight_fused(ws)
    t0, t2 = _discriminating(x, channel_taus(x, 0)), _discriminating(x, channel_taus(x, 2))
    taus = [t0, 0.5, t2]
    thresholds = taus if form == "mixed" else torch.stack([t0, torch.full((172,), 0.5), t2])
    outs = kernels.sparse_linear_fused(x, wt, sizes, bs, thresholds)
    for y, w, b, t in zip(outs, ws, bs, taus):
        torch.testing.assert_close(y, kernels.sparse_linear_reference(x, w.t(), b, t), atol=1e-5, rtol=1e-5)
    ref = kernels.sparse_linear_fused_reference(x, wt, sizes, torch.cat([bs[0], torch.zeros(17), bs[2]]), thresholds)
    torch.testing.assert_close(torch.cat(outs, -1), ref, atol=1e-5, rtol=1e-5)


def test_sparse_linear_per_channel_without_native(monkeypatch):
    """The public API when the native op cannot be built (SPON_CPU_NATIVE=0): embedding_bag path."""
    monkeypatch.setattr(cpu, "native_op", lambda: None)
    x, w, b = make_case(3, 172, 81, torch.bfloat16, "cpu")
    wt = kernels.prepare_weight(w)
    tvec = _discriminating(x, channel_taus(x))
    assert_close(kernels.sparse_linear(x, wt, b, tvec), _ref(x, wt, b, tvec), torch.bfloat16)
    outs = kernels.sparse_linear_fused(x, wt, [40, 41], b, [tvec, 0.3])
    ref = sparse_linear_fused_reference(x.float(), wt.float(), [40, 41], b.float(), [tvec, 0.3])
    assert_close(torch.cat(outs, -1), ref, torch.bfloat16)


def test_sparse_linear_module_per_channel():
    lin = torch.nn.Linear(172, 64)
    x = torch.randn(1, 172)
    tvec = _discriminating(x, channel_taus(x))
    m = kernels.SparseGemvLinear.from_linear(lin, threshold=tvec)
    assert "per-channel [172]" in repr(m)
    with torch.no_grad():
        torch.testing.assert_close(m(x), lin(x * keep_mask(x, tvec)), atol=1e-5, rtol=1e-5)


def test_grad_falls_back_to_reference_per_channel():
    x, w, b = make_case(2, 64, 32, torch.float32, "cpu")
    x.requires_grad_(True)
    wt = kernels.prepare_weight(w)
    tvec = channel_taus(x.detach())
    kernels.sparse_linear(x, wt, b, tvec).sum().backward()
    torch.testing.assert_close(x.grad, keep_mask(x.detach(), tvec).float() * wt.sum(1)[None, :])
    x.grad = None
    outs = kernels.sparse_linear_fused(x, wt, [16, 16], b, [tvec, 0.2])
    sum(o.sum() for o in outs).backward()
    expect = keep_mask(x.detach(), tvec).float() * wt[:, :16].sum(1) + keep_mask(x.detach(), 0.2).float() * wt[:, 16:].sum(1)
    torch.testing.assert_close(x.grad, expect)


@pytest.mark.parametrize("M", [1, 5, 12])
@pytest.mark.parametrize("int8", [False, True])
def test_opcheck_per_channel(M, int8):
    x, w, b = make_case(M, 96, 40, torch.float32, "cpu")
    wt, s = weights(w, int8)
    taus = torch.stack([channel_taus(x, 0), channel_taus(x, 1)])
    torch.library.opcheck(torch.ops.spon_kernels.sparse_gemv.default, (x, wt, b, taus, [30, 10], s))
    y = torch.ops.spon_kernels.sparse_gemv(x, wt, b, taus, [30, 10], s)
    ref = sparse_linear_fused_reference(x, wt, [30, 10], b, taus, s)
    assert_close(y, ref, torch.float32)


def test_torch_compile_fullgraph_per_channel():
    x, w, b = make_case(1, 172, 64, torch.float32, "cpu")
    wt = kernels.prepare_weight(w)
    tvec = _discriminating(x, channel_taus(x))

    def f(x):
        return torch.relu(kernels.sparse_linear(x, wt, b, tvec)) * 2

    def g(x):
        return torch.cat(kernels.sparse_linear_fused(x, wt, [20, 44], b, [tvec, 0.5]), -1)

    def h(x):  # one vector shared by both projections
        return torch.cat(kernels.sparse_linear_fused(x, wt, [20, 44], b, [tvec]), -1)

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(x), f(x))
    torch.testing.assert_close(f(x), torch.relu(_ref(x, wt, b, tvec)) * 2)
    torch.testing.assert_close(torch.compile(g, fullgraph=True, backend="aot_eager")(x), g(x))
    torch.testing.assert_close(torch.compile(h, fullgraph=True, backend="aot_eager")(x), _ref(x, wt, b, tvec))


# ----------------------------------------------------------------------------- Triton (interpreted on CPU)
triton_only = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")


@triton_only
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,split_k", [(1, 1), (3, 2)])  # GEMV / tl.dot; direct store / two-stage reduce
def test_triton_per_channel(device, dtype, M, split_k):
    from kernels.triton_sparse_gemv import triton_sparse_gemv

    x, w, b = make_case(M, 96, 40, dtype, device)
    wt = w.t().contiguous()
    tvec = _discriminating(x.cpu(), channel_taus(x.cpu()))
    y = triton_sparse_gemv(x, wt, b, tvec.view(1, -1).to(device), split_k=split_k)
    assert_close(y, _ref(x, wt, b, tvec), dtype)


@triton_only
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("M,int8", [(1, True), (3, False)])
def test_triton_per_channel_fused(device, M, int8):
    K, sizes = 96, [33, 17, 40]
    x, w, b = make_case(M, K, sum(sizes), torch.float32, device)
    wt, scales = weights(w, int8)
    xc = x.cpu()
    thr = torch.stack([_discriminating(xc, channel_taus(xc, s)) for s in (0, 1, 2)])
    from kernels.triton_sparse_gemv import triton_sparse_gemv

    y = triton_sparse_gemv(x, wt, b, thr.to(device), seg_sizes=sizes, scales=scales, split_k=2 if M == 3 else None)
    ref = sparse_linear_fused_reference(xc, wt.cpu(), sizes, b.cpu(), thr, None if scales is None else scales.cpu())
    assert_close(y, ref, torch.float32)


@triton_only
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_equal_vector_is_the_scalar(device):
    from kernels.triton_sparse_gemv import triton_sparse_gemv

    x, w, b = make_case(3, 96, 40, torch.bfloat16, device)
    wt = w.t().contiguous()
    tau = threshold_for(x, 0.5)
    y_scalar = triton_sparse_gemv(x, wt, b, torch.tensor([tau, 2 * tau], device=device), seg_sizes=[20, 20])
    thr = torch.tensor([[tau] * 96, [2 * tau] * 96], device=device)
    assert torch.equal(triton_sparse_gemv(x, wt, b, thr, seg_sizes=[20, 20]), y_scalar)
