"""distill_spon: train and select alpha (spon.stages.distill).

Progress goes to a Prefect progress artifact through distill's on_step callback. Checkpoints go
to a directory named by the stage key, so a rerun after a kill resumes instead of restarting.
"""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from spon import stages
from spon.config import DistillConfig
from spon.runtime.refs import ModelRef, StageRef
from spon.runtime.workdir import checkpoint_dir

from .policies import run_stage, stage


def progress_reporter(steps: int, key: str):
    """on_step callback updating a progress artifact about 50 times over the run."""
    artifact_id = create_progress_artifact(progress=0.0, key=f"distill-{key}", description=f"alpha distillation ({steps} steps)")
    every = max(steps // 50, 1)

    def on_step(step: int, kl: float) -> None:
        done = step + 1
        if done % every == 0 or done == steps:
            update_progress_artifact(artifact_id, progress=100.0 * done / steps, description=f"step {done}/{steps}, KL {kl:.4f}")

    return on_step


@task(**stage("distill"))
def distill_spon(model: ModelRef, calib: StageRef, thresholds: StageRef, cfg: DistillConfig, device: str, dtype: str,
                 work_dir: str, progress: bool = False) -> StageRef:
    return run_stage("distill", locals(), lambda out, key: stages.distill(
        stages.base_model(model.path, device, dtype), calib.dir, thresholds.dir, cfg, out,
        checkpoint_dir=checkpoint_dir(work_dir, "distill", key), checkpoint_key=key, progress=progress,
        on_step=progress_reporter(cfg.steps, key) if cfg.steps else None))
