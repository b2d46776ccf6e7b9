"""Hardening tests reuse the pipeline tests' real local services (moto S3 over HTTP, an mlflow
server, a Prefect harness): the fixtures are loaded from tests/pipeline/conftest.py."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

PIPELINE = Path(__file__).resolve().parent.parent / "pipeline"
sys.path.insert(0, str(PIPELINE))
_spec = importlib.util.spec_from_file_location("pipeline_conftest", PIPELINE / "conftest.py")
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)

s3_endpoint, mlflow_server, prefect_harness, work_dir = _mod.s3_endpoint, _mod.mlflow_server, _mod.prefect_harness, _mod.work_dir
SESSION_TMP = _mod.SESSION_TMP


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(SESSION_TMP, ignore_errors=True)
