"""S3 faults injected by a proxy (tests/hardening/faulty_proxy.py) in front of the real moto server.

- transient: a few 503 SlowDown answers and one connection dropped mid-UploadPart -> the push
  succeeds through boto3's bounded retries, multipart really used, the copy verifies;
- persistent 503 during `spon run` -> one error line naming the endpoint and the s3:// key,
  nonzero exit, nothing stored, local result intact;
- every UploadPart dropped during `spon publish OUT` -> same guarantees, no manifest, the
  multipart upload aborted; `spon publish OUT` once healthy -> exactly one stored copy.
"""

from __future__ import annotations

import json

from cli_helpers import TINY, cli_env, error_lines, spon
from faulty_proxy import FaultyProxy
from pipeline_helpers import BUCKET

import pytest
from spon.format import SIDECAR

pytestmark = pytest.mark.slow  # services / subprocesses: not in the fast tier

BOTO_ATTEMPTS = 3  # AWS_MAX_ATTEMPTS for the CLI runs: bounded, and keeps the persistent cases short
PREFECT_ATTEMPTS = 4  # the publish task: 1 + IO_RETRIES["retries"]


def _keys(s3, prefix: str) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]


def _pending_uploads(s3, prefix: str) -> list:
    return s3.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads", [])


def test_transient_slowdown_and_dropped_part_are_retried(s3_endpoint, stories_path, tmp_path, monkeypatch):
    import boto3

    from spon.runtime import store

    s3 = boto3.client("s3")  # straight to moto
    monkeypatch.setattr(store, "MULTIPART_BYTES", 256 << 10)  # model.safetensors (1 MB) goes multipart
    with FaultyProxy(s3_endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        proxy.slow_down(3)
        proxy.drop_upload_parts(1)
        uri = store.push(stories_path, f"s3://{BUCKET}/transient", "m", "run1")
        assert proxy.count("503") == 3 and proxy.count("dropped") == 1, proxy.log
        assert any(m == "POST" and p.endswith("?uploads") for m, p, _ in proxy.log), "multipart never started"
        assert sum(1 for m, p, o in proxy.log if "partNumber=" in p and o == "200") >= 1
        pulled = store.pull(uri, tmp_path / "pulled")  # every sha256 checked against the manifest
    assert (pulled / "model.safetensors").read_bytes() == (stories_path / "model.safetensors").read_bytes()
    assert _keys(s3, "transient/").count("transient/m/run1/manifest.json") == 1
    assert not _pending_uploads(s3, "transient/")


def test_persistent_faults_fail_cleanly_then_publish_finishes(s3_endpoint, tmp_path, sample_txt):
    import boto3

    from spon.runtime import store

    s3 = boto3.client("s3")
    out, db, prefix = tmp_path / "out", tmp_path / "mlflow.db", "faulty/"
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    common = ["--tracking-uri", f"sqlite:///{db}", "--store", f"s3://{BUCKET}/faulty", "--work-dir", str(tmp_path / "work")]
    with FaultyProxy(s3_endpoint) as proxy:
        env = cli_env(AWS_ENDPOINT_URL=proxy.url, AWS_MAX_ATTEMPTS=str(BOTO_ATTEMPTS), SPON_S3_MULTIPART_MB="0.25")

        # (b) every request answered 503 SlowDown while the run publishes
        proxy.slow_down(None)
        r = spon(["-q", "run", "--config", str(tmp_path / "tiny.json"), "--eval-text", str(sample_txt), "--out", str(out), *common], env)
        errors = error_lines(r)
        assert r.returncode != 0 and len(errors) == 1, (r.stdout + r.stderr)[-3000:]
        assert proxy.url in errors[0] and f"s3://{BUCKET}/faulty/" in errors[0] and "SlowDown" in errors[0], errors[0]
        # bounded: each publish attempt's first request is retried by boto3, then Prefect retries the task
        assert proxy.count("503") == PREFECT_ATTEMPTS * BOTO_ATTEMPTS, proxy.count("503")
        assert not _keys(s3, prefix)
        fused = out / "fused" / "model.safetensors"
        before = fused.read_bytes()
        assert (out / "summary.json").is_file() and (out / "fused" / SIDECAR).is_file()
        assert any((tmp_path / "work" / "prefect-results").iterdir())  # cache records beside the stage outputs

        # (c) the connection drops in the middle of every UploadPart
        proxy.heal()
        proxy.drop_upload_parts(None)
        p = spon(["-q", "publish", str(out), *common], env)
        errors = error_lines(p)
        assert p.returncode != 0 and len(errors) == 1, (p.stdout + p.stderr)[-3000:]
        assert proxy.url in errors[0] and f"s3://{BUCKET}/faulty/" in errors[0] and "model.safetensors" in errors[0], errors[0]
        assert proxy.count("dropped") == BOTO_ATTEMPTS, proxy.count("dropped")
        assert not [k for k in _keys(s3, prefix) if k.endswith("/manifest.json")]
        assert not _pending_uploads(s3, prefix), "the failed multipart upload was not aborted"
        assert fused.read_bytes() == before

        # healthy again: publishing finishes the same copy (same run id, files already there kept)
        proxy.heal()
        ok = spon(["-q", "publish", str(out), *common], env)
        assert ok.returncode == 0, (ok.stdout + ok.stderr)[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    keys = _keys(s3, prefix)
    assert [k for k in keys if k.endswith("/manifest.json")] == [f"{summary['store_uri'][len(f's3://{BUCKET}/'):]}/manifest.json"]
    assert {k.rsplit("/", 1)[0] for k in keys if "/" in k[len(prefix):]} <= {summary["store_uri"][len(f"s3://{BUCKET}/"):]}, keys
    assert summary["version"] == "1"
    assert (store.pull(summary["store_uri"], tmp_path / "pulled") / "model.safetensors").read_bytes() == before
