"""The optional quantize + lm-eval stages inside spon_pipeline: off by default, and when on their
numbers land in the MLflow run as metrics, their table/report/charts as artifacts, and in the
flow's markdown artifact."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline_helpers import BUCKET, tiny_config

import pytest

pytestmark = pytest.mark.slow  # services / subprocesses: not in the fast tier


def test_quantize_and_lm_eval_stages_logged(prefect_harness, mlflow_server, s3_endpoint, work_dir, tmp_path, sample_txt):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client

    from spon.flows.pipeline import spon_pipeline
    from spon.runtime.settings import PipelineSettings

    assert PipelineSettings().quantize == [] and PipelineSettings().lm_eval_tasks == []  # off by default
    settings = PipelineSettings(work_dir=str(work_dir), tracking_uri=mlflow_server, store=f"s3://{BUCKET}/models",
                                quantize=["int8"], lm_eval_tasks=["arc_easy"], lm_eval_limit=4,
                                # its own registry entry: the session's other flow tests expect to own theirs
                                registered_model="spon-eval-stages-test")
    cfg = tiny_config(tmp_path / "run", sample_txt)
    summary = spon_pipeline(cfg, settings)

    assert {"quantize", "lm_eval"} <= set(summary["stage_dirs"])
    c = MlflowClient(mlflow_server, mlflow_server)
    m = c.get_run(summary["mlflow_run_id"]).data.metrics
    assert m["quant_int8_perplexity_spon"] > 1 and m["quant_int8_weight_bytes"] > 0
    # int8 stays close to fp32 SPON on the eval text
    assert abs(m["quant_int8_perplexity_spon"] / summary["perplexity"]["spon"] - 1) < 0.05
    for variant in ("dense", "teal", "spon", "spon-int8"):
        assert 0 <= m[f"lmeval_{variant}_arc_easy_acc"] <= 1, variant
    results = json.loads((Path(summary["stage_dirs"]["lm_eval"]) / "results.json").read_text())
    assert m["lmeval_spon-int8_arc_easy_acc"] == results["variants"]["spon-int8"]["tasks"]["arc_easy"]["metrics"]["acc,none"]
    assert results["limit"] == 4
    arts = {a.path for a in c.list_artifacts(summary["mlflow_run_id"], "lm_eval")}
    assert {"lm_eval/results.json", "lm_eval/report.md", "lm_eval/accuracy.png"} <= arts
    assert "quantize" in {a.path for a in c.list_artifacts(summary["mlflow_run_id"])}

    import asyncio

    async def latest_markdown():
        async with get_client() as client:
            from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

            arts = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["spon-results"])))
            return max(arts, key=lambda a: a.created).data

    md = asyncio.run(latest_markdown())
    assert "quantization (spon mode)" in md and "int8" in md and "arc_easy" in md
