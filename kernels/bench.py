"""Kernel-level benchmark: sparse vs dense linear, side by side in one process.

    python -m kernels.bench --device cpu --shapes 4096x14336,14336x4096 --dtypes fp32,bf16 --batches 1
    python -m kernels.bench --device cuda            # full GPU suite (see bench_gpu.sh)

Kernel level: y = sparse_linear(x, Wᵀ, tau) vs the dense baseline
``F.linear(x, W)`` in the same dtype (W stored [out, in] as in the model),
timed interleaved in one process.  ``--per-channel`` also times the
per-input-channel threshold path (the weighted criterion: keep x_k iff
|x_k|·||W[:, k]|| > tau, i.e. the vector tau / ||W[:, k]||, tau set for the
same sparsity) against the scalar path, interleaved, in both orders, and
reports the ratio (geometric mean of the two orders).  For each point it records the median
times, the ratio, the ideal ratio 1/(1-s_eff) where s_eff is the fraction of
weight rows the batch can skip (every batch row must drop the feature), and
achieved GB/s of weight traffic against the measured device copy bandwidth.

End to end (transformers' own ``model.generate`` with the kernels on the
shipped path, ``spon.use_kernels``): ``benchmarks/decode.py`` — it needs
transformers and spon, which this module (torch + triton only) does not import.

Writes ``<out>/bench_<device>.json`` and, if matplotlib is importable,
``<out>/bench_<device>.png``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# Relative imports: the kernels run from a bare copy of the repository (kernels/bench_gpu.sh on a
# GPU machine with nothing of ours installed) as well as installed as spon.kernels.
from . import cpu_native
from . import cpu_sparse_gemv as _cpu
from . import (
    prepare_weight,
    quantize_weight_int4,
    quantize_weight_int8,
    sparse_linear,
    sparse_linear_int4,
    sparse_linear_int8,
    sparse_linear_reference,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Llama-3-8B projections, written in->out: q/o, k/v, gate/up, down.
LLAMA3_8B_SHAPES = ["4096x4096", "4096x1024", "4096x14336", "14336x4096"]
SPARSITIES = [0.0, 0.25, 0.4, 0.5, 0.6, 0.7]


# ----------------------------------------------------------------------------- timing
class Timer:
    """Median wall time per call; CUDA via triton.testing.do_bench (flushes L2)."""

    def __init__(self, device: torch.device, reps: int, min_time_s: float):
        self.device = device
        self.reps = reps
        self.min_time_s = min_time_s

    def pair(self, fa, fb) -> tuple[float, float]:
        """Time two callables; returns median seconds for each (``self.last_min``: minima)."""
        if self.device.type == "cuda":
            ta, tb = self._cuda(fa), self._cuda(fb)
            self.last_min = (ta, tb)
            return ta, tb
        # CPU: interleave a and b so drift (thermal, other load) hits both.
        for _ in range(2):
            fa(), fb()
        ta, tb = [], []
        t_end = time.perf_counter() + self.min_time_s
        while len(ta) < self.reps or (time.perf_counter() < t_end and len(ta) < 20 * self.reps):
            t0 = time.perf_counter()
            fa()
            t1 = time.perf_counter()
            fb()
            t2 = time.perf_counter()
            ta.append(t1 - t0)
            tb.append(t2 - t1)
        # Minima are kept too: on a shared machine other processes inflate
        # the median, the minimum is the least-disturbed run of each side.
        self.last_min = (min(ta), min(tb))
        return statistics.median(ta), statistics.median(tb)

    def _cuda(self, f) -> float:
        import triton.testing

        return triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median") * 1e-3

    def one(self, f) -> float:
        return self.pair(f, f)[0]


def copy_bandwidth(device: torch.device, timer: Timer) -> float:
    """Device copy bandwidth in GB/s (bytes read + bytes written)."""
    nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    t = timer.one(lambda: dst.copy_(src))
    del src, dst
    return 2 * nbytes / t / 1e9


# ----------------------------------------------------------------------------- kernel level
def _parse_shape(s: str) -> tuple[int, int]:
    a, b = s.lower().split("x")
    return int(a), int(b)


def bench_kernels(args, device: torch.device, timer: Timer, copy_bw: float, rows: list, save=lambda: None) -> list[dict]:
    """Appends one row per point to ``rows`` and calls ``save`` after each (partial
    results survive a timeout)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    for dname in args.dtypes:
        int8, int4 = dname == "int8", dname == "int4"
        dtype = DTYPES["bf16" if int8 or int4 else dname]
        for shape in args.shapes:
            K, N = _parse_shape(shape)
            w = (torch.randn(N, K, generator=gen) / math.sqrt(K)).to(device=device, dtype=dtype)
            if int8:
                wt, scales = quantize_weight_int8(w)
                wt, scales = wt.to(device), scales.to(device)
                wbytes = 1
            elif int4:
                wt, scales = quantize_weight_int4(w, args.int4_group)
                wt, scales = wt.to(device), scales.to(device)
                wbytes = 0.5 + 4 / args.int4_group  # packed nibbles + one fp32 scale per group
            else:
                wt, scales = prepare_weight(w), None
                wbytes = w.element_size()
            # --cold: every call reads its own copy of the weights, from a pool larger than the
            # caches, as a decode step does (each matrix read once per token); dense and sparse alike.
            copies = 1
            if args.cold_mb:
                copies = max(2, min(256, math.ceil(args.cold_mb * 2**20 / (N * K * w.element_size()))))
            ws = [w] + [w.clone() for _ in range(copies - 1)]
            wts = [wt] + [wt.clone() for _ in range(copies - 1)]
            turn = [0, 0]
            for M in args.batches:
                x = torch.randn(M, K, generator=gen).to(device=device, dtype=dtype)
                for s in args.sparsities:
                    tau_f = -1.0 if s <= 0 else float(x.abs().float().flatten().quantile(s))
                    tau = torch.tensor([tau_f], dtype=torch.float32, device=device)
                    keep = x.abs().float() > tau_f
                    s_row = 1.0 - keep.float().mean().item()
                    s_eff = 1.0 - keep.any(0).float().mean().item()  # rows of Wᵀ the batch skips

                    def dense():
                        turn[0] += 1
                        return F.linear(x, ws[turn[0] % copies])

                    if int8:

                        def sparse():
                            turn[1] += 1
                            return sparse_linear_int8(x, wts[turn[1] % copies], scales, None, tau)
                    elif int4:

                        def sparse():
                            turn[1] += 1
                            return sparse_linear_int4(x, wts[turn[1] % copies], scales, None, tau)
                    else:

                        def sparse():
                            turn[1] += 1
                            return sparse_linear(x, wts[turn[1] % copies], None, tau)

                    with torch.no_grad():
                        if int4:  # against the int4 model itself (the float model differs by its quantization)
                            from .reference import sparse_linear_int4_reference

                            expect = sparse_linear_int4_reference(x, wt, scales, None, tau_f)
                        else:
                            expect = sparse_linear_reference(x, w.t(), None, tau_f)
                        err = (sparse().float() - expect.float()).abs().max().item()
                        t_dense, t_sparse = timer.pair(dense, sparse)
                        min_dense, min_sparse = timer.last_min
                    dense_bytes = N * K * w.element_size()
                    sparse_bytes = (1 - s_eff) * N * K * wbytes
                    speedup = t_dense / t_sparse
                    ideal = (w.element_size() / wbytes) / max(1 - s_eff, 1e-9)
                    row = dict(
                        dtype=dname,
                        in_features=K,
                        out_features=N,
                        batch=M,
                        sparsity=s,
                        sparsity_measured=round(s_row, 4),
                        sparsity_effective=round(s_eff, 4),
                        dense_ms=t_dense * 1e3,
                        sparse_ms=t_sparse * 1e3,
                        speedup=speedup,
                        dense_ms_min=min_dense * 1e3,
                        sparse_ms_min=min_sparse * 1e3,
                        speedup_of_min=min_dense / min_sparse,
                        ideal_speedup=ideal,
                        frac_of_ideal=speedup / ideal if ideal < 1e8 else None,
                        dense_GBps=dense_bytes / t_dense / 1e9,
                        sparse_GBps=sparse_bytes / t_sparse / 1e9,
                        dense_frac_copy_bw=dense_bytes / t_dense / 1e9 / copy_bw,
                        sparse_frac_copy_bw=sparse_bytes / t_sparse / 1e9 / copy_bw,
                        max_abs_err_vs_reference=err,
                        weight_copies=copies,
                    )
                    if args.per_channel:
                        _bench_per_channel(row, x, w, wt, scales, s, sparse, timer)
                    rows.append(row)
                    save()
                    print(
                        f"{dname:9s} {K:>5d}->{N:<5d} b={M} s={s:.2f} (eff {s_eff:.2f})  "
                        f"dense {t_dense*1e3:8.3f} ms  sparse {t_sparse*1e3:8.3f} ms  "
                        f"x{speedup:5.2f} (min x{min_dense / min_sparse:5.2f}, ideal x{ideal:5.2f})  "
                        f"{row['sparse_GBps']:7.1f} GB/s ({row['sparse_frac_copy_bw']:.0%} of copy)",
                        flush=True,
                    )
                    if args.per_channel:
                        print(
                            f"{'':9s} per-channel (s={row['pc_sparsity_measured']:.2f}): scalar "
                            f"{row['pc_scalar_ms']:8.3f} ms  per-channel {row['pc_per_channel_ms']:8.3f} ms  "
                            f"per-channel/scalar {row['per_channel_over_scalar']:.3f} (min {row['per_channel_over_scalar_min']:.3f}; "
                            f"timed second/first {row['per_channel_over_scalar_by_order'][0]:.3f}/"
                            f"{row['per_channel_over_scalar_by_order'][1]:.3f})",
                            flush=True,
                        )
            del w, wt, ws, wts
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per (dtype, shape, batch): the kernel at 0 % over dense F.linear (target: >= 0.95), and per
    sparsity s > 0 the kernel's own speedup over itself at 0 % as a fraction of 1/(1 - s_eff)
    (target at 50 %: >= 0.9).  Times from the same run; each pair was timed interleaved."""
    out = []
    keyf = lambda r: (r["dtype"], r["in_features"], r["out_features"], r["batch"])  # noqa: E731
    for key in sorted({keyf(r) for r in rows}):
        sub = {r["sparsity"]: r for r in rows if keyf(r) == key}
        if 0.0 not in sub:
            continue
        z = sub[0.0]
        entry = dict(dtype=key[0], in_features=key[1], out_features=key[2], batch=key[3],
                     kernel0_over_dense=z["speedup"], kernel0_over_dense_of_min=z["speedup_of_min"])
        for s_, r in sorted(sub.items()):
            if s_ > 0:
                own = z["sparse_ms"] / r["sparse_ms"]
                entry[f"own_speedup_{s_:g}"] = own
                entry[f"frac_of_ideal_own_{s_:g}"] = own * (1 - r["sparsity_effective"])
        out.append(entry)
    return out


def _bench_per_channel(row: dict, x, w, wt, scales, s: float, scalar_sparse, timer: Timer) -> None:
    """Per-channel thresholds vs the scalar one at the same realized sparsity, timed as a pair.

    The vector is the weighted criterion's: tau_k = tau / ||W[:, k]||, with tau the s-quantile
    of |x_k|·||W[:, k]||, so the same fraction of x is dropped (other elements than the scalar's)."""
    col_norm = w.float().norm(dim=0).clamp_min(1e-12)  # [K]
    if s <= 0:
        tvec = torch.full_like(col_norm, -1.0)
    else:
        tvec = float((x.abs().float() * col_norm).flatten().quantile(s)) / col_norm
    if scales is not None:

        def per_channel():
            return sparse_linear_int8(x, wt, scales, None, tvec)
    else:

        def per_channel():
            return sparse_linear(x, wt, None, tvec)

    with torch.no_grad():
        err = (per_channel().float() - sparse_linear_reference(x, w.t(), None, tvec).float()).abs().max().item()
        # Both orders: the call timed second finds the rows the first one just read in cache
        # (a few % at 576-wide shapes); the geometric mean of the two ratios cancels that.
        s1, p1 = timer.pair(scalar_sparse, per_channel)
        ms1, mp1 = timer.last_min
        p2, s2 = timer.pair(per_channel, scalar_sparse)
        mp2, ms2 = timer.last_min
    keep = x.abs().float() > tvec
    row.update(
        pc_sparsity_measured=round(1.0 - keep.float().mean().item(), 4),
        pc_sparsity_effective=round(1.0 - keep.any(0).float().mean().item(), 4),
        pc_scalar_ms=(s1 + s2) / 2 * 1e3,
        pc_per_channel_ms=(p1 + p2) / 2 * 1e3,
        per_channel_over_scalar=math.sqrt(p1 / s1 * p2 / s2),
        per_channel_over_scalar_min=math.sqrt(mp1 / ms1 * mp2 / ms2),
        per_channel_over_scalar_by_order=[p1 / s1, p2 / s2],
        pc_max_abs_err_vs_reference=err,
    )


# ----------------------------------------------------------------------------- plot
def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not available: skipping plot", file=sys.stderr)
        return False
    rows = result["kernel"]
    groups = sorted({(r["dtype"], r["batch"]) for r in rows})
    if not groups:
        return False
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 4), squeeze=False)
    for ax, (dt, b) in zip(axes[0], groups):
        sub = [r for r in rows if r["dtype"] == dt and r["batch"] == b]
        for shape in sorted({(r["in_features"], r["out_features"]) for r in sub}):
            pts = sorted((r["sparsity"], r["speedup"]) for r in sub if (r["in_features"], r["out_features"]) == shape)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{shape[0]}→{shape[1]}")
        ss = sorted({r["sparsity"] for r in sub})
        ideal = sorted({(r["sparsity"], r["ideal_speedup"]) for r in sub if r["batch"] == 1})
        if b == 1 and ideal:
            ax.plot([p[0] for p in ideal], [p[1] for p in ideal], "k--", label="ideal 1/(1-s)")
        elif ss:
            ax.plot(ss, [1 / (1 - s) for s in ss], "k:", label="1/(1-s) per row")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_title(f"{result['meta']['device']} {dt} batch {b}")
        ax.set_xlabel("activation sparsity")
        ax.set_ylabel("speedup vs dense F.linear")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
    return True


# ----------------------------------------------------------------------------- main
class _Parser(argparse.ArgumentParser):
    """A bad argument is one line, `spon: error: bench: ...`, and exit status 2, like every other
    spon command (spon.errors is not imported here: kernels/ depends on torch and triton only)."""

    def error(self, message):
        self.exit(2, f"spon: error: bench: {message}\n")


def _shape(s: str) -> str:
    try:
        k, n = _parse_shape(s)
    except ValueError:
        k = n = 0
    if k < 1 or n < 1:
        raise argparse.ArgumentTypeError(f"invalid shape {s!r}: expected INxOUT with positive sizes, e.g. 4096x14336")
    return s


def _sparsity(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not (math.isfinite(v) and 0.0 <= v < 1.0):
        raise argparse.ArgumentTypeError(f"sparsity {s} is not in [0, 1)")
    return v


def _choice(*names: str):
    def check(s: str) -> str:
        if s not in names:
            raise argparse.ArgumentTypeError(f"unknown dtype {s!r}: choose from {', '.join(names)}")
        return s

    return check


def _at_least(minimum, kind=int, strict: bool = False):
    """An int (or float) >= minimum (> minimum when strict)."""
    def check(s: str):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(v) or v < minimum or (strict and v == minimum):
            raise argparse.ArgumentTypeError(f"{s} must be {'>' if strict else '>='} {minimum}")
        return v

    return check


def _csv(kind):
    def items(s: str) -> list:
        out = [kind(v.strip()) for v in s.split(",") if v.strip()]
        if not out:
            raise argparse.ArgumentTypeError(f"empty list {s!r}")
        return out

    return items


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="spon bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--shapes", type=_csv(_shape), default=LLAMA3_8B_SHAPES, help="in x out, comma separated")
    p.add_argument("--dtypes", type=_csv(_choice(*DTYPES, "int8", "int4")), default=None,
                   help="fp32,fp16,bf16,int8,int4 (int8 / int4 = bf16 x, int8 / group-wise int4 Wᵀ; dense baseline "
                   "bf16 F.linear); default fp16,bf16,int8 on cuda, fp32,bf16 on cpu")
    p.add_argument("--int4-group", type=_at_least(1), default=64, help="int4: input rows per scale")
    p.add_argument("--cold", dest="cold_mb", type=_at_least(0, float), default=0.0, metavar="MB",
                   help="rotate each side over copies of its weights totalling about MB megabytes, so every call "
                   "reads weights that are not in cache (as in decode); 0 (default): one copy, hot in cache")
    p.add_argument("--batches", type=_csv(_at_least(1)), default=None, help="default 1,4,8 (cuda) / 1 (cpu)")
    p.add_argument("--sparsities", type=_csv(_sparsity), default=SPARSITIES, help="comma list in [0, 1)")
    p.add_argument("--reps", type=_at_least(1), default=15, help="CPU: minimum timed repetitions per point")
    p.add_argument("--min-time", type=_at_least(0, float, strict=True), default=0.5, help="CPU: seconds per point (upper bound 20*reps)")
    p.add_argument("--threads", type=_at_least(1), default=None, help="torch CPU threads")
    p.add_argument("--cpu-path", default="native", choices=["native", "embedding_bag"],
                   help="CPU decode path: the native op (falls back to embedding_bag if it cannot be built) "
                   "or embedding_bag")
    p.add_argument("--bag-rows", type=_at_least(1), default=None, help="CPU path: surviving rows per embedding bag")
    p.add_argument("--per-channel", action="store_true",
                   help="also time per-input-channel thresholds (tau / ||W[:, k]||) against the scalar threshold "
                   "at the same sparsity, interleaved; JSON fields pc_* and per_channel_over_scalar")
    p.add_argument("--out", default=None, help="output dir (default $OUT or runs/bench)")
    p.add_argument("--no-plot", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("spon: error: bench: --device cuda but no CUDA device", file=sys.stderr)
        return 2
    gpu = device.type == "cuda"
    args.dtypes = args.dtypes or (["fp16", "bf16", "int8"] if gpu else ["fp32", "bf16"])
    args.batches = args.batches or ([1, 4, 8] if gpu else [1])
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.bag_rows:
        _cpu.ROWS_PER_BAG = args.bag_rows
    if args.cpu_path == "embedding_bag":
        os.environ["SPON_CPU_NATIVE"] = "0"  # read on the first CPU call, below
    out_dir = Path(args.out or os.environ.get("OUT") or "runs/bench")
    out_dir.mkdir(parents=True, exist_ok=True)

    timer = Timer(device, args.reps, args.min_time)
    meta = dict(
        device=torch.cuda.get_device_name(device) if gpu else (platform.processor() or platform.machine()),
        device_type=device.type,
        torch=torch.__version__,
        triton=_triton_version(),
        threads=torch.get_num_threads(),
        argv=recorded_argv(sys.argv[1:] if argv is None else argv),
        time=time.strftime("%Y-%m-%dT%H:%M:%S"),
        loadavg_start=_loadavg(),
        cpu_model=_cpu_model(),
        cold_mb=args.cold_mb,
    )
    if not gpu:
        meta["cpu_path"] = "native" if cpu_native.native_op() is not None else "embedding_bag"
    with torch.no_grad():
        meta["copy_GBps"] = copy_bandwidth(device, timer)
    print(f"device {meta['device']}  copy bandwidth {meta['copy_GBps']:.1f} GB/s  threads {meta['threads']}  "
          + (f"cpu path {meta['cpu_path']}  " if not gpu else "") + f"loadavg {meta['loadavg_start']}")
    result = dict(meta=meta, kernel=[])
    json_path = out_dir / f"bench_{device.type}.json"

    def save():
        json_path.write_text(json.dumps(result, indent=1))

    bench_kernels(args, device, timer, meta["copy_GBps"], result["kernel"], save)
    meta["loadavg_end"] = _loadavg()
    result["summary"] = summarize(result["kernel"])
    for e in result["summary"]:
        extra = "  ".join(f"{k[len('frac_of_ideal_own_'):]}: own x{e['own_speedup_' + k[len('frac_of_ideal_own_'):]]:.2f} "
                          f"= {v:.0%} of ideal" for k, v in e.items() if k.startswith("frac_of_ideal_own_"))
        print(f"summary {e['dtype']:5s} {e['in_features']:>5d}->{e['out_features']:<5d} b={e['batch']}  "
              f"kernel@0% / F.linear x{e['kernel0_over_dense']:.2f} (min x{e['kernel0_over_dense_of_min']:.2f})  {extra}")
    save()
    print(f"wrote {json_path}")
    if not args.no_plot and result["kernel"]:
        plot(result, out_dir / f"bench_{device.type}.png")
    return 0


def recorded_argv(argv: list[str]) -> list[str]:
    """The options that shaped the measurement, without this machine's paths: the script's own
    path becomes the module name and --out (where the JSON itself lies) is left out."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not a.startswith("--out="):
            kept.append(a)
    return ["kernels.bench", *kept]


def _cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _loadavg():
    # Other processes on a shared CPU box distort timings; record how busy it was.
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
