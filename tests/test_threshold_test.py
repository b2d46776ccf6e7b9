"""One threshold test: S(x) = x * 1{|x| > tau}, |x| compared with the fp32 tau, on every path.

The torch SparseLinear of the method, spon.kernels.reference.keep_mask, the public
spon.kernels.sparse_linear (native CPU decode op, embedding_bag fallback, dense masked, torch
reference) and the Triton kernel (interpreted on CPU) must keep exactly the same elements in bf16,
fp16 and fp32 - in particular the boundary elements next to tau after rounding to x's dtype: when
tau rounds *up* in bf16/fp16, the dtype value it rounds to is > tau (kept by the fp32 test) but
equal to tau-in-dtype (dropped by a comparison made in x's dtype).

The oracle is exact arithmetic: every bf16/fp16/fp32 value and the fp32 tau are exact in fp64.

Every weight here is the identity, so a path's output *is* the sparsified input: y == x * keep.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import spon.kernels as K
from spon.kernel_backend import KernelSingle
from spon.kernels import cpu_sparse_gemv as cpu
from spon.kernels.cpu_native import native_op
from spon.kernels.reference import keep_mask, quantize_weight_int8
from spon.kernels.triton_sparse_gemv import HAS_TRITON
from spon.sparse import SparseLinear, counting_zeros

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
IDS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
WIDTH = 128  # features per row (the identity is WIDTH x WIDTH)


def _step(v: torch.Tensor, n: int) -> torch.Tensor:
    """v (positive, finite, one dtype) moved n ulps in its own dtype."""
    ibits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[v.dtype]
    return (v.view(ibits) + n).view(v.dtype)


def _fp32_just_below(value: float, dtype) -> float:
    """The fp32 number one fp32-ulp below `value` rounded to dtype: it rounds *up* to that value
    in dtype (and in every coarser dtype holding it), the case a dtype compare gets wrong."""
    v = torch.tensor(value, dtype=dtype).float()
    return float(_step(v, -1))


def taus_for(dtype) -> list[float]:
    """fp32 thresholds: rounding up in dtype (the bf16 value is also an fp16 value), rounding down,
    exactly representable, zero, and a typical calibrated magnitude."""
    up = _fp32_just_below(0.3, torch.bfloat16)
    assert torch.tensor(up).to(torch.bfloat16).float().item() > up  # premise: rounds up in bf16
    assert torch.tensor(up).to(torch.float16).float().item() > up  # ... and in fp16
    down = float(_step(torch.tensor(0.3, dtype=torch.bfloat16).float(), 1))  # just above a bf16 value
    return [up, _fp32_just_below(0.0123, torch.float16), down, 0.25, 0.0, 0.047213]


def straddling(tau: float, dtype, rows: int, seed: int = 0, subnormal: bool = False) -> torch.Tensor:
    """[rows, WIDTH] of x in dtype: in every row, both signs of the dtype values around tau (tau
    rounded to dtype and its neighbours 1 and 2 ulps either side: floor_d(tau) and ceil_d(tau)
    among them), +-0, then seeded values in [-2 tau, 2 tau] (or [-1, 1] for tau = 0)."""
    t = torch.tensor(tau, dtype=torch.float32)
    near = t.to(dtype)  # tau rounded to the dtype: the boundary element
    if tau > 0:
        special = torch.stack([_step(near, n) for n in (-2, -1, 0, 1, 2)])
    else:  # tau = 0 drops exact zeros only: the smallest normal (and subnormal) survive
        tiny = torch.tensor(torch.finfo(dtype).tiny, dtype=dtype)
        # (matmuls may flush subnormal outputs, so the identity-weight paths get normals only)
        special = torch.stack([tiny, _step(tiny, 1)] + ([_step(torch.zeros((), dtype=dtype), 1)] if subnormal else []))
    special = torch.cat([special, -special, torch.tensor([0.0, -0.0], dtype=dtype)])
    g = torch.Generator().manual_seed(seed)
    scale = 2 * tau if tau > 0 else 1.0
    out = []
    for _ in range(rows):
        fill = (torch.rand(WIDTH - len(special), generator=g) * 2 - 1) * scale
        row = torch.cat([special, fill.to(dtype)])
        out.append(row[torch.randperm(WIDTH, generator=g)])
    return torch.stack(out)


def oracle(x: torch.Tensor, tau: float) -> torch.Tensor:
    """Exact: |x| > tau in fp64, where x (any of these dtypes) and the fp32 tau are exact."""
    return x.double().abs() > torch.tensor(tau, dtype=torch.float32).double()


def identity_linear(dtype) -> nn.Linear:
    lin = nn.Linear(WIDTH, WIDTH, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(WIDTH))
    return lin.to(dtype)


def method_linear(dtype, tau: float, kernels: bool) -> SparseLinear:
    m = SparseLinear(identity_linear(dtype), "0.q", "q")
    m.threshold.fill_(tau)
    m.mode = "teal"
    if kernels:
        KernelSingle(m)  # what use_kernels gives a projection outside a shared-input group
    return m


def assert_same_elements(y: torch.Tensor, x: torch.Tensor, keep: torch.Tensor, what: str) -> None:
    expect = x * keep.to(x.dtype)
    bad = (y != expect).nonzero()
    assert y.shape == x.shape and y.dtype == x.dtype, what
    assert bad.numel() == 0, (
        f"{what}: {len(bad)} element(s) differ from x * 1{{|x| > tau}}, e.g. x={x[tuple(bad[0])].item()!r} "
        f"kept={bool(keep[tuple(bad[0])])} got {y[tuple(bad[0])].item()!r}")


CASES = [pytest.param(d, i, id=f"{IDS[d]}-tau{i}") for d in DTYPES for i in range(len(taus_for(d)))]


@pytest.mark.parametrize("dtype,ti", CASES)
def test_keep_mask_is_the_exact_test(dtype, ti):
    tau = taus_for(dtype)[ti]
    x = straddling(tau, dtype, 4, subnormal=True)
    keep = oracle(x, tau)
    for threshold in (tau, torch.tensor(tau), torch.tensor([tau])):
        assert torch.equal(keep_mask(x, threshold), keep)
    assert torch.equal(cpu._keep_mask_native(x, tau), keep)  # the native path's floor_d(tau) rewrite
    if tau > 0 and dtype != torch.float32:  # the premise of the boundary test holds for this tau
        near = torch.tensor(tau).to(dtype)
        assert bool(oracle(near, tau)) == (near.float().item() > tau)


@torch.no_grad()
@pytest.mark.parametrize("dtype,ti", CASES)
@pytest.mark.parametrize("rows", [1, 3, 6, 8, 16])
def test_torch_sparse_linear_and_kernels_keep_the_same_elements(dtype, ti, rows):
    tau = taus_for(dtype)[ti]
    x = straddling(tau, dtype, rows, seed=rows)
    keep = oracle(x, tau)

    torch_path = method_linear(dtype, tau, kernels=False)
    assert torch.equal(torch_path.keep(x), keep), "SparseLinear.keep is not |x| > tau with the fp32 tau"
    assert_same_elements(torch_path(x), x, keep, "SparseLinear (torch)")
    assert_same_elements(torch_path.S(x), x, keep, "SparseLinear.S")
    x3 = x.view(1, rows, WIDTH)  # [batch, tokens, features], as in the model
    assert_same_elements(torch_path(x3), x3, keep.view(1, rows, WIDTH), "SparseLinear (torch, 3-d)")

    kernel_path = method_linear(dtype, tau, kernels=True)  # SparseLinear after use_kernels
    assert_same_elements(kernel_path(x), x, keep, "SparseLinear (kernels)")
    assert_same_elements(kernel_path(x3), x3, keep.view(1, rows, WIDTH), "SparseLinear (kernels, 3-d)")

    wt = K.prepare_weight(identity_linear(dtype).weight)
    for threshold in (tau, torch.tensor(tau), torch.tensor([tau])):
        assert_same_elements(K.sparse_linear(x, wt, None, threshold), x, keep, f"sparse_linear({type(threshold).__name__})")
    assert_same_elements(K.sparse_linear_reference(x, wt, None, tau), x, keep, "sparse_linear_reference")

    # The realized sparsity the method reports counts the same elements.
    with counting_zeros(torch_path) as z:
        torch_path(x)
    assert z["per_projection"]["0.q"] == pytest.approx(1 - keep.double().mean().item(), abs=1e-12)


@torch.no_grad()
@pytest.mark.parametrize("dtype,ti", CASES)
@pytest.mark.parametrize("rows", [1, 6, 8])
def test_every_cpu_path_keeps_the_same_elements(dtype, ti, rows):
    tau = taus_for(dtype)[ti]
    x = straddling(tau, dtype, rows, seed=10 + rows)
    keep = oracle(x, tau)
    wt = K.prepare_weight(identity_linear(dtype).weight)
    if native_op() is not None:
        y = native_op()(x, wt, None, [tau], [WIDTH], None)
        assert_same_elements(y, x, keep, "native op")
        # two segments with their own thresholds in one pass (q/k/v-style fused projections)
        wt2 = torch.cat([wt, wt], dim=1).contiguous()
        y2 = native_op()(x, wt2, None, [tau, 2 * tau + 1.0], [WIDTH, WIDTH], None)
        assert_same_elements(y2[:, :WIDTH], x, keep, "native op, segment 0")
        assert_same_elements(y2[:, WIDTH:], x, oracle(x, 2 * tau + 1.0), "native op, segment 1")
    assert_same_elements(cpu._embedding_bag_gemv(x, wt, None, tau, None, None), x, keep, "embedding_bag")
    assert_same_elements(cpu._dense_masked(x, cpu._keep_mask_native(x, tau), wt, None), x, keep, "dense masked")
    assert_same_elements(cpu.cpu_sparse_gemv(x, wt, None, tau), x, keep, "cpu_sparse_gemv")
    ys = K.sparse_linear_fused(x, torch.cat([wt, wt], dim=1).contiguous(), [WIDTH, WIDTH], None, [tau, 0.0])
    assert_same_elements(ys[0], x, keep, "sparse_linear_fused, segment 0")
    assert_same_elements(ys[1], x, oracle(x, 0.0), "sparse_linear_fused, segment 1")
    if dtype == torch.bfloat16:  # int8 weights (bf16 activations): kept elements are the nonzero outputs
        q, scales = quantize_weight_int8(identity_linear(torch.float32).weight)
        y = K.sparse_linear_int8(x, q, scales, None, tau)
        assert torch.equal(y != 0, keep & (x != 0)), "int8"


def check_triton(ts, device: str, dtype, tau: float) -> None:
    """The Triton kernel (module ts) on device against the oracle and the method's torch path."""
    x = straddling(tau, dtype, 4, seed=3)
    keep = oracle(x, tau)
    wt = K.prepare_weight(identity_linear(dtype).weight)
    for split_k in (1, 2):  # direct store, and the fp32 workspace + reduce
        y = ts.triton_sparse_gemv(x.to(device), wt.to(device), None, torch.tensor([tau], device=device), split_k=split_k)
        assert_same_elements(y.cpu(), x, keep, f"triton (split_k={split_k})")
    m = method_linear(dtype, tau, kernels=False).to(device)
    assert_same_elements(m(x.to(device)).cpu(), x, keep, f"SparseLinear (torch, {device})")


@torch.no_grad()
@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="compiled Triton needs triton and CUDA")
@pytest.mark.parametrize("dtype,ti", CASES)
def test_triton_kernel_keeps_the_same_elements_cuda(dtype, ti):
    import spon.kernels.triton_sparse_gemv as ts

    check_triton(ts, "cuda", dtype, taus_for(dtype)[ti])


INTERPRETED = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import test_threshold_test as t
import spon.kernels.triton_sparse_gemv as ts
with torch.no_grad():
    for dtype in t.DTYPES:
        for tau in t.taus_for(dtype):
            t.check_triton(ts, "cpu", dtype, tau)
print("checked", sum(len(t.taus_for(d)) for d in t.DTYPES))
"""


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_kernel_keeps_the_same_elements_interpreted():
    """On CPU through the Triton interpreter, in a fresh process: triton chooses interpreter or
    compiler when it is imported, and this process may have imported it already."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", INTERPRETED, str(Path(__file__).parent)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"checked {len(CASES)}" in r.stdout, r.stdout
