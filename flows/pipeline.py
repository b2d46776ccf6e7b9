"""spon_pipeline: one model, one sparsity — the whole chain, each stage a cached Prefect task."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow

from spon.console import say, stage_line

from spon.config import RunConfig

from spon.flows import results
from spon.tasks import (benchmark_kernels, build_calibration, compute_thresholds, distill_spon, evaluate, fetch_model,
                   fuse, fused_model, publish, track_run)
from spon.tasks import evalsuite
from spon.tasks.evalsuite import lm_eval_suite, quantize_fused
from spon.tasks.track import mark_published
from spon.runtime.settings import PipelineSettings
from spon.stages import shared_models
from spon.runtime.workdir import text_files


@flow(name="spon_pipeline")
def spon_pipeline(config: RunConfig | None = None, settings: PipelineSettings | None = None,
                  parent_run_id: str | None = None) -> dict:
    cfg, settings = config or RunConfig(), settings or PipelineSettings()
    work = str(settings.resolved_work_dir(cfg.out))
    rt = {"device": cfg.device, "dtype": cfg.dtype, "work_dir": work}
    eval_files = text_files(cfg.eval.files)

    model = step(fetch_model, cfg.model, work, settings)
    with shared_models():  # the stages below load the base model once between them
        calib = step(build_calibration, model, cfg.calibration, text_files(cfg.calibration.files), **rt)
        thresholds = step(compute_thresholds, model, calib, cfg.sparsity, **rt)
        alpha = step(distill_spon, model, calib, thresholds, cfg.distill, **rt, progress=settings.progress)
        fused = step(fuse, model, calib, thresholds, alpha, **rt)
    ppl = step(evaluate, fused_model(fused), cfg.eval, eval_files, **rt)
    bench = step(benchmark_kernels, cfg.sparsity.sparsity, work) if settings.bench else None
    # Optional stages over evaluation/ and spon/quantize.py (off by default).
    quant = (step(quantize_fused, fused_model(fused), settings.quantize, cfg.eval, eval_files, cfg.device, work)
             if settings.quantize else None)
    lm_eval = (step(lm_eval_suite, fused_model(fused), settings.lm_eval_tasks, settings.lm_eval_limit, settings.quantize,
                    eval_files[0] if eval_files else None, cfg.device, work) if settings.lm_eval_tasks else None)

    summary, files = results.collect(cfg, model, calib, thresholds, alpha, fused, ppl, bench, quant, lm_eval)
    run_id = step(track_run, summary, files, settings, run_name(cfg, model.source), parent_run_id)
    published = step(publish, files["fused_model"], run_id, summary, settings)
    mark_published(files, run_id)
    return results.finish(cfg, summary, run_id, published, evalsuite.markdown(quant, lm_eval))


def step(task, *args, **kwargs):
    """Run one task and say so in one line: its name, cached or not, its wall time."""
    t0 = time.perf_counter()
    state = task(*args, return_state=True, **kwargs)
    result = state.result()  # raises what the task raised
    say(stage_line(task.name, time.perf_counter() - t0, cached=state.name == "Cached"))
    return result


def run_name(cfg: RunConfig, source: str) -> str:
    return f"{Path(source.rstrip('/')).name}-s{cfg.sparsity.sparsity:.2f}-{cfg.protocol}"
