"""The CPU decode paths (native op for batch 1, embedding_bag) against the torch reference."""
import pytest
import torch

from helpers import assert_close, count_native_calls, make_case, require_native, threshold_for, weights
from spon.kernels import cpu_native as native
from spon.kernels import cpu_sparse_gemv as cpu
from spon.kernels.reference import (
    quantize_weight_int8,
    sparse_linear_fused_reference,
    sparse_linear_int8_reference,
    sparse_linear_reference,
)

CPU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _ref(x, wt, b, tau):
    return sparse_linear_reference(x.float(), wt.float(), None if b is None else b.float(), tau)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 2, 5, 8])
@pytest.mark.parametrize("K,N", [(172, 64), (64, 172), (1000, 300)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("bias", [True, False])
def test_cpu_sparse_gemv(dtype, M, K, N, sparsity, bias, cpu_path):
    x, w, b = make_case(M, K, N, dtype, "cpu", bias=bias)
    wt = w.t().contiguous()
    tau = threshold_for(x, sparsity)
    y = cpu.cpu_sparse_gemv(x, wt, b, tau)
    assert y.shape == (M, N) and y.dtype == dtype
    assert_close(y, _ref(x, wt, b, tau), dtype)


@pytest.mark.parametrize("rows_per_bag", [1, 7, 10_000])
def test_cpu_bag_splits(rows_per_bag, monkeypatch):
    # One bag, many tiny bags, and empty bags (a batch row with no survivors).
    monkeypatch.setattr(cpu, "native_op", lambda: None)
    monkeypatch.setattr(cpu, "SERIAL_BYTES", 0)  # small sizes would otherwise use one bag
    x, w, b = make_case(3, 500, 70, torch.float32, "cpu")
    x[1] = 0.0
    wt = w.t().contiguous()
    y = cpu.cpu_sparse_gemv(x, wt, b, 0.8, rows_per_bag=rows_per_bag)
    assert_close(y, _ref(x, wt, b, 0.8), torch.float32)
    torch.testing.assert_close(y[1], b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [1, 6])
def test_cpu_int8(dtype, M, cpu_path):
    x, w, b = make_case(M, 172, 64, dtype, "cpu")
    qwt, scales = quantize_weight_int8(w)
    tau = threshold_for(x, 0.5)
    y = cpu.cpu_sparse_gemv(x, qwt, b, tau, scales=scales)
    assert_close(y, sparse_linear_int8_reference(x.float(), qwt, scales, b.float(), tau), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("same_tau", [True, False])
@pytest.mark.parametrize("int8", [False, True])
def test_cpu_fused(dtype, same_tau, int8, cpu_path):
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
    from spon.kernels.reference import keep_mask

    x = torch.randn(20000, generator=torch.Generator().manual_seed(0)).to(dtype)
    values = x.float().abs().unique()[::97].tolist()
    taus = [0.0, 1e-8, 0.3333, 65504.0, 1e6, float("inf")]
    for v in values:
        taus += [v, v * (1 + 1e-7), v * (1 - 1e-7)]
    for tau in taus:
        assert torch.equal(cpu._keep_mask_native(x, tau), keep_mask(x, tau)), tau


# ----------------------------------------------------------------------------- native op
@pytest.fixture
def native_only(monkeypatch):
    """The native op must be what runs: embedding_bag would raise."""
    require_native()

    def no_bag(*a, **k):
        raise AssertionError("embedding_bag called on the native path")

    monkeypatch.setattr(cpu.F, "embedding_bag", no_bag)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("K,N", [(1024, 1030), (3000, 700)])  # > 1 MiB of rows: the threaded split
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
@pytest.mark.parametrize("M", [1, 5])
def test_native_threaded_and_thread_count_independent(dtype, K, N, sparsity, M, native_only):
    """The op itself (whatever the batching rule would pick): 1 and 2 threads agree bit for bit."""
    x, w, b = make_case(M, K, N, dtype, "cpu")
    wt = w.t().contiguous()
    tau = threshold_for(x, sparsity)
    op = native.native_op()
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = op(x, wt, b, [tau], [N], None)
        torch.set_num_threads(2)
        y2 = op(x, wt, b, [tau], [N], None)
    finally:
        torch.set_num_threads(prev)
    assert_close(y2, _ref(x, wt, b, tau), dtype)
    # A column's sum is cut and ordered by the shape and the kept rows only, never by the threads: bit-identical.
    assert torch.equal(y1, y2)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("K,N", [(64, 300), (1024, 1030), (3000, 700)])  # one thread; column split; row split
@pytest.mark.parametrize("M", [1, 3])
def test_native_minus_inf_threshold_is_f_linear_nan_included(dtype, K, N, M, native_only):
    """tau = -inf keeps every input, NaN too: a dense GEMV with F.linear's numbers (the LM head's path)."""
    x, w, b = make_case(M, K, N, dtype, "cpu")
    x[0, 5] = float("nan")
    y = native.native_op()(x, w.t().contiguous(), b, [float("-inf")], [N], None)
    ref = torch.nn.functional.linear(x.float(), w.float(), b.float())
    assert torch.isnan(y[0]).all() and not torch.isnan(y[1:]).any()  # F.linear's NaN row, nothing else
    assert_close(y[1:], ref[1:], dtype)
    x[0, 5] = 0.0
    assert_close(native.native_op()(x, w.t().contiguous(), b, [float("-inf")], [N], None),
                 torch.nn.functional.linear(x.float(), w.float(), b.float()), dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_native_threshold_semantics(dtype, native_only):
    """Strict |x| > tau in fp32, as the reference: on representable values,
    negative (keep all), inf and NaN (keep none)."""
    x, w, _ = make_case(3, 300, 40, dtype, "cpu")
    wt = w.t().contiguous()
    values = x.float().abs().flatten().unique()[::19].tolist()
    for tau in values + [-1.0, 0.0, float("inf"), float("nan")]:
        y = cpu.cpu_sparse_gemv(x, wt, None, tau)
        assert_close(y, _ref(x, wt, None, tau), dtype)
    assert torch.count_nonzero(cpu.cpu_sparse_gemv(x, wt, None, float("nan"))) == 0


def test_native_non_contiguous_input(native_only):
    x, w, b = make_case(1, 344, 50, torch.float32, "cpu")
    xs = x[:, ::2]  # [1, 172], stride 2
    wt = w[:, :172].t().contiguous()
    assert_close(cpu.cpu_sparse_gemv(xs, wt, b, 0.5), _ref(xs, wt, b, 0.5), torch.float32)


def test_native_rejects_mismatched_shapes():
    require_native()
    op = native.native_op()
    with pytest.raises(RuntimeError, match=r"x must be \[M, 64\]"):
        op(torch.randn(1, 63), torch.randn(64, 8), None, [0.1], [8], None)
    with pytest.raises(RuntimeError, match="1 to 8 rows, got 9"):
        op(torch.randn(9, 64), torch.randn(64, 8), None, [0.1], [8], None)
    with pytest.raises(RuntimeError, match="scales go with int8"):
        op(torch.randn(1, 64), torch.randn(64, 8), None, [0.1], [8], torch.ones(8))
    with pytest.raises(RuntimeError, match="segment sizes sum to 7"):
        op(torch.randn(1, 64), torch.randn(64, 8), None, [0.1, 0.2], [3, 4], None)
    with pytest.raises(RuntimeError, match="one threshold per segment"):
        op(torch.randn(1, 64), torch.randn(64, 8), None, [0.1], [4, 4], None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("K", [172, 6000])  # at 6000 the rows to read pass 1 MiB: threaded
@pytest.mark.parametrize("M", [1, 4])
def test_native_fused_per_segment_thresholds(dtype, int8, K, M, native_only):
    """Fused projections with their own thresholds: one native pass, each
    segment over its own survivors (segments straddle the threads' column ranges)."""
    sizes = [64, 17, 172]
    x, w, b = make_case(M, K, sum(sizes), dtype, "cpu")
    taus = [threshold_for(x, 0.3), threshold_for(x, 0.8), float("inf")]
    wt, scales = quantize_weight_int8(w) if int8 else (w.t().contiguous(), None)
    y = cpu.cpu_sparse_gemv_fused(x, wt, b, taus, sizes, scales)
    ref = sparse_linear_fused_reference(x.float(), wt if int8 else wt.float(), sizes, b.float(), taus, scales)
    assert_close(y, ref, dtype)
    torch.testing.assert_close(y[:, 81:], b[81:].expand(M, -1))  # tau = inf: bias only


# Run in a fresh process: each build registers the same op name, one per process.
_ARCH_CHECK = """
import sys, torch
sys.path.insert(0, {helpers!r})
from helpers import assert_close, make_case, threshold_for
from spon.kernels.cpu_native import native_op
from spon.kernels.reference import quantize_weight_int4, quantize_weight_int8, sparse_linear_fused_reference
op = native_op()
assert op is not None, "build failed"
torch.set_num_threads(2)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for int8, M in ((False, 1), (True, 1), (False, 3), (True, 8)):
        for K, sizes in ((300, [173]), (3000, [64, 17, 949])):  # odd widths: every SIMD tail
            x, w, b = make_case(M, K, sum(sizes), dtype, "cpu")
            taus = [threshold_for(x, s) for s in (0.5, 0.2, 0.9)][: len(sizes)]
            wt, scales = quantize_weight_int8(w) if int8 else (w.t().contiguous(), None)
            y = op(x, wt, b, taus, sizes, scales)
            ref = sparse_linear_fused_reference(x.float(), wt if int8 else wt.float(), sizes, b.float(), taus, scales)
            assert_close(y, ref, dtype)
            # per input channel: each segment its own vector
            ct = torch.rand(len(sizes), K, generator=torch.Generator().manual_seed(K)) * 2 * taus[0]
            ct[:, ::7] = float("inf")
            y = op(x, wt, b, [0.0] * len(sizes), sizes, scales, ct)
            ref = sparse_linear_fused_reference(x.float(), wt if int8 else wt.float(), sizes, b.float(), ct, scales)
            assert_close(y, ref, dtype)
    # int4, group-wise scales: every 32-column block of every segment through this build's loads
    for M in (1, 3):
        x, w, b = make_case(M, 256, 160, dtype, "cpu")
        q, s4 = quantize_weight_int4(w, 64)
        taus = [threshold_for(x, 0.5), threshold_for(x, 0.2)]
        y = op(x, q, b, taus, [96, 64], s4)
        assert_close(y, sparse_linear_fused_reference(x.float(), q, [96, 64], b.float(), taus, s4), dtype)
print("ok")
"""


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["haswell", "x86-64"])  # AVX2 path, scalar path (this box builds AVX-512)
def test_native_other_instruction_sets(arch, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    require_native()
    here = Path(__file__).parent
    env = dict(os.environ, SPON_CPU_NATIVE_ARCH=arch)
    r = subprocess.run(
        [sys.executable, "-c", _ARCH_CHECK.format(helpers=str(here))],
        cwd=here.parent.parent, env=env, capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


@pytest.mark.slow
def test_native_build_survives_a_killed_build(tmp_path):
    """A build killed mid-way leaves torch's lock file behind; the next process
    must build anyway instead of waiting on it forever."""
    import os
    import subprocess
    import sys

    require_native()
    build_dir = tmp_path / f"spon_cpu_sparse_gemv_{native._cpu_tag()}"
    build_dir.mkdir()
    (build_dir / "lock").write_text("")  # what a SIGKILLed build leaves
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path))
    code = "from spon.kernels.cpu_native import native_op; assert native_op() is not None; print('ok')"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


@pytest.mark.slow
def test_failed_build_warns_once_and_falls_back(tmp_path):
    """No usable compiler for the target: one warning, then the embedding_bag path, same numbers."""
    import os
    import subprocess
    import sys

    code = """
import warnings, torch
from spon.kernels.cpu_native import native_op
from spon.kernels.cpu_sparse_gemv import cpu_sparse_gemv
from spon.kernels.reference import sparse_linear_reference
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    x, wt = torch.randn(1, 300), torch.randn(300, 70)
    y = cpu_sparse_gemv(x, wt, None, 0.5)
    y2 = cpu_sparse_gemv(x, wt, None, 0.5)
assert native_op() is None
torch.testing.assert_close(y, sparse_linear_reference(x, wt, None, 0.5), atol=1e-4, rtol=1e-4)
msgs = [str(m.message) for m in w if "native CPU sparse GEMV unavailable" in str(m.message)]
assert len(msgs) == 1, msgs
print("ok")
"""
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path), SPON_CPU_NATIVE_ARCH="no-such-cpu")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_batch_rule_dense_when_the_union_is_wide(dtype, monkeypatch):
    """8 bf16 rows with independent masks at 50% keep ~all rows of Wᵀ together:
    the dense masked matmul costs less than the native op's 8 FMAs per weight.
    fp32 and fp16 stay native (their dense CPU matmul is slower still)."""
    require_native()
    calls = count_native_calls(monkeypatch)
    x, w, b = make_case(8, 600, 90, dtype, "cpu")
    wt = w.t().contiguous()
    tau = threshold_for(x, 0.5)
    assert_close(cpu.cpu_sparse_gemv(x, wt, b, tau), _ref(x, wt, b, tau), dtype)
    # ... and the fused entry point follows the same rule
    taus = [tau, tau * 1.1]
    y = cpu.cpu_sparse_gemv_fused(x, wt, b, taus, [40, 50])
    assert_close(y, sparse_linear_fused_reference(x.float(), wt.float(), [40, 50], b.float(), taus), dtype)
    assert calls == ([] if dtype == torch.bfloat16 else [8, 8])


@pytest.mark.parametrize("M", [2, 3, 8])
def test_batch_rule_native_when_rows_share_their_sparsity(M, monkeypatch):
    """Rows that keep the same few inputs (the union stays at 10%) take the native op."""
    require_native()
    calls = count_native_calls(monkeypatch)
    x, w, b = make_case(1, 600, 90, torch.bfloat16, "cpu")
    x = x * torch.linspace(0.5, 1.5, M, dtype=x.dtype)[:, None]  # same support in every row
    wt = w.t().contiguous()
    tau = threshold_for(x[-1:], 0.9)
    assert_close(cpu.cpu_sparse_gemv(x, wt, b, tau), _ref(x, wt, b, tau), torch.bfloat16)
    assert calls == [M]
