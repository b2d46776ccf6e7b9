"""sparsity_sweep: the pipeline over several sparsity levels, fanned out on Dask, one nested
MLflow run per level under a parent run that gets the perplexity-vs-sparsity plot.

The levels run on a DaskTaskRunner: an existing cluster (`settings.dask_address`,
`--dask-address`, `$SPON_DASK_ADDRESS`) or a LocalCluster of worker processes started for the
sweep. Everything a level needs travels by pickle (pydantic configs, JSON refs) or lives in the
work dir, which every worker must see at the same path (stage outputs and Prefect cache records).
On CUDA a level asks for one `GPU` worker resource, so on a mixed cluster only workers started
with `dask worker ADDRESS --resources GPU=1` run it (see deployments/README.md).
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path

import dask
from prefect import flow, task, unmapped
from prefect.artifacts import create_markdown_artifact

from spon.config import RunConfig
from spon.errors import SponError

from spon.flows import results
from spon.flows.pipeline import spon_pipeline
from spon.tasks import build_calibration, fetch_model
from spon.runtime import tracking
from spon.tasks.policies import IO_RETRIES, UNCACHED
from spon.runtime.settings import PipelineSettings
from spon.runtime.workdir import text_files


@task(name="run_level", **UNCACHED)
def run_level(sparsity: float, cfg: RunConfig, settings: PipelineSettings, parent_run_id: str) -> dict:
    from spon.console import configure

    configure(quiet=not settings.progress)  # a Dask worker process: the same quiet console as the CLI
    level = cfg.model_copy(update={"out": str(Path(cfg.out) / f"s{sparsity:.2f}"),
                                   "sparsity": cfg.sparsity.model_copy(update={"sparsity": sparsity})})
    summary = spon_pipeline(level, settings, parent_run_id)
    return {**summary, "executor": executor()}


def executor() -> dict:
    """Where a level ran: the Dask worker's address (None outside a worker) and its process."""
    try:
        from distributed import get_worker

        address = get_worker().address
    except ValueError:
        address = None
    return {"dask_worker": address, "pid": os.getpid()}


def level_runner(settings: PipelineSettings, levels: int):
    """A DaskTaskRunner on the configured cluster, or on a LocalCluster of worker processes
    (one thread each: a level already uses every core torch gives it)."""
    from prefect_dask import DaskTaskRunner

    if address := settings.resolved_dask_address():
        return DaskTaskRunner(address=address)
    workers = settings.dask_workers or max(1, min(levels, os.cpu_count() or 1))
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})


def connect(runner, settings: PipelineSettings) -> None:
    try:
        runner.client  # noqa: B018 - the property connects (or starts the LocalCluster)
    except OSError as e:  # refused / timed out (distributed.comm.timeouts.connect, 30 s by default)
        raise SponError(f"cannot reach the Dask scheduler at {settings.resolved_dask_address()}: "
                        f"{(str(e).splitlines() or [type(e).__name__])[0]}") from e


def level_resources(cfg: RunConfig) -> dict[str, int]:
    """Dask worker resources one level holds while it runs."""
    return {"GPU": 1} if cfg.device.startswith("cuda") else {}


@task(name="start_sweep_run", **UNCACHED, **IO_RETRIES)
def start_sweep_run(cfg: RunConfig, sparsities: list[float], settings: PipelineSettings) -> str:
    return tracking.start_run(settings, {**cfg.model_dump(), "sweep": {"sparsities": sparsities}},
                              f"sweep-{Path(str(cfg.model or 'stories260K')).name}", None, {"kind": "sweep"})


@task(name="finish_sweep_run", **UNCACHED, **IO_RETRIES)
def finish_sweep_run(run_id: str, plot: str, table: str, settings: PipelineSettings) -> None:
    tracking.log_artifacts(settings, run_id, {"": plot, "tables": table})
    tracking.end_run(settings, run_id)


@flow(name="sparsity_sweep")
def sparsity_sweep(sparsities: list[float] = [0.3, 0.5, 0.7], config: RunConfig | None = None,
                   settings: PipelineSettings | None = None) -> list[dict]:
    cfg, settings = config or RunConfig(out="out/sweep"), settings or PipelineSettings()
    work = settings.resolved_work_dir(cfg.out)
    settings = settings.model_copy(update={"work_dir": str(work)})  # every level shares one work dir
    with level_runner(settings, len(sparsities)) as runner:
        connect(runner, settings)  # before any work: an unreachable scheduler fails in one line, at once
        parent = start_sweep_run(cfg, sparsities, settings)

        # Calibration does not depend on sparsity: build it once so the levels all hit its cache.
        model = fetch_model(cfg.model, str(work), settings)
        build_calibration(model, cfg.calibration, text_files(cfg.calibration.files), cfg.device, cfg.dtype, str(work))
        params = {"sparsity": sparsities, "cfg": unmapped(cfg), "settings": unmapped(settings), "parent_run_id": unmapped(parent)}
        resources = level_resources(cfg)
        with dask.annotate(resources=resources) if resources else nullcontext():
            futures = runner.map(run_level, params)
        summaries = [f.result() for f in futures]

    plot = results.sweep_plot(summaries, Path(cfg.out) / "perplexity_vs_sparsity.png")
    table = Path(cfg.out) / "results.md"
    table.write_text(results.results_table(summaries))
    finish_sweep_run(parent, str(plot), str(table), settings)
    create_markdown_artifact(markdown=table.read_text(), key="spon-sweep-results", description="sparsity sweep")
    return summaries
