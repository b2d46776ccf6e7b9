"""calibrate: token blocks from the configured source, split into train/heldout (spon.stages.calibrate)."""

from __future__ import annotations

from prefect import task

from spon import stages
from spon.config import CalibrationConfig
from spon.runtime.refs import ModelRef, StageRef, TextFile

from .policies import run_stage, stage


@task(**stage("calibrate"))
def build_calibration(model: ModelRef, cfg: CalibrationConfig, files: list[TextFile], device: str, dtype: str,
                      work_dir: str) -> StageRef:
    """files: the calibration text files by content (cfg.files names them by path)."""
    return run_stage("calibrate", locals(), lambda out, key: stages.calibrate(
        stages.base_model(model.path, device, dtype), cfg.model_copy(update={"files": [f.path for f in files]}), out))
