"""Issue #22, item 5: the pipeline's settings are checked before the first stage. An MLflow tracking
server that does not answer a bounded connect (10 s) is refused in one line, exit 2, nothing
written -- never MLflow's own retry loop after the stages ran; one that answers at the start and
goes away mid-run leaves the run's results for `spon publish` (test_faults_and_secrets.py). The other
pipeline settings are refused the same way (test_bad_input.py: run-store-*, run-tracking-*,
run-experiment-empty, run-lm-eval-unknown-task)."""

from __future__ import annotations

import time

import pytest

from cli_helpers import cli_env, error_lines, spon
from pipeline_helpers import free_port
from spon.errors import SponError
from spon.flows.cli import check_pipeline_settings
from spon.runtime.settings import PipelineSettings

RETRY_ENV = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")


def test_an_unreachable_tracking_server_is_refused_before_anything_runs(tmp_path, monkeypatch):
    for k in RETRY_ENV:  # no retry setting helps or is needed: the refusal is spon's own connect
        monkeypatch.delenv(k, raising=False)
    dead = f"http://127.0.0.1:{free_port()}"
    t0 = time.time()
    with pytest.raises(SponError, match=f"cannot reach the MLflow tracking server at {dead} "):
        check_pipeline_settings(PipelineSettings(tracking_uri=dead, store=str(tmp_path / "store")), str(tmp_path / "out"))
    assert time.time() - t0 < 15
    assert list(tmp_path.iterdir()) == []


def test_spon_run_with_nothing_listening_on_the_tracking_port_exits_2_and_writes_nothing(tmp_path):
    """The real command line, port 1 (nothing listens there): one error line, exit 2, at once, and
    neither --out, --work-dir, the store nor their parents exist after."""
    root = tmp_path / "new"
    env = cli_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    for k in RETRY_ENV:
        env.pop(k, None)
    t0 = time.time()
    r = spon(["-q", "run", "--tracking-uri", "http://127.0.0.1:1", "--out", str(root / "out"),
              "--work-dir", str(root / "work"), "--store", str(root / "store")], env, timeout=120)
    took = time.time() - t0
    errors = error_lines(r)
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "cannot reach the MLflow tracking server at http://127.0.0.1:1 " in errors[0], errors[0]
    assert "--tracking-uri" in errors[0], errors[0]
    assert not root.exists()
    # Checked first, before the input checks import torch: 0.25 s on an idle-ish box; not MLflow's
    # retry loop (minutes). Slack for a loaded machine.
    assert took < 15, took


@pytest.mark.parametrize("settings,expected", [
    ({"tracking_uri": "garbage"}, "is not a tracking URI"),
    ({"tracking_uri": "http://"}, "names no host"),
    ({"experiment": "a\nb"}, "an MLflow experiment name is a non-empty line"),
    ({"store": "s3://"}, "names no bucket"),
    ({"store": "s3://bucket//x"}, "empty path segment"),
])
def test_bad_pipeline_settings_are_refused_before_anything_runs(tmp_path, settings, expected):
    base = {"tracking_uri": f"sqlite:///{tmp_path}/m.db", "store": str(tmp_path / "store")}
    with pytest.raises(SponError, match=expected):
        check_pipeline_settings(PipelineSettings(**{**base, **settings}), str(tmp_path / "out"))
    assert list(tmp_path.iterdir()) == []
