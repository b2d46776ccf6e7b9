"""Where MLflow artifacts go: beside the sqlite database (never the current directory unless the
database is there), a tracking server's own root, or --artifact-root."""

from __future__ import annotations

import os
from pathlib import Path


def test_artifacts_beside_the_sqlite_database_or_the_servers_own(tmp_path, monkeypatch):
    from spon.runtime.settings import PipelineSettings

    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    db = tmp_path / "reg" / "mlflow.db"
    assert PipelineSettings(tracking_uri=f"sqlite:///{db}").resolved_artifact_root() == (db.parent / "mlartifacts").as_uri()
    rel = PipelineSettings(tracking_uri="sqlite:///sub/mlflow.db").resolved_artifact_root()
    assert rel == (elsewhere / "sub" / "mlartifacts").as_uri()  # a relative database: beside it, as sqlite resolves it
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    assert PipelineSettings().resolved_artifact_root() == (db.parent / "mlartifacts").as_uri()
    for server in ("http://127.0.0.1:5000", "https://mlflow.example", "databricks"):
        assert PipelineSettings(tracking_uri=server).resolved_artifact_root() is None  # the server decides
    assert PipelineSettings(tracking_uri=f"sqlite:///{db}", artifact_root="s3://b/p").resolved_artifact_root() == "s3://b/p"
    assert PipelineSettings(artifact_root="arts").resolved_artifact_root() == (elsewhere / "arts").as_uri()


def test_artifact_root_flag(tmp_path):
    import argparse

    from spon.flows.cli import add_pipeline_args, settings_from_args

    p = argparse.ArgumentParser()
    add_pipeline_args(p)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(["--artifact-root", str(tmp_path / "a"), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    assert settings_from_args(args).resolved_artifact_root() == (tmp_path / "a").as_uri()
    assert not os.path.exists(Path.cwd() / "a")
