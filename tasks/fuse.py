"""fuse: b' = b + W alpha into a fused checkpoint dir (spon.fuse.save_fused) -> <stage>/fused/.

Also records a short greedy generation from the in-memory fused model (fuse.json): the reference
a pulled copy must reproduce exactly.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from prefect import task
from safetensors.torch import load_file

from spon.config import RunConfig
from spon.run import realized_sparsity_on_blocks, sidecar_metadata, split_heldout
from spon.sparse import load_alphas, set_mode

from spon.fuse import save_fused

from tasks.distill import distill_result
from tasks.loading import ALPHA_FILE, calibration_blocks, sparse_model
from tasks.policies import STAGE
from tasks.types import ModelRef, StageRef
from tasks.workdir import atomic_dir, read_json, stage_dir, stage_key, write_json

FUSED_SUBDIR = "fused"
FUSE_FILE = "fuse.json"
SMOKE_PROMPT = "Once upon a time"


@torch.no_grad()
def greedy(model, tokenizer, prompt: str = SMOKE_PROMPT, new_tokens: int = 24) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0], skip_special_tokens=True)


@task(name="fuse", **STAGE)
def fuse(model: ModelRef, calib: StageRef, thresholds: StageRef, alpha: StageRef, cfg: RunConfig,
         work_dir: str) -> StageRef:
    """cfg: the method config (the caller clears eval/out, which do not change the checkpoint)."""
    t0 = time.perf_counter()
    final = stage_dir(work_dir, "fuse", stage_key(model.digest, calib.dir, thresholds.dir, alpha.dir, cfg))
    m, tok = sparse_model(model, cfg.sparsity.targets, cfg.device, cfg.dtype, thresholds, cfg.protocol)
    load_alphas(m, load_file(str(Path(alpha.dir) / ALPHA_FILE)))
    _, heldout = split_heldout(calibration_blocks(calib), cfg.calibration.heldout_blocks)
    realized = realized_sparsity_on_blocks(m, heldout) if len(heldout) else None
    per_proj = read_json(Path(thresholds.dir) / "thresholds.json")["sparsities"]
    meta = sidecar_metadata(cfg.model_copy(update={"model": model.source}), per_proj, realized, distill_result(alpha))
    with atomic_dir(final) as tmp:
        save_fused(m, tok, tmp / FUSED_SUBDIR, meta)
        set_mode(m, "spon")
        write_json(tmp / FUSE_FILE, {"realized_sparsity_heldout": realized, "smoke_prompt": SMOKE_PROMPT,
                                     "smoke_generation": greedy(m, tok)})
    return StageRef(stage="fuse", dir=str(final), wall_s=round(time.perf_counter() - t0, 3))


def fused_model(fused: StageRef) -> ModelRef:
    """The fused checkpoint as a model reference (its digest is the fuse stage key)."""
    return ModelRef(source=fused.dir, path=str(Path(fused.dir) / FUSED_SUBDIR), digest=f"stage:{Path(fused.dir).name}", is_spon=True)
