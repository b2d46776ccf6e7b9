"""benchmark_kernels: kernels.bench on a small CPU configuration -> bench_cpu.json (optional stage).

Not cached: it measures the machine, not a function of its inputs.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import task

from spon.errors import SponError

from spon.tasks.policies import UNCACHED
from spon.runtime.refs import StageRef

SMALL_CPU = ["--device", "cpu", "--shapes", "512x512,512x1376", "--dtypes", "fp32", "--batches", "1",
             "--reps", "5", "--min-time", "0.1", "--no-plot", "--threads", "1"]


@task(name="benchmark_kernels", **UNCACHED)
def benchmark_kernels(sparsity: float, work_dir: str) -> StageRef:
    from spon.kernels.bench import main as bench_main

    t0 = time.perf_counter()
    out = Path(work_dir) / "bench" / f"s{sparsity:.2f}"
    rc = bench_main(SMALL_CPU + ["--sparsities", f"0.0,{sparsity}", "--out", str(out)])
    if rc != 0:
        raise SponError(f"kernel benchmark failed (exit {rc})")
    return StageRef(stage="bench", key="uncached", dir=str(out), wall_s=round(time.perf_counter() - t0, 3))
