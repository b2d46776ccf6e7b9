"""deployments/prefect.yaml on a real `prefect server start`: deploy, start a process worker,
trigger the pipeline deployment and watch the run complete. The worker stops before the server."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from pipeline_helpers import BIN, REPO, free_port, stop, tiny_config, wait_http

import pytest

pytestmark = pytest.mark.slow  # services / subprocesses: not in the fast tier


def test_deploy_worker_run(tmp_path, work_dir, sample_txt):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PATH": f"{BIN}:{os.environ['PATH']}"}
    prefect = [str(BIN / "prefect")]
    server = subprocess.Popen(prefect + ["server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    worker = None
    try:
        wait_http(api + "/health", 180, server)
        subprocess.run(prefect + ["work-pool", "create", "spon-process", "--type", "process"], env=env, check=True, capture_output=True)
        dep = subprocess.run([str(BIN / "spon"), "deploy", "--name", "spon-pipeline"], env=env, cwd=REPO, capture_output=True, text=True)
        assert dep.returncode == 0, dep.stdout[-2000:] + dep.stderr[-2000:]
        worker = subprocess.Popen(prefect + ["worker", "start", "--pool", "spon-process", "--limit", "1"], env=env, cwd=REPO,
                                  stdout=open(tmp_path / "worker.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
        cfg = tiny_config(tmp_path / "run", sample_txt)
        params = {"config": cfg.model_dump(mode="json"),
                  "settings": {"work_dir": str(work_dir), "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                               "artifact_root": (tmp_path / "mlart").as_uri(), "store": str(tmp_path / "store")}}
        run = subprocess.run(prefect + ["deployment", "run", "spon_pipeline/spon-pipeline", "--params", json.dumps(params),
                                        "--watch", "--watch-timeout", "420"], env=env, capture_output=True, text=True, timeout=480)
        logs = run.stdout[-3000:] + run.stderr[-2000:] + (tmp_path / "worker.log").read_text()[-3000:]
        assert run.returncode == 0 and "Completed" in run.stdout, logs
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert (Path(summary["store_uri"]) / "manifest.json").is_file()
        # the deployment carries its schedule from prefect.yaml
        show = subprocess.run(prefect + ["deployment", "inspect", "spon_pipeline/spon-pipeline"], env=env, capture_output=True, text=True)
        assert "0 2 * * *" in show.stdout
    finally:
        if worker is not None:
            stop(worker)
        stop(server)
