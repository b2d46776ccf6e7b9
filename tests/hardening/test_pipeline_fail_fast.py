"""Issue #22, item 5: an MLflow tracking server that does not answer is found before the first
stage (a 10 s connect timeout): the run is told in one warning line, its stages still run and keep
their results (`spon publish` tracks them later: test_faults_and_secrets.py), and MLflow's own
retry loop is bounded so tracking fails in seconds instead of retrying for minutes. The other
pipeline settings are refused before the first stage (test_bad_input.py: run-store-*, run-tracking-*,
run-experiment-empty, run-lm-eval-unknown-task)."""

from __future__ import annotations

import time

import pytest

from pipeline_helpers import free_port
from spon.errors import SponError
from spon.flows.cli import check_pipeline_settings
from spon.runtime.settings import PipelineSettings

RETRY_ENV = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")


def test_an_unreachable_tracking_server_is_said_once_and_mlflows_retries_are_bounded(tmp_path, monkeypatch, capsys):
    for k in RETRY_ENV:
        monkeypatch.delenv(k, raising=False)
    dead = f"http://127.0.0.1:{free_port()}"
    t0 = time.time()
    check_pipeline_settings(PipelineSettings(tracking_uri=dead, store=str(tmp_path / "store")), str(tmp_path / "out"))
    assert time.time() - t0 < 15
    err = capsys.readouterr().err
    assert f"spon: warning: cannot reach the MLflow tracking server at {dead}" in err and "spon publish" in err
    import os

    assert [os.environ[k] for k in RETRY_ENV] == ["1", "10", "1"]


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
