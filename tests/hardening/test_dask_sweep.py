"""sparsity_sweep on a real two-process Dask cluster, reached by address as an external cluster
would be: 3 levels complete with the sparsity they asked for, each registered and stored, and the
levels ran on both workers (not in this process). Tracking goes to the real mlflow server: the
workers are separate processes writing to it concurrently."""

from __future__ import annotations

import os

from pipeline_helpers import BUCKET, tiny_config

LEVELS = [0.3, 0.5, 0.7]


def test_sweep_levels_run_on_both_dask_workers(prefect_harness, mlflow_server, tmp_path, sample_txt):
    import boto3
    from distributed import Client, LocalCluster

    from flows.sweep import sparsity_sweep
    from tasks.settings import PipelineSettings

    # Started after the fixtures: worker processes inherit AWS_ENDPOINT_URL (moto) from os.environ.
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=120)
        workers = set(client.scheduler_info()["workers"])
        st = PipelineSettings(work_dir=str(tmp_path / "work"), tracking_uri=mlflow_server, experiment="dask-sweep",
                              store=f"s3://{BUCKET}/dask", dask_address=cluster.scheduler_address)
        summaries = sparsity_sweep(LEVELS, tiny_config(tmp_path / "sweep", sample_txt), st)

    assert [s["sparsity"] for s in summaries] == LEVELS
    for s in summaries:  # realized on the evaluation text, calibrated on 6 self-sampled blocks
        assert abs(s["realized_sparsity"] - s["sparsity"]) < 0.05, (s["sparsity"], s["realized_sparsity"])
        assert s["perplexity"]["spon"] > 0 and s["version"]
    ran_on = {s["executor"]["dask_worker"] for s in summaries}
    assert ran_on == workers, (ran_on, workers)
    assert os.getpid() not in {s["executor"]["pid"] for s in summaries}
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix="dask/")["Contents"]]
    assert sum(k.endswith("/manifest.json") for k in keys) == 3
    assert (tmp_path / "sweep" / "perplexity_vs_sparsity.png").stat().st_size > 1000
