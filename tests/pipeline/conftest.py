"""Real services on 127.0.0.1 for the pipeline tests: moto's S3 server over HTTP, an `mlflow
server` subprocess with its artifacts on that S3, and a Prefect test harness (session-scoped)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

SESSION_TMP = Path(tempfile.mkdtemp(prefix="spon-pipeline-tests-"))
# Before prefect is imported anywhere: cache records beside the shared work dir; patience for a
# cold temporary server on a loaded machine.
os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(SESSION_TMP / "prefect-results"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
    os.environ[k] = v  # fake credentials only: nothing here may reach a real account
os.environ.pop("AWS_PROFILE", None)

from pipeline_helpers import BIN, BUCKET, free_port, stop, wait_http


@pytest.fixture(scope="session")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    os.environ["AWS_ENDPOINT_URL"] = url
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield url
    os.environ.pop("AWS_ENDPOINT_URL", None)
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server(s3_endpoint):
    """A real tracking server: sqlite backend, artifacts proxied to the moto S3 bucket."""
    port = free_port()
    d = SESSION_TMP / "mlflow-server"
    d.mkdir()
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
    log = open(d / "server.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}", "--artifacts-destination", f"s3://{BUCKET}/mlartifacts"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", 180, proc)
    except Exception:
        stop(proc)
        raise RuntimeError((d / "server.log").read_text()[-3000:])
    yield url
    stop(proc)


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def work_dir() -> Path:
    """One work dir for the whole session: later tests re-use stages earlier ones computed."""
    return SESSION_TMP / "work"


def pytest_sessionfinish(session, exitstatus):
    import shutil

    shutil.rmtree(SESSION_TMP, ignore_errors=True)  # servers are stopped by their fixtures by now
