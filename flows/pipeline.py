"""spon_pipeline: one model, one sparsity — the whole chain, each stage a cached Prefect task."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from spon.config import RunConfig

from flows import results
from tasks import (benchmark_kernels, build_calibration, compute_thresholds, distill_spon, evaluate, fetch_model,
                   fuse, fused_model, publish, track_run)
from tasks.settings import PipelineSettings
from tasks.workdir import text_files


@flow(name="spon_pipeline")
def spon_pipeline(config: RunConfig | None = None, settings: PipelineSettings | None = None,
                  parent_run_id: str | None = None) -> dict:
    cfg, settings = config or RunConfig(), settings or PipelineSettings()
    work = str(settings.resolved_work_dir(cfg.out))
    rt = {"device": cfg.device, "dtype": cfg.dtype, "work_dir": work}
    heldout, targets = cfg.calibration.heldout_blocks, cfg.sparsity.targets

    model = fetch_model(cfg.model, work, settings)
    calib = build_calibration(model, cfg.calibration, text_files(cfg.calibration.files), targets, **rt)
    thresholds = compute_thresholds(model, calib, cfg.sparsity, heldout, **rt)
    alpha = distill_spon(model, calib, thresholds, cfg.distill, cfg.protocol, heldout, targets, **rt, progress=settings.progress)
    fused = fuse(model, calib, thresholds, alpha, results.method_config(cfg), work)
    ppl = evaluate(fused_model(fused), cfg.eval, text_files(cfg.eval.files), **rt)
    bench = benchmark_kernels(cfg.sparsity.sparsity, work) if settings.bench else None
    # Quantization and lm-eval tasks land with evaluation/: each takes `fused_model(fused)` and
    # returns a StageRef that goes into results.collect beside `ppl`.

    summary, files = results.collect(cfg, model, calib, thresholds, alpha, fused, ppl, bench)
    run_id = track_run(summary, files, settings, run_name(cfg, model.source), parent_run_id)
    published = publish(files["fused_model"], run_id, summary, settings)
    return results.finish(cfg, summary, run_id, published)


def run_name(cfg: RunConfig, source: str) -> str:
    return f"{Path(source.rstrip('/')).name}-s{cfg.sparsity.sparsity:.2f}-{cfg.protocol}"
