"""sparsity_sweep over 3 levels: a plot, one nested MLflow run per level (local sqlite + dir store)."""

from __future__ import annotations

from pathlib import Path

from pipeline_helpers import tiny_config


def test_sweep_three_levels(prefect_harness, work_dir, tmp_path, sample_txt):
    from mlflow import MlflowClient

    from flows.sweep import sparsity_sweep
    from tasks.settings import PipelineSettings

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    st = PipelineSettings(work_dir=str(work_dir), tracking_uri=uri, artifact_root=(tmp_path / "mlart").as_uri(),
                          store=str(tmp_path / "store"))
    cfg = tiny_config(tmp_path / "sweep", sample_txt)
    summaries = sparsity_sweep([0.3, 0.5, 0.7], cfg, st)

    assert [s["sparsity"] for s in summaries] == [0.3, 0.5, 0.7]
    assert (tmp_path / "sweep" / "perplexity_vs_sparsity.png").stat().st_size > 1000
    c = MlflowClient(uri)
    parents = {c.get_run(s["mlflow_run_id"]).data.tags.get("mlflow.parentRunId") for s in summaries}
    assert len(parents) == 1 and None not in parents
    parent = parents.pop()
    children = c.search_runs([c.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert len(children) == 3
    assert "perplexity_vs_sparsity.png" in {a.path for a in c.list_artifacts(parent)}
    # one registry entry per level, each with a stored copy
    assert len({s["registered_model"] for s in summaries}) == 3
    assert all((Path(s["store_uri"]) / "manifest.json").is_file() for s in summaries)
