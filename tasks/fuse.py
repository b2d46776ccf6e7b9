"""fuse: b' = b + W alpha into a vanilla transformers checkpoint (spon.stages.fuse)."""

from __future__ import annotations

from prefect import task

from spon import stages
from spon.runtime.refs import ModelRef, StageRef

from .policies import run_stage, stage


@task(**stage("fuse"))
def fuse(model: ModelRef, calib: StageRef, thresholds: StageRef, alpha: StageRef, device: str, dtype: str,
         work_dir: str) -> StageRef:
    return run_stage("fuse", locals(), lambda out, key: stages.fuse(
        stages.base_model(model.path, device, dtype), calib.dir, thresholds.dir, alpha.dir, out, source=model.source,
        card=False))  # written once, with the perplexities, when the flow collects its results


def fused_model(fused: StageRef) -> ModelRef:
    """The fused checkpoint as a model reference (its digest is the fuse stage key)."""
    return ModelRef(source=fused.dir, path=fused.dir, digest=f"stage:{fused.key}", is_spon=True)
