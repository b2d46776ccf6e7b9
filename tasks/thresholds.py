"""compute_thresholds: TEAL thresholds on the training blocks (spon.stages.thresholds)."""

from __future__ import annotations

from prefect import task

from spon import stages
from spon.config import SparsityConfig
from spon.runtime.refs import ModelRef, StageRef

from .policies import run_stage, stage


@task(**stage("thresholds"))
def compute_thresholds(model: ModelRef, calib: StageRef, cfg: SparsityConfig, device: str, dtype: str,
                       work_dir: str) -> StageRef:
    return run_stage("thresholds", locals(), lambda out, key: stages.thresholds(
        stages.base_model(model.path, device, dtype), calib.dir, cfg, out))
