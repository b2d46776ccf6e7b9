"""compute_thresholds: TEAL thresholds on the training split -> thresholds.json."""

from __future__ import annotations

import time

from prefect import task

from spon.config import SparsityConfig
from spon.run import split_heldout
from spon.thresholds import compute_thresholds as _compute

from tasks.loading import THRESHOLDS_FILE, calibration_blocks, sparse_model
from tasks.policies import STAGE
from tasks.types import ModelRef, StageRef
from tasks.workdir import atomic_dir, stage_dir, stage_key, write_json


@task(name="compute_thresholds", **STAGE)
def compute_thresholds(model: ModelRef, calib: StageRef, cfg: SparsityConfig, heldout_blocks: int,
                       device: str, dtype: str, work_dir: str) -> StageRef:
    t0 = time.perf_counter()
    final = stage_dir(work_dir, "thresholds", stage_key(model.digest, calib.dir, cfg, heldout_blocks, device, dtype))
    m, _ = sparse_model(model, cfg.targets, device, dtype)
    train, _ = split_heldout(calibration_blocks(calib), heldout_blocks)
    taus, per_proj = _compute(m, train, cfg.sparsity, cfg.allocation, cfg.greedy_step, cfg.greedy_blocks)
    with atomic_dir(final) as tmp:
        write_json(tmp / THRESHOLDS_FILE, {"thresholds": taus, "sparsities": per_proj})
    return StageRef(stage="thresholds", dir=str(final), wall_s=round(time.perf_counter() - t0, 3))
