"""The native op of another commit against this tree's, and both against dense F.linear, interleaved.

    .venv/bin/python -m kernels.compare_builds --baseline 94b5462 --threads 1 --cold 64 --out runs/cmp.json

The baseline's csrc/cpu_sparse_gemv.cpp is taken from git, its library renamed (spon_cpu_old) and
built beside this tree's op, so one process times F.linear(x, W), the old op and the new op on the
same x and W, in turn, call after call (1.5 s per point, median and minimum per side). --cold MB:
each call reads its own copy of the weights from a pool of about MB megabytes (weights out of
cache, as in decode). Batch 1; shapes of SmolLM2-135M and Llama-3.2-1B; sparsity 0 and 50 %.
--dtypes int8,int4: the quantized weights (bf16 activations; int4 in groups of --int4-group
inputs), against F.linear on the bf16 weights they stand for.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [(576, 960), (576, 3072), (1536, 576), (2048, 2048), (8192, 2048)]


def build_baseline(commit: str, root: Path):
    from torch.utils.cpp_extension import load

    from .cpu_native import _put_ninja_on_path

    src = subprocess.run(["git", "show", f"{commit}:kernels/csrc/cpu_sparse_gemv.cpp"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    src = src.replace("TORCH_LIBRARY(spon_cpu,", "TORCH_LIBRARY(spon_cpu_old,").replace(
        "TORCH_LIBRARY_IMPL(spon_cpu,", "TORCH_LIBRARY_IMPL(spon_cpu_old,")
    d = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache/torch_extensions")) / f"spon_cpu_old_{commit}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "old.cpp").write_text(src)
    _put_ninja_on_path()
    load(name=f"spon_cpu_old_{commit}", sources=[str(d / "old.cpp")], extra_cflags=["-O3", "-march=native", "-fopenmp"],
         extra_ldflags=["-fopenmp"], build_directory=str(d), is_python_module=False)
    return torch.ops.spon_cpu_old.sparse_gemv


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="94b5462", help="git commit whose native op is the baseline")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cold", type=float, default=0.0, metavar="MB")
    ap.add_argument("--seconds", type=float, default=1.5, help="per point")
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="in x out, comma separated")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16, int8, int4")
    ap.add_argument("--int4-group", type=int, default=32)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    from .cpu_native import native_op

    root = Path(__file__).resolve().parents[1]
    old, new = build_baseline(args.baseline, root), native_op()
    torch.set_num_threads(args.threads)
    rows = []
    print("load", os.getloadavg(), "threads", args.threads, "cold MB", args.cold, flush=True)
    from .reference import dequantize_weight_int4_t, dequantize_weight_t, quantize_weight_int4, quantize_weight_int8

    for name in args.dtypes.split(","):
        dt = torch.float32 if name == "fp32" else torch.bfloat16
        for K, N in shapes:
            w0 = (torch.randn(N, K) / math.sqrt(K)).to(dt)
            if name == "int8":
                q0, scales = quantize_weight_int8(w0.float())
                w_ref = dequantize_weight_t(q0, scales)
            elif name == "int4":
                q0, scales = quantize_weight_int4(w0.float(), group_size=args.int4_group)
                w_ref = dequantize_weight_int4_t(q0, scales)
            else:
                q0, scales, w_ref = w0.t().contiguous(), None, w0.float().t()
            bytes_ = max(q0.numel() * q0.element_size(), N * K * w0.element_size())
            c = max(1, min(256, math.ceil(args.cold * 2**20 / bytes_))) if args.cold else 1
            ws = [w0] + [w0.clone() for _ in range(c - 1)]
            wts = [q0] + [q0.clone() for _ in range(c - 1)]
            x = torch.randn(1, K).to(dt)
            for s in (0.0, 0.5):
                tau = -1.0 if s == 0 else float(x.abs().float().quantile(s))
                i = [0]

                def nxt():
                    i[0] += 1
                    return i[0] % c

                fs = {"F.linear": lambda: F.linear(x, ws[nxt()]),
                      "old": lambda: old(x, wts[nxt()], None, [tau], [N], scales),
                      "new": lambda: new(x, wts[nxt()], None, [tau], [N], scales)}
                ref = (x.float() * (x.float().abs() > tau)) @ w_ref
                assert (new(x, wts[0], None, [tau], [N], scales).float() - ref).abs().max() < 0.05
                t = {n: [] for n in fs}
                end = time.perf_counter() + args.seconds
                while time.perf_counter() < end or len(t["new"]) < 30:
                    for n, f in fs.items():
                        a = time.perf_counter()
                        f()
                        t[n].append(time.perf_counter() - a)
                med = {n: statistics.median(v) * 1e6 for n, v in t.items()}
                mn = {n: min(v) * 1e6 for n, v in t.items()}
                rows.append(dict(dtype=name, K=K, N=N, sparsity=s, median_us=med, min_us=mn, copies=c))
                print(f"{name:5s} {K}x{N} s={s}: F.linear {med['F.linear']:.1f}us old {med['old']:.1f} "
                      f"new {med['new']:.1f} | new/F.linear x{med['F.linear'] / med['new']:.2f} "
                      f"(min x{mn['F.linear'] / mn['new']:.2f}) new/old x{med['old'] / med['new']:.2f} "
                      f"(min x{mn['old'] / mn['new']:.2f})", flush=True)
    print("load", os.getloadavg())
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(baseline=args.baseline, threads=args.threads, cold_mb=args.cold,
                                            loadavg_end=list(os.getloadavg()), rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
