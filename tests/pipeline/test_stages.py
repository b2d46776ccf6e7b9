"""Stage tasks outside a flow (their plain functions): the optional kernel benchmark stage."""

from __future__ import annotations

import json
from pathlib import Path


def test_benchmark_kernels_small_cpu(tmp_path):
    from spon.tasks.bench import benchmark_kernels

    ref = benchmark_kernels.fn(0.5, str(tmp_path))
    result = json.loads((Path(ref.dir) / "bench_cpu.json").read_text())
    assert result  # kernels.bench's own schema; the stage only runs and files it
