"""spon_pipeline against real services: moto S3 over HTTP and an `mlflow server` whose artifacts
live on that S3. Then `spon pull models:/NAME@candidate` must reproduce the flow's model exactly,
a rerun must be served from cache, and one tampered byte must make the pull fail cleanly."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pipeline_helpers import BUCKET, QUALITY_SPARSITY, tiny_config
from spon.format import SIDECAR

pytestmark = pytest.mark.slow  # services / subprocesses: not in the fast tier

STAGES = ("calibrate", "thresholds", "distill", "fuse", "evaluate")


@pytest.fixture(scope="module")
def settings(mlflow_server, s3_endpoint, work_dir):
    from spon.runtime.settings import PipelineSettings

    return PipelineSettings(work_dir=str(work_dir), tracking_uri=mlflow_server, store=f"s3://{BUCKET}/models")


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, sample_txt):
    return tiny_config(tmp_path_factory.mktemp("run"), sample_txt, quality=True)


@pytest.fixture(scope="module")
def first_and_loads(prefect_harness, cfg, settings):
    """The flow's result, and every model directory it loaded (spon.model.load_pretrained)."""
    from spon import model as spon_model
    from spon.flows.pipeline import spon_pipeline

    loads: list[str] = []
    real = spon_model.load_pretrained

    def counting(path, *a, **kw):
        loads.append(str(path))
        return real(path, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(spon_model, "load_pretrained", counting)
        return spon_pipeline(cfg, settings), loads


@pytest.fixture(scope="module")
def first(first_and_loads):
    return first_and_loads[0]


def test_the_flow_loads_the_base_model_once(first_and_loads, cfg):
    """calibrate, thresholds, distill and fuse are four tasks over one loaded base model."""
    from spon.sources import default_model_path

    _, loads = first_and_loads
    base = str(Path(cfg.model or default_model_path()).resolve())
    assert [str(Path(p).resolve()) for p in loads].count(base) == 1, loads


def mlflow_client(settings):
    from mlflow import MlflowClient

    return MlflowClient(settings.tracking_uri, settings.tracking_uri)


def test_run_tracked_registered_and_stored(first, settings, cfg):
    import boto3

    c = mlflow_client(settings)
    run = c.get_run(first["mlflow_run_id"])
    m = run.data.metrics
    for k in ("perplexity_dense", "perplexity_teal", "perplexity_spon", "realized_sparsity", "heldout_kl_spon", "wall_s_distill"):
        assert k in m, k
    assert abs(m["perplexity_spon"] - first["perplexity"]["spon"]) < 1e-9
    assert [x.step for x in c.get_metric_history(run.info.run_id, "kl")] == list(range(40))
    assert run.data.params["sparsity.sparsity"] == str(QUALITY_SPARSITY) and run.data.params["distill.steps"] == "40"
    assert first["perplexity"]["spon"] < first["perplexity"]["teal"] and not first["quality_warnings"]
    top = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"summary.json", "thresholds", "alpha", "distill", "fused_model"} <= top
    s3 = boto3.client("s3")
    logged = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="mlartifacts/")["Contents"]]
    assert any(k.endswith("fused_model/model.safetensors") for k in logged)  # artifacts went to S3 via the server

    name = first["registered_model"]
    mv = c.get_model_version_by_alias(name, "candidate")
    assert mv.version == first["version"] and mv.run_id == run.info.run_id
    assert mv.tags["store_uri"] == first["store_uri"] == f"s3://{BUCKET}/models/{name}/{run.info.run_id}"
    assert mv.tags["sparsity"] == str(QUALITY_SPARSITY) and mv.tags["protocol"] == "all" and "stories260K" in mv.tags["source_model"]
    assert c.get_model_version_by_alias(name, "champion").version == mv.version  # first version: champion
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"models/{name}/{run.info.run_id}/")["Contents"]]
    assert f"models/{name}/{run.info.run_id}/manifest.json" in keys
    assert (Path(cfg.out) / "summary.json").is_file() and (Path(cfg.out) / "fused" / SIDECAR).is_file()


def test_pull_by_alias_generates_identically(first, settings, tmp_path, monkeypatch, capsys):
    from spon.cli import main
    from spon.fuse import load_sparse_model
    from spon.stages import greedy

    monkeypatch.setenv("MLFLOW_TRACKING_URI", settings.tracking_uri)
    dest = tmp_path / "pulled"
    assert main(["pull", f"models:/{first['registered_model']}@candidate", "--out", str(dest)]) == 0
    assert "checksums verified" in capsys.readouterr().out
    model, tok, meta = load_sparse_model(dest)
    expected = first["smoke_generation"]["text"]  # greedy text of the in-memory model at the end of fuse
    assert greedy(model, tok, first["smoke_generation"]["prompt"]) == expected
    assert main(["-q", "generate", str(dest), "--prompt", first["smoke_generation"]["prompt"], "--max-new-tokens", "24"]) == 0
    assert capsys.readouterr().out.strip() == expected
    # the compiled decode step (static cache) says so and writes the same text
    assert main(["-q", "generate", str(dest), "--prompt", first["smoke_generation"]["prompt"], "--max-new-tokens", "24",
                 "--compile"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == expected and "compiled step, static cache" in out.err


def task_states(flow_run_id) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as c:
        runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs if r.state}


def test_rerun_same_inputs_is_cached(first, cfg, settings):
    from spon.flows.pipeline import spon_pipeline

    state = spon_pipeline(cfg, settings, return_state=True)
    second = state.result()
    states = {}
    for _ in range(40):  # task states reach the API asynchronously
        states = task_states(state.state_details.flow_run_id)
        if all(states.get(s) == "Cached" for s in STAGES):
            break
        time.sleep(0.5)
    assert {s: states.get(s) for s in STAGES} == {s: "Cached" for s in STAGES}
    assert second["perplexity"] == first["perplexity"]
    assert second["mlflow_run_id"] != first["mlflow_run_id"] and second["store_uri"] != first["store_uri"]
    c = mlflow_client(settings)
    name = first["registered_model"]
    assert c.get_model_version_by_alias(name, "candidate").version == second["version"]
    assert c.get_model_version_by_alias(name, "champion").version == first["version"]  # equal is not better
    assert second["champion"] is False


def test_evaluate_registered_finds_no_drift(first, cfg, settings, tmp_path):
    from spon.flows.regression import evaluate_registered

    r = evaluate_registered(f"models:/{first['registered_model']}@candidate", cfg.eval, 0.01, str(tmp_path / "reg"), settings)
    assert r["recorded"] == first["perplexity"]["spon"]
    assert abs(r["relative_change"]) < 1e-6  # the pulled copy scores what the flow's model scored


def test_publish_finishes_an_upload_from_local_result(first, cfg, settings, tmp_path, capsys):
    from spon.cli import main

    store_dir = tmp_path / "other-store"
    rc = main(["-q", "publish", cfg.out, "--store", str(store_dir), "--tracking-uri", settings.tracking_uri])
    assert rc == 0, capsys.readouterr().err
    import json

    summary = json.loads((Path(cfg.out) / "summary.json").read_text())
    assert summary["store_uri"].startswith(str(store_dir)) and (Path(summary["store_uri"]) / "manifest.json").is_file()


def test_tampered_store_fails_pull_and_leaves_nothing(first, settings, tmp_path, monkeypatch, capsys):
    import boto3

    from spon.cli import main

    key = first["store_uri"].removeprefix(f"s3://{BUCKET}/") + "/model.safetensors"
    s3 = boto3.client("s3")
    data = bytearray(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0x01
    s3.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", settings.tracking_uri)
    dest = tmp_path / "pulled"
    assert main(["pull", first["store_uri"], "--out", str(dest)]) == 2
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and "model.safetensors" in err
    assert not dest.exists() and list(tmp_path.iterdir()) == []
