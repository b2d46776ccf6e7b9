"""The method end to end: calibrate -> thresholds -> distill -> fuse -> perplexity.

Each stage is a plain function with serialisable inputs and outputs, so the Prefect tasks in
tasks/ can wrap, cache and retry them one by one; `run` chains them for a single process.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from spon.calibration import dataset_blocks, sample_blocks, text_blocks
from spon.config import CalibrationConfig, RunConfig
from spon.distill import DistillResult, distill
from spon.errors import SponError
from spon.fuse import save_fused
from spon.model import default_model_path, load_model
from spon.perplexity import perplexities
from spon.sparse import counting_zeros, mode, set_protocol, sparsify
from spon.thresholds import compute_thresholds

log = logging.getLogger(__name__)


def build_calibration(model, tokenizer, cfg: CalibrationConfig) -> torch.Tensor:
    """Token blocks [N, L] from the configured source (the model must be dense)."""
    if cfg.source == "samples":
        with mode(model, "dense"):
            return sample_blocks(model, tokenizer, cfg.num_blocks, cfg.block_len, cfg.seed, cfg.temperature)
    if cfg.source == "text":
        return text_blocks(tokenizer, cfg.files, cfg.block_len, cfg.num_blocks)
    if not cfg.dataset:
        raise SponError("calibration source 'dataset' needs calibration.dataset")
    return dataset_blocks(
        tokenizer, cfg.dataset, cfg.block_len, cfg.num_blocks, cfg.dataset_config, cfg.split, cfg.text_field, cfg.data_files
    )


def split_heldout(blocks: torch.Tensor, heldout: int) -> tuple[torch.Tensor, torch.Tensor]:
    heldout = min(heldout, len(blocks) // 4)  # never starve training on tiny calibration sets
    if len(blocks) - heldout < 1:
        raise SponError(f"calibration data too short: {len(blocks)} block(s)")
    return blocks[: len(blocks) - heldout], blocks[len(blocks) - heldout :]


@torch.no_grad()
def realized_sparsity_on_blocks(model, blocks: torch.Tensor, batch_size: int = 16) -> float:
    device = next(model.parameters()).device
    with mode(model, "teal"), counting_zeros(model) as z:
        for i in range(0, len(blocks), batch_size):
            model(blocks[i : i + batch_size].to(device), use_cache=False)
    return z["weighted"]


def run(cfg: RunConfig, progress: bool = True) -> dict:
    """Run the whole method for one model and one sparsity; write DIR/summary.json."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    walls: dict[str, float] = {}
    tick = time.perf_counter()

    def lap(stage: str):
        nonlocal tick
        now = time.perf_counter()
        walls[stage] = round(now - tick, 3)
        tick = now
        log.info("%s done in %.1fs", stage, walls[stage])

    for f in cfg.eval.files + cfg.calibration.files:
        if not Path(f).is_file():
            raise SponError(f"text file does not exist: {f}")
    model, tokenizer = load_model(cfg.model, cfg.device, cfg.dtype, cfg.device_map)
    sparsify(model, cfg.sparsity.targets)
    set_protocol(model, cfg.protocol)
    lap("load")

    blocks = build_calibration(model, tokenizer, cfg.calibration)
    train, heldout = split_heldout(blocks, cfg.calibration.heldout_blocks)
    lap("calibrate")

    taus, per_proj = compute_thresholds(
        model, train, cfg.sparsity.sparsity, cfg.sparsity.allocation, cfg.sparsity.greedy_step, cfg.sparsity.greedy_blocks
    )
    (out / "thresholds.json").write_text(json.dumps({"thresholds": taus, "sparsities": per_proj}, indent=2))
    lap("thresholds")

    result = distill(
        model, train, heldout,
        steps=cfg.distill.steps, lr=cfg.distill.lr, batch_size=cfg.distill.batch_size,
        grad_accum=cfg.distill.grad_accum, weight_decay=cfg.distill.weight_decay,
        schedule=cfg.distill.schedule, warmup=cfg.distill.warmup, init=cfg.distill.init,
        seed=cfg.distill.seed, checkpoint_dir=out / "alpha_checkpoints",
        checkpoint_every=cfg.distill.checkpoint_every, progress=progress,
    )
    lap("distill")

    realized_heldout = realized_sparsity_on_blocks(model, heldout) if len(heldout) else None
    fused_dir = save_fused(model, tokenizer, out / "fused", sidecar_metadata(cfg, per_proj, realized_heldout, result))
    lap("fuse")

    ppl = perplexities(model, tokenizer, cfg.eval.files, window=cfg.eval.window, stride=cfg.eval.stride)
    lap("perplexity")

    summary = summarize(cfg, ppl, result, realized_heldout, fused_dir, walls)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def sidecar_metadata(cfg: RunConfig, per_proj: dict, realized: float | None, result: DistillResult) -> dict:
    return {
        "sparsity": cfg.sparsity.sparsity,
        "allocation": cfg.sparsity.allocation,
        "per_projection_sparsity": per_proj,
        "realized_sparsity_heldout": realized,
        "protocol": cfg.protocol,
        "provenance": {
            "source_model": cfg.model or default_model_path(),
            "calibration": cfg.calibration.model_dump(),
            "distill": cfg.distill.model_dump(),
            "heldout_kl": {"teal": result.heldout_kl_before, "spon": result.heldout_kl_after},
        },
    }


def summarize(cfg: RunConfig, ppl: dict, result: DistillResult, realized_heldout, fused_dir, walls) -> dict:
    first = next(iter(ppl.values()), None)
    realized = first["teal"]["realized_sparsity"] if first else realized_heldout
    summary = {
        "model": cfg.model or default_model_path(),
        "sparsity": cfg.sparsity.sparsity,
        "allocation": cfg.sparsity.allocation,
        "protocol": cfg.protocol,
        "realized_sparsity": realized,
        "realized_sparsity_heldout_calibration": realized_heldout,
        "perplexity": {m: first[m]["perplexity"] for m in ("dense", "teal", "spon")} if first else {},
        "perplexity_by_file": {
            f: {m: r["perplexity"] for m, r in by_mode.items()} for f, by_mode in ppl.items()
        },
        "realized_sparsity_by_file": {f: by_mode["teal"]["realized_sparsity"] for f, by_mode in ppl.items()},
        "heldout_kl": {
            "teal": result.heldout_kl_before,
            "spon_init": result.heldout_kl_init,
            "spon": result.heldout_kl_after,
        },
        "kl_history": result.kl_history,
        "fused_model_dir": str(fused_dir),
        "wall_time_s": walls,
        "config": cfg.model_dump(),
    }
    if first:
        d, t, s = (summary["perplexity"][m] for m in ("dense", "teal", "spon"))
        summary["gap_closed"] = (t - s) / (t - d) if t != d else 0.0
    return summary
