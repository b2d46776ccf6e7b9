"""sparsity_sweep over 3 levels on a real two-process Dask cluster reached by address (as an
external cluster would be): a plot, one nested MLflow run per level on the real tracking server
(the workers write to it concurrently), each level registered and stored with the sparsity it
asked for, and the levels ran on both workers, not in this process."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline_helpers import tiny_config

import pytest

pytestmark = pytest.mark.slow  # services / subprocesses: not in the fast tier

LEVELS = [0.3, 0.5, 0.7]


def test_sweep_three_levels_on_two_dask_workers(prefect_harness, mlflow_server, work_dir, tmp_path, sample_txt):
    from distributed import Client, LocalCluster
    from mlflow import MlflowClient

    from spon.flows.sweep import sparsity_sweep
    from spon.runtime.settings import PipelineSettings

    # Started after the fixtures: the worker processes inherit AWS_ENDPOINT_URL etc. from os.environ.
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=120)
        workers = set(client.scheduler_info()["workers"])
        st = PipelineSettings(work_dir=str(work_dir), tracking_uri=mlflow_server, experiment="sweep",
                              store=str(tmp_path / "store"), dask_address=cluster.scheduler_address)
        summaries = sparsity_sweep(LEVELS, tiny_config(tmp_path / "sweep", sample_txt), st)

    assert [s["sparsity"] for s in summaries] == LEVELS
    for s in summaries:  # realized on the evaluation text, thresholds from 6 self-sampled blocks
        assert abs(s["realized_sparsity"] - s["sparsity"]) < 0.05, (s["sparsity"], s["realized_sparsity"])
    ran_on = {s["executor"]["dask_worker"] for s in summaries}
    assert ran_on == workers, (ran_on, workers)
    assert os.getpid() not in {s["executor"]["pid"] for s in summaries}

    assert (tmp_path / "sweep" / "perplexity_vs_sparsity.png").stat().st_size > 1000
    c = MlflowClient(mlflow_server)
    parents = {c.get_run(s["mlflow_run_id"]).data.tags.get("mlflow.parentRunId") for s in summaries}
    assert len(parents) == 1 and None not in parents
    parent = parents.pop()
    children = c.search_runs([c.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert len(children) == 3
    assert "perplexity_vs_sparsity.png" in {a.path for a in c.list_artifacts(parent)}
    # one registry entry per level, each with a stored copy
    assert len({s["registered_model"] for s in summaries}) == 3 and all(s["version"] for s in summaries)
    assert all((Path(s["store_uri"]) / "manifest.json").is_file() for s in summaries)
