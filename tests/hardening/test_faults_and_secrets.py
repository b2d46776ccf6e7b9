"""One real `spon run` subprocess with the S3 store unreachable (a closed port) and fake secrets in
its environment: bounded retries, then one clear line naming the endpoint and the key, nonzero
exit, the local result intact; `spon publish OUT` once S3 is back finishes the job with a manifest.
None of the secret values may appear in MLflow params/tags, summary.json or the captured logs."""

from __future__ import annotations

import json
import socket
import threading
import time

from cli_helpers import TINY, cli_env, spon
from pipeline_helpers import BUCKET, free_port

import pytest
from spon.format import SIDECAR

pytestmark = pytest.mark.slow  # services / subprocesses: not in the fast tier

SECRETS = {"AWS_ACCESS_KEY_ID": "AKIAFAKEHARDENING1234", "AWS_SECRET_ACCESS_KEY": "fakeSecretHardening/0123456789abcdefXYZ",
           "HF_TOKEN": "hf_fakeHardeningToken0123456789"}


def test_store_down_then_publish_and_no_secret_leaks(tmp_path, sample_txt):
    from mlflow import MlflowClient
    from moto.server import ThreadedMotoServer

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    out, db = tmp_path / "out", tmp_path / "mlflow.db"
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    # AWS_MAX_ATTEMPTS=1: one boto3 attempt per Prefect try (its retries against a closed port are
    # seconds of backoff each, and test_s3_faults.py covers them); Prefect's IO retries still run.
    env = cli_env(**SECRETS, AWS_ENDPOINT_URL=dead, AWS_DEFAULT_REGION="us-east-1", PREFECT_LOGGING_LEVEL="DEBUG",
                  AWS_MAX_ATTEMPTS="1")
    common = ["--tracking-uri", f"sqlite:///{db}", "--store", f"s3://{BUCKET}/models", "--work-dir", str(tmp_path / "work")]
    t0 = time.time()
    r = spon(["-q", "run", "--config", str(tmp_path / "tiny.json"), "--eval-text", str(sample_txt), "--out", str(out), *common], env)
    logs = r.stdout + r.stderr
    assert r.returncode != 0, logs[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("spon: error:")]
    assert len(errors) == 1, logs[-3000:]
    assert dead in errors[0] and f"s3://{BUCKET}/models/" in errors[0], errors[0]
    assert time.time() - t0 < 600  # bounded: Prefect's IO_RETRIES (x boto3's attempts), then give up
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "fused" / SIDECAR).is_file() and (out / "fused" / "model.safetensors").is_file()

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        live = f"http://127.0.0.1:{port}"
        env["AWS_ENDPOINT_URL"] = live
        import boto3

        s3 = boto3.client("s3", endpoint_url=live, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
        s3.create_bucket(Bucket=BUCKET)
        p = spon(["-q", "publish", str(out), *common], env)
        logs += p.stdout + p.stderr
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
        published = json.loads((out / "summary.json").read_text())
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="models/")["Contents"]]
        assert any(k.endswith("/manifest.json") for k in keys) and published["store_uri"].startswith(f"s3://{BUCKET}/models/")
        assert published["version"] == "1"
    finally:
        server.stop()

    # MLflow server gone mid-run: it answers the run's connect check before the first stage (a server
    # down from the start is refused then: test_pipeline_fail_fast.py), then the port closes; every
    # stage comes from the cache, tracking fails, the local result stays for `spon publish`.
    gone = socket.create_server(("127.0.0.1", 0))
    dead_mlflow, out2 = f"http://127.0.0.1:{gone.getsockname()[1]}", tmp_path / "out2"
    answered = threading.Event()

    def answer_once_then_go() -> None:
        conn, _ = gone.accept()
        conn.close()
        gone.close()
        answered.set()

    threading.Thread(target=answer_once_then_go, daemon=True).start()
    env.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_TIMEOUT="5", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1")
    m = spon(["-q", "run", "--config", str(tmp_path / "tiny.json"), "--eval-text", str(sample_txt), "--out", str(out2),
              "--tracking-uri", dead_mlflow, "--store", str(tmp_path / "store"), "--work-dir", str(tmp_path / "work")], env)
    logs += m.stdout + m.stderr
    assert answered.is_set(), (m.stdout + m.stderr)[-3000:]  # reachable when the run started
    errors = [ln for ln in m.stderr.splitlines() if ln.startswith("spon: error:")]
    assert m.returncode == 2 and len(errors) == 1, (m.stdout + m.stderr)[-3000:]
    assert dead_mlflow in errors[0] and f"spon publish {out2}" in errors[0], errors[0]
    assert (out2 / "summary.json").is_file() and (out2 / "fused" / "model.safetensors").is_file()
    assert not (tmp_path / "store").exists()  # nothing published without a run id

    c = MlflowClient(f"sqlite:///{db}", f"sqlite:///{db}")
    texts = [logs, (out / "summary.json").read_text(), json.dumps(summary)]
    for exp in c.search_experiments():
        for run in c.search_runs([exp.experiment_id]):
            texts += [json.dumps(run.data.params), json.dumps(run.data.tags)]
    for mv in c.search_model_versions():
        texts.append(json.dumps(mv.tags))
    blob = "\n".join(texts)
    assert len(blob) > 1000
    for name, value in SECRETS.items():
        assert value not in blob, f"{name} leaked"
