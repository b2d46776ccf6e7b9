"""evaluate: perplexity of a fused model in dense, TEAL and SPON modes (spon.stages.evaluate)."""

from __future__ import annotations

from prefect import task

from spon import stages
from spon.config import EvalConfig
from spon.runtime.refs import ModelRef, StageRef, TextFile

from .policies import run_stage, stage


@task(**stage("evaluate"))
def evaluate(model: ModelRef, cfg: EvalConfig, files: list[TextFile], device: str, dtype: str, work_dir: str) -> StageRef:
    """files: the eval texts by content (cfg.files names them by path)."""
    return run_stage("evaluate", locals(), lambda out, key: stages.evaluate(
        model.path, cfg.model_copy(update={"files": [f.path for f in files]}), device, dtype, out))
