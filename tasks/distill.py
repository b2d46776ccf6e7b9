"""distill_spon: train alpha (KL to the dense model) -> alpha.safetensors + distill.json.

Progress goes to a Prefect progress artifact through distill's on_step callback. Checkpoints go
to a directory fixed by the stage inputs, so a rerun after a kill resumes instead of restarting.
"""

from __future__ import annotations

import time

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from safetensors.torch import save_file

from spon.config import DistillConfig
from spon.distill import distill
from spon.run import split_heldout

from tasks.loading import ALPHA_FILE, DISTILL_FILE, calibration_blocks, sparse_model
from tasks.policies import STAGE
from tasks.types import ModelRef, StageRef
from tasks.workdir import atomic_dir, checkpoint_dir, read_json, stage_dir, stage_key, write_json


def progress_reporter(steps: int, key: str):
    """on_step callback updating a progress artifact about 50 times over the run."""
    artifact_id = create_progress_artifact(progress=0.0, key=f"distill-{key}", description=f"alpha distillation ({steps} steps)")
    every = max(steps // 50, 1)

    def on_step(step: int, kl: float) -> None:
        done = step + 1
        if done % every == 0 or done == steps:
            update_progress_artifact(artifact_id, progress=100.0 * done / steps, description=f"step {done}/{steps}, KL {kl:.4f}")

    return on_step


@task(name="distill_spon", **STAGE)
def distill_spon(model: ModelRef, calib: StageRef, thresholds: StageRef, cfg: DistillConfig, protocol: str,
                 heldout_blocks: int, targets: list[str], device: str, dtype: str, work_dir: str,
                 progress: bool = False) -> StageRef:
    t0 = time.perf_counter()
    key = stage_key(model.digest, calib.dir, thresholds.dir, cfg, protocol, heldout_blocks, targets, device, dtype)
    final = stage_dir(work_dir, "distill", key)
    m, _ = sparse_model(model, targets, device, dtype, thresholds, protocol)
    train, heldout = split_heldout(calibration_blocks(calib), heldout_blocks)
    r = distill(
        m, train, heldout, steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
        weight_decay=cfg.weight_decay, schedule=cfg.schedule, warmup=cfg.warmup, init=cfg.init, seed=cfg.seed,
        checkpoint_dir=checkpoint_dir(work_dir, "distill", key), checkpoint_every=cfg.checkpoint_every,
        progress=progress, on_step=progress_reporter(cfg.steps, key) if cfg.steps else None,
    )
    with atomic_dir(final) as tmp:
        save_file({k: v.contiguous() for k, v in r.alphas.items()}, str(tmp / ALPHA_FILE))
        write_json(tmp / DISTILL_FILE, {
            "kl_history": r.kl_history, "heldout_kl_before": r.heldout_kl_before,
            "heldout_kl_init": r.heldout_kl_init, "heldout_kl_after": r.heldout_kl_after, "resumed_from": r.resumed_from,
        })
    return StageRef(stage="distill", dir=str(final), wall_s=round(time.perf_counter() - t0, 3))


def distill_result(alpha: StageRef):
    """The DistillResult the method's summary/sidecar helpers expect, rebuilt from distill.json."""
    from pathlib import Path

    from spon.distill import DistillResult

    d = read_json(Path(alpha.dir) / DISTILL_FILE)
    return DistillResult(alphas={}, kl_history=d["kl_history"], heldout_kl_before=d["heldout_kl_before"],
                         heldout_kl_init=d["heldout_kl_init"], heldout_kl_after=d["heldout_kl_after"],
                         resumed_from=d["resumed_from"])
