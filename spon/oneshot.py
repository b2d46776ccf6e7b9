"""The method as verbs on a model in memory, each taking one config:

    cal = spon.calibrate(model, tokenizer, CalibrationConfig(...))    # token blocks: train + held-out
    spon.sparsify_(model, SparsityConfig(sparsity=0.5), cal)         # S(x) = x * 1{|x| > tau}, tau calibrated
    spon.distill_(model, cal, DistillConfig())                        # alpha = argmin KL(dense || sparse)
    spon.save_pretrained(model, tokenizer, "out/fused")               # b' = b + W alpha, self-contained checkpoint

Each verb lives beside the step of the method it runs (spon.calibration, spon.thresholds,
spon.distill, spon.fuse), so a stage's cache key covers exactly its own code; `oneshot` chains them.
The stages, the command line and the Prefect tasks are adapters over these verbs (spon.stages).
"""

from __future__ import annotations

from pathlib import Path

from spon.calibration import Calibration, calibrate
from spon.config import Recipe
from spon.distill import DistillResult, distill_
from spon.fuse import fuse_, save_pretrained
from spon.thresholds import sparsify_

__all__ = ["Calibration", "calibrate", "sparsify_", "distill_", "fuse_", "save_pretrained", "oneshot"]


def oneshot(model, tokenizer, recipe: Recipe | None = None, calibration=None,
            output_dir: str | Path | None = None, progress: bool = False) -> DistillResult:
    """calibrate -> sparsify_ -> distill_ (-> save_pretrained when output_dir is given), in place.
    `calibration`: data for `calibrate` (default: recipe.calibration)."""
    recipe = recipe or Recipe()
    cal = calibrate(model, tokenizer, recipe.calibration if calibration is None else calibration)
    sparsify_(model, recipe.sparsity, cal)
    result = distill_(model, cal, recipe.distill, progress=progress)
    if output_dir is not None:
        save_pretrained(model, tokenizer, output_dir)
    return result
