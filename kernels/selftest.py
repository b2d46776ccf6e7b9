"""Pytest-free correctness sweep of the Triton kernel against the torch reference.

For bare GPU images without pytest (bench_gpu.sh falls back to it):

    python -m kernels.selftest --device cuda

Covers fp32/fp16/bf16, batch 1..8, odd sizes, sparsity 0/0.5/1, direct and
split-K stores, int8 weights and fused segments.  Exit status 1 on any failure.
"""
from __future__ import annotations

import argparse
import itertools
import sys

import torch

from .reference import (
    quantize_weight_int8,
    sparse_linear_fused_reference,
    sparse_linear_int8_reference,
    sparse_linear_reference,
)
from .triton_sparse_gemv import HAS_TRITON, triton_sparse_gemv

TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 2e-2)}


def _tau(x, s):
    if s <= 0:
        return -1.0
    if s >= 1:
        return float("inf")
    return float(x.abs().float().flatten().quantile(s))


def run(device: str, quick: bool = False) -> int:
    g = torch.Generator().manual_seed(0)
    failures, n = [], 0
    for dtype, M, (K, N), s, split_k, mode in itertools.product(
        [torch.float32, torch.float16, torch.bfloat16],
        [1, 5] if quick else [1, 2, 5, 8],
        [(172, 64)] if quick else [(172, 64), (64, 172), (1000, 300)],
        [0.5] if quick else [0.0, 0.5, 1.0],
        [None, 3],
        ["plain", "int8", "fused", "channel"],
    ):
        x = torch.randn(M, K, generator=g).to(device, dtype)
        w = (torch.randn(N, K, generator=g) / K**0.5).to(device, dtype)
        b = torch.randn(N, generator=g).to(device, dtype)
        tau = _tau(x, s)
        thr = torch.tensor([tau], device=device)
        if mode == "plain":
            wt = w.t().contiguous()
            y = triton_sparse_gemv(x, wt, b, thr, split_k=split_k)
            ref = sparse_linear_reference(x.float(), wt.float(), b.float(), tau)
        elif mode == "int8":
            q, sc = quantize_weight_int8(w)
            y = triton_sparse_gemv(x, q, b, thr, scales=sc, split_k=split_k)
            ref = sparse_linear_int8_reference(x.float(), q, sc, b.float(), tau)
        elif mode == "channel":
            # one threshold per segment and input channel (the weighted criterion), incl. +inf and < 0
            sizes = [N // 3, N // 3, N - 2 * (N // 3)]
            thr = torch.rand(3, K, generator=g) * 2 * _tau(x, 0.5)
            thr[:, ::7] = float("inf")
            thr[1, 1::5] = -1.0
            wt = w.t().contiguous()
            y = triton_sparse_gemv(x, wt, b, thr.to(device), seg_sizes=sizes, split_k=split_k)
            ref = sparse_linear_fused_reference(x.float(), wt.float(), sizes, b.float(), thr.to(device))
        else:
            sizes = [N // 3, N // 3, N - 2 * (N // 3)]
            taus = [tau, _tau(x, 0.3), float("inf")]
            wt = w.t().contiguous()
            y = triton_sparse_gemv(x, wt, b, torch.tensor(taus, device=device), seg_sizes=sizes, split_k=split_k)
            ref = sparse_linear_fused_reference(x.float(), wt.float(), sizes, b.float(), taus)
        n += 1
        atol, rtol = TOL[dtype]
        if not torch.allclose(y.float(), ref.float(), atol=atol, rtol=rtol):
            err = (y.float() - ref.float()).abs().max().item()
            failures.append(f"{mode} {dtype} M={M} K={K} N={N} s={s} split_k={split_k}: max err {err:.3g}")
    for f in failures:
        print("FAIL", f)
    print(f"selftest on {device}: {n - len(failures)}/{n} passed")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small subset (for the CPU interpreter)")
    args = p.parse_args(argv)
    if not HAS_TRITON:
        print("triton not installed", file=sys.stderr)
        return 1
    return run(args.device, args.quick)


if __name__ == "__main__":
    raise SystemExit(main())
