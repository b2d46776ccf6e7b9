"""Distillation steps/s and peak RSS per rank with 1 and with N processes (torchrun, spon.distributed).

    .venv/bin/python benchmarks/distributed_distill.py --steps 50 [--nproc 1,2] [--threads 1] [--model DIR]

Calibrates once with the default recipe (stories260K unless --model: 512 blocks of 128 sampled
tokens, 50 % thresholds), then for each process count runs the distill stage under
`torchrun --nproc-per-node N` on the same calibration and prints, side by side: optimizer steps/s
over the loop (from the end of the first step to the end of the last, held-out evaluations
excluded), the stage's wall time (model load, teacher cache and held-out evaluations included)
and every rank's peak RSS. torchrun gives each of several ranks one thread (OMP_NUM_THREADS=1), a
single process keeps torch's default (--threads T: every rank T threads): on a 2-core CPU, 2 ranks
share the cores one process had.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

TAG = "RESULT "


def worker(args) -> None:
    """One rank: the distill stage, timed from inside the loop."""
    import torch

    from spon import distributed, stages
    from spon.config import DistillConfig

    distributed.init(args.device)
    ends: list[float] = []
    out = Path(args.out)
    t0 = time.perf_counter()
    stages.distill(stages.base_model(args.model, args.device), args.calib, args.calib, DistillConfig(steps=args.steps),
                   out, on_step=lambda step, kl: ends.append(time.perf_counter()))
    wall = time.perf_counter() - t0
    row = {"rank": distributed.rank(), "world_size": distributed.world_size(), "threads": torch.get_num_threads(),
           "steps_per_s": (len(ends) - 1) / (ends[-1] - ends[0]), "stage_wall_s": wall,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print(TAG + json.dumps(row), flush=True)
    distributed.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--nproc", default="1,2", help="comma list of process counts")
    p.add_argument("--model", default=None, help="default: the embedded stories260K")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads per rank (OMP_NUM_THREADS; default: "
                   "torchrun's, 1 per rank when several, torch's own for one)")
    p.add_argument("--work", default="out/bench/distributed_distill")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--calib", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    from spon import stages
    from spon.config import CalibrationConfig, SparsityConfig
    from spon.sources import default_model_path

    model = args.model or default_model_path()
    work = Path(args.work)
    calib = work / "calibration"
    if not (calib / stages.THRESHOLDS_FILE).is_file():  # the default recipe's calibration, made once
        calib.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        base = stages.base_model(model, args.device)
        stages.calibrate(base, CalibrationConfig(), calib)
        stages.thresholds(base, calib, SparsityConfig(), calib)
        print(f"calibration (512 x 128 sampled, 50 % thresholds): {time.perf_counter() - t0:.1f} s")
    rows: dict[int, list[dict]] = {}
    for n in (int(x) for x in args.nproc.split(",")):
        out = work / f"nproc{n}"
        out.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), __file__, "--worker", "--steps", str(args.steps), "--model", model,
               "--device", args.device, "--calib", str(calib), "--out", str(out)]
        env = {**os.environ, "TQDM_DISABLE": "1", **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            sys.exit(f"nproc {n} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        rows[n] = sorted((json.loads(ln[len(TAG):]) for ln in r.stdout.splitlines() if ln.startswith(TAG)),
                         key=lambda x: x["rank"])
    base = rows[min(rows)][0]["steps_per_s"]
    print(f"{args.steps} steps, default recipe (16 blocks x 128 tokens per step), {args.device}, {os.cpu_count()} CPUs")
    print(f"{'processes':>9} {'threads/rank':>12} {'steps/s':>8} {'vs ' + str(min(rows)):>6} {'stage wall s':>12}  peak RSS per rank (MB)")
    for n, rs in rows.items():
        sps = rs[0]["steps_per_s"]
        print(f"{n:>9} {rs[0]['threads']:>12} {sps:>8.2f} {sps / base:>5.2f}x {rs[0]['stage_wall_s']:>12.1f}  "
              + ", ".join(f"{x['peak_rss_mb']:.0f}" for x in rs))
    kl = {n: json.loads((work / f"nproc{n}" / stages.DISTILL_FILE).read_text()) for n in rows}
    print("held-out KL at the last step: " + ", ".join(f"{n} proc {kl[n]['heldout_kl_last']:.6f}" for n in rows))


if __name__ == "__main__":
    main()
