"""build_calibration: token blocks from the configured source -> calibration.safetensors."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import task
from safetensors.torch import save_file

from spon.config import CalibrationConfig
from spon.run import build_calibration as _build

from tasks.loading import CALIBRATION_FILE, sparse_model
from tasks.policies import STAGE
from tasks.types import ModelRef, StageRef, TextFile
from tasks.workdir import atomic_dir, stage_dir, stage_key


@task(name="build_calibration", **STAGE)
def build_calibration(model: ModelRef, cfg: CalibrationConfig, files: list[TextFile], targets: list[str],
                      device: str, dtype: str, work_dir: str) -> StageRef:
    t0 = time.perf_counter()
    final = stage_dir(work_dir, "calibration", stage_key(model.digest, cfg, files, targets, device, dtype))
    m, tok = sparse_model(model, targets, device, dtype)
    blocks = _build(m, tok, cfg.model_copy(update={"files": [f.path for f in files]}))
    with atomic_dir(final) as tmp:
        save_file({"blocks": blocks.contiguous()}, str(Path(tmp) / CALIBRATION_FILE))
    return StageRef(stage="calibration", dir=str(final), wall_s=round(time.perf_counter() - t0, 3))
