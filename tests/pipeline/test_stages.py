"""Stage tasks outside a flow (their plain functions): the optional kernel benchmark stage."""

from __future__ import annotations

import json
from pathlib import Path


def test_benchmark_kernels_small_cpu(tmp_path):
    from spon.tasks.bench import benchmark_kernels

    ref = benchmark_kernels.fn(0.5, str(tmp_path))
    result = json.loads((Path(ref.dir) / "bench_cpu.json").read_text())
    # kernels.bench's own schema: the stage's small CPU configuration, measured, at this sparsity.
    assert Path(ref.dir) == tmp_path / "bench" / "s0.50" and ref.stage == "bench"
    assert result["meta"]["device_type"] == "cpu" and result["meta"]["threads"] == 1
    rows = result["kernel"]
    assert sorted((r["in_features"], r["out_features"], r["sparsity"]) for r in rows) == [
        (512, 512, 0.0), (512, 512, 0.5), (512, 1376, 0.0), (512, 1376, 0.5)]
    for r in rows:
        assert (r["dtype"], r["batch"]) == ("fp32", 1), r
        assert abs(r["sparsity_measured"] - r["sparsity"]) <= 1 / 512 + 1e-9, r  # 1 row of 512 inputs
        assert r["max_abs_err_vs_reference"] <= 1e-4, r  # the kernel computed S(x) W^T + b
        assert 0 < r["dense_ms"] < 1e3 and 0 < r["sparse_ms"] < 1e3, r
